"""Stage 1: ViT + connector + LoRA on the decoder's attention learn to answer questions through the frozen SmolLM2.
After stage 0c the LoRA leads, the vision side follows at a low learning rate, and 0c's loss (with its
classification term) stays on as an auxiliary term. Every few steps a batch of plain text questions with the base
SmolLM2's own answers (distillation) is meant to keep the LoRA from changing how text questions are answered
(measured not enough: see the model card). With `lora=False` the decoder stays entirely frozen."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmkit.data.synthetic import Sample, SyntheticGenerator
from vlmkit.generation import GenerationConfig, generate
from vlmkit.models.vlm import VLMModel
from vlmkit.train.lora import add_lora, lora_state_dict
from vlmkit.train.loop import run

from .config import LanguageStage, RecipeConfig
from .model_folder import load_weights, precision
from .text_prompts import general_questions
from .words import WordTargets, word_terms


def answer_batch(processor, samples: list, words: WordTargets | None = None) -> dict:
    """Prompt (chat template with generation prompt) + answer + <|im_end|>; labels on the answer tokens only.
    Rows are left-padded, so every answer sits at the right edge. `words` adds stage 0c's targets of every image,
    for the auxiliary loss that keeps image tokens word-like."""
    tok = processor.tokenizer
    texts, images, answer_lens = [], [], []
    for s in samples:
        prompt = processor.apply_chat_template(s.messages(include_answer=False), add_generation_prompt=True)
        end = "" if s.meta.get("truncated") else "<|im_end|>"  # a cut-off distilled answer has no end
        texts.append(prompt + s.answer + end)
        images.append(list(s.images))
        answer_lens.append(len(tok.encode(s.answer, add_special_tokens=False)) + bool(end))
    batch = processor(texts, images, add_generation_prompt=False)
    keep = max(answer_lens) + 1
    labels = torch.full((len(samples), keep - 1), -100, dtype=torch.long)
    for row, n in enumerate(answer_lens):
        labels[row, -n:] = batch["input_ids"][row, -n:]
    batch["answer_labels"] = labels
    batch["logits_to_keep"] = keep
    scenes = [scene for s in samples for scene in s.meta.get("scenes", [])]
    if words is not None and scenes:
        batch.update(words.batch(scenes))
    return batch


def answer_loss(model: VLMModel, batch: dict, words: WordTargets | None = None, class_weight: float = 0.0,
                word_aux: float = 1.0) -> torch.Tensor:
    """Cross-entropy on the answer tokens, plus (when the batch has stage 0c's targets) `word_aux` times the word
    loss on the image tokens; with `words` and `class_weight` > 0 also its closest-word classification term."""
    inputs = {k: v for k, v in batch.items()
              if k != "answer_labels" and not k.startswith("word_") and not isinstance(v, list)}
    aux = 0.0
    if "word_targets" in batch:
        feats = model.image_features(inputs.pop("pixel_values"), inputs.pop("pixel_attention_mask", None))
        inputs["image_features"] = feats
        aux = word_aux * word_terms(feats, batch, words, class_weight)
    logits = model(**inputs).logits[:, :-1]  # position t predicts token t+1
    labels = batch["answer_labels"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100) + aux


@torch.no_grad()
def match_text_scale(model: VLMModel, processor, samples: list) -> float:
    """Scale the fresh connector so image tokens have the norm of SmolLM2's token embeddings (~3): with the
    default init they come out ~20x larger and swamp the residual stream of the frozen decoder."""
    batch = processor(["<image>"] * len(samples), [s.images[:1] for s in samples])
    feats = model.image_features(batch["pixel_values"].to(model.device),
                                 batch["pixel_attention_mask"].to(model.device))
    target = model.text.embed_tokens.weight.norm(dim=-1).median()
    factor = float(target / feats.norm(dim=-1).mean())
    model.connector.proj.weight.mul_(factor)
    return factor


@torch.no_grad()
def distillation_set(model: VLMModel, processor, out: Path, max_tokens: int) -> list:
    """Plain text questions with the base model's greedy answers (at most `max_tokens`; computed once, before the
    LoRA exists, and kept in `out/distill.json` so a resumed run trains on the same targets)."""
    path = out / "distill.json"
    if not path.is_file():
        tok, rows = processor.tokenizer, []
        cfg = GenerationConfig(max_new_tokens=max_tokens, eos_token_ids=tok.eos_token_ids)
        questions = general_questions()
        for i in range(0, len(questions), 32):
            chunk = questions[i:i + 32]
            batch = processor([[{"role": "user", "content": q}] for q in chunk])
            answers = generate(model, tok, {k: v.to(model.device) for k, v in batch.items()}, cfg)
            for q, a in zip(chunk, answers):
                cut = len(tok.encode(a, add_special_tokens=False)) >= max_tokens
                rows.append({"question": q, "answer": a, "truncated": cut})
        path.write_text(json.dumps(rows, indent=1))
    return [Sample([], r["question"], r["answer"], "text_only", meta={"truncated": r["truncated"]})
            for r in json.loads(path.read_text())]


def param_groups(model: VLMModel, stage: LanguageStage, words: bool) -> list:
    """The connector, the ViT and (with a LoRA) the LoRA weights, each at its learning-rate scale."""
    scales = stage.lr_scales_word_tokens if words else stage.lr_scales_fresh_tokens  # connector, vision, LoRA
    groups = [{"params": list(model.connector.parameters()), "lr_scale": scales[0]},
              {"params": list(model.vision.parameters()), "lr_scale": scales[1]}]
    if stage.lora:
        groups.append({"params": [p for n, p in model.named_parameters() if ".lora_" in n], "lr_scale": scales[2]})
    return groups


def train_language(model: VLMModel, processor, out: Path, cfg: RecipeConfig, words: bool = False,
                   init_lora: dict | None = None) -> list:
    """Stage 1. With `cfg.language.lora` a LoRA on the decoder, plus the distillation batches; `init_lora` (a
    `lora_state_dict`) starts it from an earlier model's. `words`: the image tokens were trained to be word-like
    (stage 0c); an auxiliary loss with `cfg.word`'s targets and classification term keeps them so."""
    stage = cfg.language
    gen = SyntheticGenerator(stage.seed, stage=2, weights=stage.weights)
    model.eval()
    distill = distillation_set(model, processor, out, stage.text_max_tokens) if stage.lora else []
    targets = None
    if words:  # the connector already writes word-like tokens (stage 0c): keep them so, no rescaling
        targets = WordTargets.of(model, processor, cfg)
    else:
        match_text_scale(model, processor, [gen.qa_sample(10**6 + i) for i in range(16)])  # resuming overwrites
    model.requires_grad_(False)
    if stage.lora:
        add_lora(model, targets=tuple(stage.lora_targets), r=stage.lora_r, alpha=stage.lora_alpha)
        if init_lora is not None:
            load_weights(model, init_lora, lora_state_dict(model).keys(), "the LoRA")
    model.vision.requires_grad_(True)
    model.connector.requires_grad_(True)
    groups = param_groups(model, stage, words)
    every, size = stage.text_every, stage.text_batch

    def make_batch(step):
        if distill and step % every == every - 1:
            first = (step // every) * size
            return answer_batch(processor, [distill[(first + j) % len(distill)] for j in range(size)])
        return answer_batch(processor, [gen.qa_sample(step * stage.batch_size + j) for j in range(stage.batch_size)],
                            targets)

    def loss_fn(m, batch):
        return answer_loss(m, batch, targets, cfg.word.class_weight, stage.word_aux)

    return run(model, make_batch, loss_fn, stage.train_config(precision()), ckpt_path=out / "stage1-language.ckpt",
               label="language", param_groups=groups)
