"""Model cards: every folder vlmkit writes (vlmkit.save, vlmkit quantize, a training run's final/) gets a README.md
whose YAML header the Hub reads (base_model, license, pipeline_tag, library_name, datasets, tags) and whose body says
what the model is, how to load it, how it was trained and its last metrics; a README.md of the user's is kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import vlmkit
from vlmkit import api, cli
from vlmkit.checkpoints.folders import card_defaults
from vlmkit.checkpoints.model_card import MARKER, hub_id, last_metrics, write_model_card

DATA = Path(__file__).parent / "data" / "train"
EVAL = Path(__file__).parent / "data" / "eval"
KEYS = {"base_model", "license", "pipeline_tag", "library_name", "tags"}


def card(folder) -> tuple[dict, str]:
    """(parsed YAML header, body) of folder/README.md; the header must be the file's first block and parse."""
    text = (Path(folder) / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.DOTALL)
    assert match, text[:200]
    header = yaml.safe_load(match.group(1))
    assert isinstance(header, dict) and KEYS <= set(header), header
    assert header["pipeline_tag"] == "image-text-to-text" and header["library_name"] == "vlmkit"
    assert "vlmkit" in header["tags"]
    return header, match.group(2)


@pytest.fixture(scope="module")
def source(hf_checkpoint_dir):
    return hf_checkpoint_dir("llava")


def test_save_writes_a_card_with_sizes_and_both_ways_to_load(source, tmp_path):
    vlmkit.save(vlmkit.load(source), tmp_path / "saved")
    header, body = card(tmp_path / "saved")
    assert header["base_model"] == Path(source).name and "base_model_relation" not in header
    assert "llava" in header["tags"]
    assert MARKER in body and "# saved" in body
    assert ("A vision-language model of the llava family (`LlavaForConditionalGeneration`), saved from "
            f"`{Path(source).name}`") in body
    assert re.search(r"\| vision \| ViT: 42 px, patch 14, width 32, 3 layers, 4 heads \| \d", body)
    assert "| language model | width 64, 2 layers" in body
    assert 'vlmkit.load("saved")' in body and "LlavaForConditionalGeneration.from_pretrained" in body


def test_quantize_output_has_a_card_saying_quantized(source, tmp_path, capsys):
    assert cli.main(["quantize", source, str(tmp_path / "q8"), "--int8"]) == 0
    header, body = card(tmp_path / "q8")
    assert header["base_model"] == Path(source).name and header["base_model_relation"] == "quantized"
    assert "int8" in header["tags"] and "quantized to int8" in body
    assert "from_pretrained" not in body  # transformers does not read vlmkit's quantized layout
    assert vlmkit.load(tmp_path / "q8").quantization["mode"] == "int8"  # the card does not disturb loading


def test_a_users_readme_is_kept_ours_is_rewritten(source, tmp_path):
    m = vlmkit.load(source)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "README.md").write_text("# my notes\n")
    vlmkit.save(m, user)
    assert (user / "README.md").read_text() == "# my notes\n"
    assert (user / "config.json").is_file()
    ours = tmp_path / "ours"
    vlmkit.save(m, ours)
    (ours / "README.md").write_text((ours / "README.md").read_text() + "\nstale line\n")
    vlmkit.save(m, ours)
    assert "stale line" not in (ours / "README.md").read_text()


def test_license_and_datasets_carry_over_from_the_source_card_and_hub_ids_show(source, tmp_path):
    hub = tmp_path / "hub" / "models--acme--tiny-llava" / "snapshots" / "abc123"
    hub.mkdir(parents=True)
    for f in Path(source).iterdir():
        (hub / f.name).symlink_to(f)
    (hub / "README.md").write_text("---\nlicense: mit\ndatasets:\n- acme/captions\n---\n# tiny\n")
    assert hub_id(hub) == "acme/tiny-llava"
    vlmkit.save(vlmkit.load(hub), tmp_path / "copy")
    header, _ = card(tmp_path / "copy")
    assert header["base_model"] == "acme/tiny-llava" and header["license"] == "mit"
    assert header["datasets"] == ["acme/captions"]


def test_the_default_models_card_names_its_base_and_license():
    defaults = card_defaults(api.default_model_path())
    assert defaults["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and defaults["license"] == "apache-2.0"
    assert defaults["base_model_relation"] == "finetune" and "default model" in defaults["description"]
    assert card_defaults("/somewhere/else") == {}


def test_quoting_survives_yaml(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["X"], "model_type": "llava"}))
    write_model_card(tmp_path, base_model='we: "odd" # name', datasets=["data/a: b.jsonl", "org/set"],
                     training={"lr": 1e-4, "note": "a | b\nc"}, tags=["- dash"])
    header, body = card(tmp_path)
    assert header["base_model"] == 'we: "odd" # name' and header["base_model_relation"] == "finetune"
    assert header["datasets"] == ["a: b.jsonl", "org/set"] and "- dash" in header["tags"]
    assert "| note | `a \\| b c` |" in body


def test_a_training_runs_final_folder_has_a_card_with_settings_and_metrics(source, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", source, "--data", str(DATA / "captions.jsonl"), "--stage", "llava-stage1",
            "--batch-size", "2", "--steps", "2", "--log-every", "1", "--lr", "0.0005",
            "--eval-task", "vqav2", "--eval-data", str(EVAL / "vqav2.jsonl"), "--eval-every", "2",
            "--eval-limit", "2", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    header, body = card(out / "final")
    assert header["base_model"] == Path(source).name and header["base_model_relation"] == "finetune"
    assert header["datasets"] == ["captions.jsonl"] and "fine-tuned" in header["tags"]
    assert f"fine-tuned from `{Path(source).name}`" in body
    assert "| stage.name | `llava-stage1` |" in body and "| lr | `0.0005` |" in body and "| steps | `2` |" in body
    metrics = last_metrics(out / "metrics.jsonl")
    assert metrics["steps"] == 2 and "accuracy" in metrics["eval"]
    assert f"- last training loss: {metrics['train_loss']:.4f} (step 2)" in body
    assert re.search(r"- eval accuracy: \d\.\d{4} \(step 2\)", body)
    assert "LlavaForConditionalGeneration.from_pretrained" in body
    assert "# run" in body and "| eval_data | `vqav2.jsonl` |" in body
    assert str(tmp_path) not in body and str(EVAL) not in body  # no path of the training machine
