"""`torchrun --nproc_per_node N -m vlmkit eval`: the processes share the items and the merged predictions, scores
and tables are the ones one process writes; a run interrupted with any number of processes resumes from the union
of the files it left."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import torch.multiprocessing as mp

from vlmkit import cli
from vlmkit.distributed import init_processes, shutdown
from vlmkit.eval import evaluate
from vlmkit.eval.shards import owner, shard_path

from test_eval_runner import MMBENCH, Oracle, StopsAfter, data

REPO = Path(__file__).resolve().parent.parent


def lines(folder) -> list[dict]:
    return [json.loads(x) for x in (Path(folder) / "predictions.jsonl").read_text().splitlines()]


def write_lines(path, rows, tail: str = "") -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def eval_args(model, out, *extra) -> list[str]:
    # float32 and batches of one: the same numbers in every process, whatever shares the batch
    return ["eval", "--model", model, "--dtype", "float32", "--task", "mmbench", "--data", data("mmbench.jsonl"),
            "--batch-size", "1", "--max-new-tokens", "3", "--output", str(out), *extra]


def torchrun(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlmkit",
           *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_two_processes_write_what_one_writes_and_resume(hf_checkpoint_dir, tmp_path, capsys):
    model = hf_checkpoint_dir("llava")
    assert cli.main(eval_args(model, tmp_path / "one")) == 0
    capsys.readouterr()
    one = lines(tmp_path / "one")
    assert len(one) == 6

    two = tmp_path / "two"
    two.mkdir()
    # Interrupted runs left: items 0-1 of a one-process run; process 1's file with item 4 and a torn line; a file of a
    # 4-process run with item 5 (marked, to show it is kept rather than predicted again). Items 2 and 3 are missing:
    # one for each process.
    write_lines(two / "predictions.jsonl", one[:2])
    write_lines(shard_path(two, 1), [one[4]], tail='{"id": "3", "task": "mmb')
    write_lines(shard_path(two, 3), [dict(one[5], note="kept")])
    out = torchrun(eval_args(model, two))
    assert out == (tmp_path / "one" / "results.md").read_text()  # printed once, by the first process
    merged = lines(two)
    assert [x["id"] for x in merged] == [x["id"] for x in one]  # in item order
    assert merged[:5] == one[:5] and merged[5] == dict(one[5], note="kept")
    assert not list(two.glob("predictions.rank*"))
    # the scores and tables one process writes
    assert (two / "results.md").read_text() == (tmp_path / "one" / "results.md").read_text()
    a, b = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "one", two))
    for key in ("metrics", "breakdown", "counts", "n", "failed", "settings"):
        assert a[key] == b[key], key


def test_one_process_resumes_what_several_left(tmp_path):
    fresh = evaluate(Oracle(MMBENCH), "mmbench", data("mmbench.jsonl"), output_dir=tmp_path / "fresh", batch_size=2)
    expected = lines(tmp_path / "fresh")
    out = tmp_path / "left"
    with pytest.raises(KeyboardInterrupt):  # a first (1-process) run killed after one batch: items 0 and 1
        evaluate(StopsAfter(MMBENCH, calls=1), "mmbench", data("mmbench.jsonl"), output_dir=out, batch_size=2)
    # then a 3-process run killed: process 0 and 2 had saved an item each
    write_lines(shard_path(out, 0), [expected[3]])
    write_lines(shard_path(out, 2), [expected[5]], tail="{")
    second = Oracle(MMBENCH)
    resumed = evaluate(second, "mmbench", data("mmbench.jsonl"), output_dir=out, batch_size=2)
    assert second.answered == 2  # items 2 and 4
    assert lines(out) == expected and not list(out.glob("predictions.rank*"))
    assert resumed["metrics"] == fresh["metrics"] and resumed["breakdown"] == fresh["breakdown"]


def test_missing_items_are_dealt_a_batch_at_a_time():
    # each process forms the batches one process would: [0, 1], [2, 3], ... with batches of 2
    assert [owner(k, 3, 2) for k in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    assert [owner(k, 2, 1) for k in range(4)] == [0, 1, 0, 1]
    assert {owner(k, 1, 8) for k in range(20)} == {0}


class Unwell(Oracle):
    """Fails every item of process 1 (as a model that cannot run there would)."""

    def __init__(self, rule, rank):
        super().__init__(rule)
        self.rank = rank

    def generate_batch(self, prompts, images=None, **options):
        if self.rank == 1:
            raise RuntimeError("no memory left")
        return super().generate_batch(prompts, images, **options)


def _process(rank: int, port: int, folder: str, mmbench: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    ctx = init_processes("cpu")
    model = Oracle(MMBENCH)
    results = evaluate(model, "mmbench", mmbench, output_dir=Path(folder) / "two", batch_size=2, processes=ctx)
    report = {"answered": model.answered, "metrics": results["metrics"], "failed": results["failed"]}
    try:  # process 1 fails all its items: every process stops with the reason
        evaluate(Unwell(MMBENCH, rank), "synthetic", limit=32, output_dir=Path(folder) / "unwell", batch_size=2,
                 processes=ctx, log=lambda _: None)
    except ValueError as e:
        report["error"] = str(e)
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(report))
    shutdown(ctx)


def test_processes_share_batches_and_failures(tmp_path):
    """torch.multiprocessing, gloo: each process generates whole batches (rank 0: items 0-1 and 4-5, rank 1: 2-3);
    an item failing in one process is reported by all; a process that stops makes every one stop."""
    rows = [json.loads(x) for x in open(data("mmbench.jsonl"))]
    rows[3]["image"] = "images/missing.png"
    mmbench = tmp_path / "mmbench.jsonl"
    write_lines(mmbench, rows)
    shutil.copytree(data("images"), tmp_path / "images")
    one = evaluate(Oracle(MMBENCH), "mmbench", mmbench, output_dir=tmp_path / "one", batch_size=2, log=lambda _: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_process, args=(port, str(tmp_path), str(mmbench)), nprocs=2)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["answered"] for r in reports] == [4, 1]  # item 3 (rank 1's) has no image
    assert all(r["failed"] == 1 and r["metrics"] == one["metrics"] for r in reports)
    assert lines(tmp_path / "two") == lines(tmp_path / "one")
    assert "process 1 of the evaluation failed: ValueError: every item so far failed" in reports[0]["error"]
    assert "no memory left" in reports[1]["error"]
