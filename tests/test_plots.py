"""Pictures: `vlmkit train` draws loss.png, `vlmkit plot` redraws it (also from a half-written metrics.jsonl),
`vlmkit eval` draws results.png, and without matplotlib training and evaluation still finish, saying how to get
the pictures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

from vlmkit import cli
from vlmkit.eval import evaluate
from vlmkit.plots import read_metrics

DATA = Path(__file__).parent / "data" / "train"
EVAL = Path(__file__).parent / "data" / "eval"
HINT = "pip install 'vlmkit[plot]'"


def assert_png(path: Path, min_size=(400, 150)) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.load()  # decodes the whole file: a torn PNG fails here
        assert im.format == "PNG" and im.width >= min_size[0] and im.height >= min_size[1]


def no_matplotlib(monkeypatch) -> None:
    """`import matplotlib...` fails, as on a machine without the `plot` extra."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)


def train_argv(model: str, out: Path, *extra: str) -> list:
    return ["train", "--model", model, "--data", str(DATA / "captions.jsonl"), "--stage", "llava-stage1",
            "--batch-size", "2", "--steps", "2", "--no-final", "--out", str(out), *extra]


def test_train_draws_loss_png_with_its_evaluations(hf_checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(hf_checkpoint_dir("llava"), out, "--eval-task", "vqav2", "--eval-data",
                      str(EVAL / "vqav2.jsonl"), "--eval-every", "1", "--eval-limit", "2")
    assert cli.main(argv) == 0
    assert f"drew the training curves in {out / 'loss.png'}" in capsys.readouterr().err
    assert_png(out / "loss.png")
    steps, evals = read_metrics(out / "metrics.jsonl")
    assert sorted(steps) == [1, 2] and sorted(evals) == [1, 2] and "accuracy" in evals[2]
    assert_png(out / "eval" / "step-2" / "results.png")  # each periodic evaluation's chart, beside its results.md


def test_plot_command_reads_a_run_in_progress(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-4 * min(1, s / 3), "grad_norm": 1.0 + s % 3})
             for s in range(1, 151)]
    lines.insert(40, json.dumps({"step": 40, "eval": {"accuracy": 0.25, "note": "text is not drawn"}}))
    lines.insert(120, json.dumps({"step": 120, "loss": None, "lr": 1e-4, "grad_norm": None}))  # non-finite: null
    # the line being written when the plot was asked for: cut mid-record
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 151, "loss": 0.0')
    assert cli.main(["plot", str(run)]) == 0
    assert f"wrote {run / 'loss.png'}" in capsys.readouterr().err
    assert_png(run / "loss.png")
    steps, evals = read_metrics(run / "metrics.jsonl")
    assert len(steps) == 150 and 151 not in steps and evals == {40: {"accuracy": 0.25}}
    other = tmp_path / "elsewhere" / "curves.png"
    assert cli.main(["plot", str(run), "--out", str(other)]) == 0
    assert_png(other)


def test_plot_command_errors(tmp_path, capsys, monkeypatch):
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo')
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "holds no training step yet" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    no_matplotlib(monkeypatch)
    assert cli.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert HINT in err and err.count("\n") == 1
    assert not (tmp_path / "loss.png").exists()


class Answers:
    """A model stand-in that gives the synthetic benchmark's answers in order, every fourth one wrong."""

    name = "stand-in"

    def __init__(self):
        from vlmkit.data.synthetic import benchmark_set

        self.answers = iter([s.answer if i % 4 else "wrong" for i, s in enumerate(benchmark_set(40))])

    def generate_batch(self, prompts, images=None, **options):
        return [next(self.answers) for _ in prompts]


def test_eval_draws_the_score_per_category(tmp_path):
    results = evaluate(Answers(), "synthetic", limit=40, output_dir=tmp_path, batch_size=4)
    assert set(results["breakdown"]) >= {"category"}
    assert (tmp_path / "results.md").is_file()
    assert_png(tmp_path / "results.png")


def test_eval_without_categories_draws_its_metrics(tmp_path):
    results = evaluate(Answers(), "textvqa", str(EVAL / "textvqa.parquet"), output_dir=tmp_path)
    assert not results["breakdown"]
    assert_png(tmp_path / "results.png")


def test_without_matplotlib_training_and_eval_finish_and_say_how(hf_checkpoint_dir, tmp_path, capsys,
                                                                  monkeypatch):
    no_matplotlib(monkeypatch)
    out = tmp_path / "run"
    assert cli.main(train_argv(hf_checkpoint_dir("llava"), out)) == 0
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "loss.png" in line]
    assert HINT in line and f"vlmkit plot {out}" in line
    assert (out / "metrics.jsonl").is_file() and (out / "checkpoint.safetensors").is_file()
    assert not (out / "loss.png").exists()
    said = []
    evaluate(Answers(), "synthetic", limit=4, output_dir=tmp_path / "eval", log=said.append)
    assert (tmp_path / "eval" / "results.md").is_file() and not (tmp_path / "eval" / "results.png").exists()
    assert [s for s in said if HINT in s] == [f"vlmkit eval: no results.png: drawing the chart needs matplotlib "
                                              f"({HINT})"]


def test_bench_charts_from_the_committed_results(tmp_path):
    from bench import charts

    found = charts.tables((Path(charts.HERE) / "results.md").read_text())
    assert charts.number("1,117 MiB") == 1117 and charts.number("8.00 (5.36)", 1) == 5.36
    assert charts.number("n/a") is None
    said = []
    written = charts.draw_all(Path(charts.HERE) / "results.md", tmp_path, said.append)
    assert [p.name for p in written] == [c.png for c in charts.CHARTS] and len(said) == len(written)
    for path in written:
        assert_png(path)
    heading = next(h for h in found if h.startswith("Real size"))
    assert found[heading][0][:4] == ["", "load s", "peak load RSS GB (anon)", "TTFT s"]
    # a results.md without a section: that chart is skipped, with a line saying so
    (tmp_path / "partial.md").write_text("## Decode: x\n\n| | tok/s batch 1 | tok/s batch 8 |\n|---|---:|---:|\n"
                                         "| vlmkit int4 | 54.0 | 215.3 |\n| llama.cpp | 96.5 | n/a |\n")
    said.clear()
    written = charts.draw_all(tmp_path / "partial.md", tmp_path / "partial", said.append)
    assert [p.name for p in written] == ["decode.png"] and sum("not drawn" in s for s in said) == 2
