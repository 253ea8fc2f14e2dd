"""Stages as config: exactly which parameters train (counts asserted), per-part learning rates, LoRA and LoRA over
an int4 base (QLoRA), and the merged model saved in Hugging Face format that transformers loads back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import vlmkit
from hf_fixtures import load_hf
from vlmkit.data.collate import Collator
from vlmkit.data.readers import read_dataset
from vlmkit.models.lora import LoRALinear
from vlmkit.train.finetune import FinetuneConfig, finetune
from vlmkit.train.lora import merge_lora
from vlmkit.train.stages import LoRASpec, Stage, apply_stage, get_stage

DATA = Path(__file__).parent / "data" / "train"


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def trainable_names(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_llava_stage1_and_stage2_train_exactly_their_parts(hf_checkpoint_dir):
    model = vlmkit.load(hf_checkpoint_dir("llava")).model
    plan = apply_stage(model, get_stage("llava-stage1"))
    assert plan.trainable == numel(model.connector) == plan.trainable_by_part["connector"]
    assert trainable_names(model) == {f"connector.{n}" for n, _ in model.connector.named_parameters()}
    assert f"trainable parameters: {plan.trainable:,} of {numel(model):,}" in plan.describe()
    assert get_stage("llava-stage1").template == "plain" and get_stage("llava-stage1").lr == 1e-3
    plan = apply_stage(model, get_stage("llava-stage2"))
    assert plan.trainable_by_part == {"connector": numel(model.connector), "decoder": numel(model.text)}
    assert not any(p.requires_grad for p in model.vision.parameters())
    # "full": LLaVA reads ViT layer -2, so the last layer and the post-layernorm never train (and are not counted)
    plan = apply_stage(model, get_stage("full"))
    idle = numel(model.vision.layers[-1]) + numel(model.vision.post_norm)
    assert plan.trainable_by_part["vision"] == numel(model.vision) - idle
    assert plan.trainable == numel(model) - idle


def test_idefics_recipe_trains_perceiver_and_gated_cross_attention_only(hf_checkpoint_dir):
    model = vlmkit.load(hf_checkpoint_dir("idefics")).model
    plan = apply_stage(model, get_stage("idefics"))
    assert plan.trainable_by_part == {"connector": numel(model.connector),
                                      "cross_attention": numel(model.text.cross_blocks)}
    assert all(n.startswith(("connector.", "text.cross_blocks.")) for n in trainable_names(model))
    llava = vlmkit.load(hf_checkpoint_dir("llava")).model
    with pytest.raises(ValueError, match="cross_attention"):
        apply_stage(llava, get_stage("idefics"))


def test_lora_counts_groups_and_learning_rates(hf_checkpoint_dir):
    model = vlmkit.load(hf_checkpoint_dir("llava")).model
    stage = replace(get_stage("lora"), lora=LoRASpec(r=4, alpha=8.0))
    plan = apply_stage(model, stage)
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 7 * model.cfg.text.num_layers == len(plan.lora_layers)
    assert plan.trainable_by_part["lora"] == sum(4 * (m.base.in_features + m.base.out_features) for m in wrapped)
    assert plan.trainable == plan.trainable_by_part["lora"] + numel(model.connector)
    assert {g["name"]: g["lr_scale"] for g in plan.groups} == {"connector": 0.1, "lora": 1.0}
    with pytest.raises(ValueError, match="unknown parts"):
        Stage(train=("conector",))


def test_a_part_at_lr_scale_zero_does_not_move(hf_checkpoint_dir, tmp_path):
    """Per-part learning rates reach the optimizer: the connector at scale 0 stays put while LoRA trains."""
    folder = hf_checkpoint_dir("llava")
    stage = {"name": "frozen-connector", "train": ["connector"], "lr": 5e-3, "lr_scales": {"connector": 0.0},
             "lora": {"r": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}}
    stage_file = tmp_path / "stage.json"
    stage_file.write_text(__import__("json").dumps(stage))
    before = vlmkit.load(folder).model.connector.state_dict()
    result = finetune(FinetuneConfig(model=folder, data=[str(DATA / "captions.jsonl")], stage=str(stage_file),
                                     out=str(tmp_path / "run"), batch_size=4, steps=2, log_every=100),
                      log=lambda _: None)
    after = vlmkit.load(result["final"]).model
    for k, v in before.items():
        assert torch.equal(after.connector.state_dict()[k], v)
    assert result["losses"][2] < result["losses"][1]  # LoRA did train


@pytest.mark.parametrize("family,stage", [("llava", "lora"), ("idefics2", "lora"), ("llava", "qlora")])
def test_merged_model_saves_in_hugging_face_format_that_transformers_loads(hf_checkpoint_dir, tmp_path, family,
                                                                             stage):
    folder = hf_checkpoint_dir(family)
    cfg = FinetuneConfig(model=folder, data=[str(DATA / "cauldron.parquet")], stage=stage, out=str(tmp_path),
                         batch_size=4, steps=3, lr=2e-2, lora_r=4, lora_alpha=8.0, log_every=100)
    trained = vlmkit.load(folder, dtype=torch.float32)
    result = finetune(cfg, log=lambda _: None)
    final = vlmkit.load(result["final"])
    batch = Collator(final.processor)([read_dataset(DATA / "cauldron.parquet")[0]])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # The base changed by exactly the LoRA deltas: rebuild them from the checkpoint and compare a projection.
    from safetensors.torch import load_file

    ckpt = load_file(str(tmp_path / "checkpoint.safetensors"))
    a, b = ckpt["param/text.layers.0.attn.q_proj.lora_A"], ckpt["param/text.layers.0.attn.q_proj.lora_B"]
    base = trained.model.text.layers[0].attn.q_proj.weight
    assert b.abs().max() > 0
    torch.testing.assert_close(final.model.text.layers[0].attn.q_proj.weight, base + b @ a * 2.0)
    hf_model, _ = load_hf(result["final"])
    with torch.no_grad():
        theirs = hf_model(**inputs).logits
        ours = final.model(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_qlora_trains_lora_over_an_int4_base_and_merges(hf_checkpoint_dir):
    m = vlmkit.load(hf_checkpoint_dir("llava"), dtype=torch.float32)
    batch = Collator(m.processor)([read_dataset(DATA / "llava.json", log=lambda _: None)[i] for i in range(4)])
    labels = batch.pop("labels")
    plan = apply_stage(m.model, replace(get_stage("qlora"), lora=LoRASpec(r=4, alpha=8.0)))
    q_proj = m.model.text.layers[0].attn.q_proj
    assert type(q_proj.base).__name__ == "Int4Linear" and type(m.model.text.lm_head).__name__ == "Int8Linear"
    assert plan.trainable == plan.trainable_by_part["lora"] + numel(m.model.connector)
    opt = torch.optim.AdamW([p for g in plan.groups for p in g["params"]], lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = m.model(**batch, labels=labels).loss
        loss.backward()  # through the int4 kernels: they have no autograd formula of their own
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert m.model.text.layers[1].attn.q_proj.lora_A.grad.abs().sum() > 0
    with torch.no_grad():
        before = m.model(**batch).logits
        merge_lora(m.model)
        after = m.model(**batch).logits
    # merged = float base + delta in float32; before it the int4 kernel ran on bf16-rounded activations
    assert (after - before).norm() / before.norm() < 1e-2
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.95
