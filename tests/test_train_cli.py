"""`vlmkit train` as users run it: a fine-tuning run on local data writes metrics, a checkpoint, periodic eval
results and the merged model; bad examples are counted (or fatal); a NaN loss fails the run (or is skipped on
request); a corrupt checkpoint or changed data is refused on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vlmkit
from vlmkit import cli

DATA = Path(__file__).parent / "data" / "train"
EVAL = Path(__file__).parent / "data" / "eval"


@pytest.fixture()
def data_with_a_corrupt_image(tmp_path):
    rows = [{"image": str(DATA / "images" / f"{c}_circle.png"), "caption": f"A {c} circle."}
            for c in ("red", "blue", "green")]
    rows.insert(2, {"image": "data:image/png;base64,iVBORw0KGgoAAAA=", "caption": "Broken."})
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_finetune_run_writes_metrics_eval_checkpoint_and_final_model(hf_checkpoint_dir, tmp_path, capsys,
                                                                    data_with_a_corrupt_image):
    out = tmp_path / "run"
    argv = ["train", "--model", hf_checkpoint_dir("llava"), "--data", str(data_with_a_corrupt_image),
            "--stage", "llava-stage1", "--batch-size", "4", "--steps", "2", "--log-every", "1",
            "--eval-task", "vqav2", "--eval-data", str(EVAL / "vqav2.jsonl"), "--eval-every", "2",
            "--eval-limit", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "stage llava-stage1: trainable parameters:" in err
    assert "skipping" in err and "record 2" in err
    assert "2 examples skipped" in err  # one bad example, read (and skipped) in both steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and steps[-1]["skipped"] == 2  # the bad example, in both steps
    assert all(r["samples"] == 4 and r["tokens"] > 0 and r["samples_per_s"] > 0 for r in steps)
    (evaluation,) = [r for r in records if "eval" in r]
    assert evaluation["step"] == 2 and "accuracy" in evaluation["eval"]
    assert (out / "eval" / "step-2" / "results.json").is_file()
    assert (out / "checkpoint.safetensors").is_file()
    m = vlmkit.load(out / "final")  # the merged model, a plain Hugging Face folder
    assert m.generate("<image>Describe.", images=[str(DATA / "images" / "red_circle.png")], max_new_tokens=2)
    # Rerunning the finished command resumes at its last step: nothing left to do.
    assert cli.main(argv) == 0
    assert "resumed from" in capsys.readouterr().err


def test_bad_examples_are_fatal_on_request(hf_checkpoint_dir, tmp_path, capsys, data_with_a_corrupt_image):
    code = cli.main(["train", "--model", hf_checkpoint_dir("llava"), "--data", str(data_with_a_corrupt_image),
                     "--batch-size", "4", "--steps", "1", "--on-bad-record", "raise", "--out", str(tmp_path)])
    assert code == 2
    assert "record 2" in capsys.readouterr().err


def test_train_needs_model_and_data(capsys, tmp_path):
    assert cli.main(["train", "--data", str(DATA / "llava.json")]) == 2
    assert "give --model FOLDER and --data FILE" in capsys.readouterr().err
    assert cli.main(["train", "--model", str(tmp_path), "--data", "nope.json"]) == 2


def _strict_lines(path: Path) -> list:
    """metrics.jsonl parsed as strict JSON: a bare NaN / Infinity fails the test."""
    return [json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in {path.name}"))
            for line in path.read_text().splitlines()]


def test_a_nan_loss_fails_the_run_and_writes_no_final_model(hf_checkpoint_dir, tmp_path, capsys):
    argv = ["train", "--model", hf_checkpoint_dir("llava"), "--data", str(DATA / "captions.jsonl"),
            "--batch-size", "2", "--steps", "4", "--lr", "1e30", "--log-every", "1"]  # a huge lr: NaN at step 2
    assert cli.main(argv + ["--out", str(tmp_path / "stop")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vlmkit: error: training stopped at step 2: the loss is nan") and "--skip-nonfinite" in err
    assert not (tmp_path / "stop" / "final").exists()
    assert [r["step"] for r in _strict_lines(tmp_path / "stop" / "metrics.jsonl")] == [1]
    # --skip-nonfinite: the bad batches are skipped and counted, and metrics.jsonl stays JSON
    assert cli.main(argv + ["--skip-nonfinite", "--no-final", "--out", str(tmp_path / "skip")]) == 0
    assert "3 batches skipped for a non-finite loss" in capsys.readouterr().err
    records = _strict_lines(tmp_path / "skip" / "metrics.jsonl")
    assert [r["loss"] is None for r in records] == [False, True, True, True]
    assert [r["skipped_nonfinite"] for r in records] == [0, 1, 2, 3]


def test_resume_refuses_a_corrupt_checkpoint_and_changed_data(hf_checkpoint_dir, tmp_path, capsys):
    rows = [dict(r, image=str(DATA / r["image"]))
            for r in map(json.loads, (DATA / "captions.jsonl").read_text().splitlines())]
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint.safetensors.k1ll3d.tmp"  # left by a run killed while writing its checkpoint
    stale.write_bytes(b"partial")
    argv = ["train", "--model", hf_checkpoint_dir("llava"), "--data", str(data), "--batch-size", "2",
            "--log-every", "1", "--no-final", "--out", str(out)]
    assert cli.main(argv + ["--steps", "1"]) == 0
    assert not stale.exists()
    capsys.readouterr()
    # the same number of examples, one caption changed: another data set
    data.write_text("".join(json.dumps(dict(r, caption="Changed.") if i == 3 else r) + "\n"
                            for i, r in enumerate(rows)))
    assert cli.main(argv + ["--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "different data or settings: the data's content" in err and "another --out" in err
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # 4 KB of the checkpoint's tensor data flipped (safetensors itself would load it without a word)
    ck = out / "checkpoint.safetensors"
    raw = bytearray(ck.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little") + 1000
    raw[start:start + 4096] = bytes(b ^ 0xFF for b in raw[start:start + 4096])
    ck.write_bytes(bytes(raw))
    assert cli.main(argv + ["--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"checkpoint {ck} is corrupt" in err and f"delete {ck}" in err and "another --out" in err


def test_train_help_describes_fine_tuning_only(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m recipes.default_model" in out
    assert "--recipe" not in out and "--ship" not in out and "--word-steps" not in out
    assert cli.main(["train", "--recipe", "default"]) == 2  # the recipe has its own command now
