"""The `vlmkit` command line: `main([...])` in-process (capsys), and once as a real process (`python -m vlmkit`),
against a tiny checkpoint written by `vlmkit.save`. Bad input must give exit code 2 and ONE line naming the problem."""

import io
import json
import os
import subprocess
import sys

import pytest

import vlmkit
from hf_fixtures import sample_images
from vlmkit import api, cli
from vlmkit.cli import chat_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def files(hf_checkpoint_dir, tmp_path_factory):
    """A saved tiny LLaVA (vlmkit.save of the loaded checkpoint), two images and a corrupt one."""
    root = tmp_path_factory.mktemp("cli")
    model = root / "llava"
    vlmkit.save(vlmkit.load(hf_checkpoint_dir("llava")), model)
    a, b = sample_images()
    a.save(root / "a.png")
    b.save(root / "b.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return {"model": str(model), "a": str(root / "a.png"), "b": str(root / "b.png"),
            "corrupt": str(root / "corrupt.png"), "missing": str(root / "no-such-model"), "root": root}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vlmkit") and "error:" in lines[0] and "Traceback" not in err
    return lines[0]


def test_run_two_images_streams_an_answer(files, capsys):
    code = cli.main(["run", "--model", files["model"], "--image", files["a"], "--image", files["b"], *FAST,
                     "What is shown?"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.endswith("\n") and out.strip() and err == ""


def test_run_with_placeholders_and_sampling_flags(files, capsys):
    args = ["run", "-m", files["model"], "-i", files["a"], "-i", files["b"], *FAST, "--temperature", "0.7",
            "--seed", "3", "--top-p", "0.9", "Compare <image> with <image>."]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first  # the seed makes sampling repeatable


def test_run_as_a_process(files):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "vlmkit", "run", "--model", files["model"], "--image", files["a"],
           "--image", files["b"], *FAST, "What is shown?"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    bad = subprocess.run(cmd[:3] + ["info", files["missing"]], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert bad.returncode == 2 and "does not exist" in one_error_line(bad.stderr) and bad.stdout == ""


def test_info_text_and_json(files, capsys):
    assert cli.main(["info", files["model"]]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["family", "llava"]
    for key in ("architecture", "parameters", "tokens per image", "image size", "context length", "dtype", "memory"):
        assert key in out
    assert cli.main(["info", files["model"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "llava" and info["architecture"] == "LlavaForConditionalGeneration"
    assert info["tokens_per_image"] == 9 and info["context_length"] == 2048 and info["dtype"] == "float32"
    parts = ("vision_parameters", "connector_parameters", "cross_attention_parameters", "text_parameters")
    assert sum(info[k] for k in parts) == info["parameters"] and info["connector_parameters"] > 0
    assert info["memory_bytes"] == 4 * info["parameters"]


def test_info_idefics_counts_cross_attention(hf_checkpoint_dir, capsys):
    assert cli.main(["info", hf_checkpoint_dir("idefics"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "idefics" and info["merge"] == "cross_attention"
    assert info["cross_attention_parameters"] > 0


def test_chat_session(files, capsys, monkeypatch):
    sent = []
    real = api.VLM.generate

    def spy(self, prompt, images=None, **kwargs):
        sent.append(prompt)
        return real(self, prompt, images=images, **kwargs)

    monkeypatch.setattr(api.VLM, "generate", spy)
    lines = [f"/image {files['a']}", "What is in this picture?", "And its colour?", "/reset", "Hello", "/exit",
             "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert cli.main(["chat", "--model", files["model"], *FAST]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3  # one streamed answer per question
    assert "image attached" in err and "conversation cleared" in err
    users = [[m for m in prompt if m["role"] == "user"] for prompt in sent]
    assert [len(u) for u in users] == [1, 2, 1]  # history kept, then cleared by /reset
    assert [sum(p["type"] == "image" for m in u for p in m["content"]) for u in users] == [1, 1, 0]
    assert users[1][1]["content"] == [{"type": "text", "text": "And its colour?"}]


def test_chat_reports_bad_turns_and_goes_on(files, capsys, monkeypatch):
    lines = [f"/image {files['corrupt']}", "<image><image> two?", "Hi"]  # EOF ends the chat
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert cli.main(["chat", "--model", files["model"], "--image", files["a"], *FAST]) == 2
    out, err = capsys.readouterr()
    assert "cannot read image" in err and "placeholder" in err
    assert len(out.splitlines()) == 1  # "Hi" was still answered


@pytest.mark.parametrize("case, expected", [
    ("missing model", "does not exist"),
    ("model is a file", "not a model folder"),
    ("corrupt image", "cannot read image"),
    ("missing image", "does not exist"),
    ("too many placeholders", "2 <image> placeholder(s) but 1 image"),
    ("prompt too long", "longer than"),
    ("bad flag value", "--max-new-tokens"),
    ("unknown dtype", "--dtype"),
])
def test_bad_input_gives_one_line_and_exit_2(files, capsys, case, expected):
    m, a = files["model"], files["a"]
    argv = {
        "missing model": ["run", "-m", files["missing"], "-i", a, "hi"],
        "model is a file": ["info", a],
        "corrupt image": ["run", "-m", m, "-i", files["corrupt"], "hi"],
        "missing image": ["run", "-m", m, "-i", str(files["root"] / "nope.png"), "hi"],
        "too many placeholders": ["run", "-m", m, "-i", a, "<image> vs <image>"],
        "prompt too long": ["run", "-m", m, "-i", a, *FAST, "word " * 3000],
        "bad flag value": ["run", "-m", m, "-i", a, "--max-new-tokens", "0", "hi"],
        "unknown dtype": ["run", "-m", m, "--dtype", "float8", "hi"],
    }[case]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert expected in one_error_line(err) and out == ""


@pytest.mark.parametrize("case, expected", [
    ("a URL of another scheme", "does not fetch (only http and https)"),
    ("the second image missing", "does not exist"),
    ("a folder", "not a file (a folder)"),
    ("not an image", "not a recognised image"),
    ("a corrupt image", "cannot read image"),
    ("placeholders do not match", "3 <image> placeholder(s) but 2 image(s)"),
])
def test_run_checks_every_image_before_loading_the_model(files, capsys, monkeypatch, case, expected):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(chat_command, "load_model", must_not_load)
    monkeypatch.setattr(api, "load", must_not_load)
    (files["root"] / "notes.txt").write_text("not an image")
    a, b = files["a"], files["b"]
    images = {
        "a URL of another scheme": [a, "ftp://example.com/cat.jpg"],
        "the second image missing": [a, str(files["root"] / "nope.png")],
        "a folder": [a, str(files["root"])],
        "not an image": [a, str(files["root"] / "notes.txt")],
        "a corrupt image": [a, files["corrupt"]],
        "placeholders do not match": [a, b],
    }[case]
    prompt = "<image> <image> <image> compare" if case == "placeholders do not match" else "<image> vs <image>"
    argv = ["run", "-m", files["missing"]] + [x for path in images for x in ("-i", path)] + [prompt]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert expected in one_error_line(err) and out == ""


def test_default_model_missing_is_a_clear_error(files, capsys):
    if (api.default_model_path() / "config.json").is_file():
        pytest.skip("the embedded default model is installed")
    assert cli.main(["run", "--image", files["a"], "hi"]) == 2
    assert "default model is not installed" in one_error_line(capsys.readouterr().err)


def test_parser_lists_only_real_commands(capsys):
    assert set(cli.COMMANDS) == {"run", "chat", "info", "train", "eval", "serve", "bench", "quantize", "export", "plot"}
    assert cli.main(["--help"]) == 0
    assert "run" in capsys.readouterr().out
    assert cli.main([]) == 2
    one_error_line(capsys.readouterr().err)


def test_bench_times_the_model(files, capsys):
    argv = ["bench", "--model", files["model"], "--new-tokens", "4", "--repeat", "1"]
    assert cli.main(argv + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == files["model"] and r["family"] == "llava" and r["new_tokens"] == 4
    assert r["prompt_tokens"] > 9  # the image's 9 tokens and the question
    for key in ("load_s", "preprocess_s", "prefill_s", "prefill_tokens_per_s", "decode_tokens_per_s",
                "peak_memory_bytes"):
        assert r[key] > 0, key
    assert r["ttft_s"] == r["preprocess_s"] + r["prefill_s"]
    assert cli.main(argv + ["--image", files["a"], "--prompt", "What colour?"]) == 0
    out, err = capsys.readouterr()
    assert "| decode (4 tokens) |" in out and "tokens/s" in out and "| peak memory |" in out
    assert "loaded in" in err


def test_bench_refuses_a_bad_image_before_loading(files, capsys):
    assert cli.main(["bench", "--model", files["model"], "--image", files["corrupt"]]) == 2
    assert "cannot read image" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["run", "chat", "serve", "eval", "bench", "train", "info"])
def test_device_defaults_to_auto(name, capsys):
    assert cli.main([name, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--device" in text and "auto (the default: CUDA, then Apple MPS, then CPU)" in text


# ------------------------------------------------------------------------------------------ eval --tasks, --log-level

EVAL_DATA = os.path.join(ROOT, "tests", "data", "eval")


def test_eval_several_tasks_with_lmms_eval_names(files, tmp_path, capsys, monkeypatch):
    loads = []
    real = cli.eval_command.load_model
    monkeypatch.setattr(cli.eval_command, "load_model", lambda args: loads.append(1) or real(args))
    argv = ["eval", "--model", files["model"], "--tasks", "vqav2_val,textvqa_val", "--limit", "2",
            "--data", os.path.join(EVAL_DATA, "vqav2.jsonl"), "--data", os.path.join(EVAL_DATA, "textvqa.parquet"),
            "--max-new-tokens", "2", "--batch-size", "2", "--output", str(tmp_path)]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "| vqav2 | accuracy |" in out and "| textvqa | accuracy |" in out
    summary = out[out.index("## all tasks (2)"):].splitlines()
    assert summary[4].startswith("| vqav2 | accuracy |") and summary[5].startswith("| textvqa | accuracy |")
    assert "eval: vqav2: 2 items" in err and "eval: textvqa: 2 items" in err
    assert loads == [1]  # one model for both tasks
    for task in ("vqav2", "textvqa"):
        assert json.loads((tmp_path / task / "results.json").read_text())["n"] == 2
    # TASK=PATH in any order, a spec naming its own data and the old --task together; all resumed: no load
    argv = ["eval", "--model", files["model"], "--tasks", "textvqa,vqav2", "--task", "vqav2_val", "--limit", "2",
            "--data", "vqav2=" + os.path.join(EVAL_DATA, "vqav2.jsonl"),
            "--data", "textvqa_val=" + os.path.join(EVAL_DATA, "textvqa.parquet"),
            "--max-new-tokens", "2", "--output", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert loads == [1] and out.index("| textvqa | accuracy |") < out.index("| vqav2 | accuracy |")
    assert "## all tasks (2)" in out and out.count("## vqav2:") == 1  # vqav2 and vqav2_val are one task
    argv = ["eval", "--model", files["model"], "--tasks", f"{os.path.join(EVAL_DATA, 'custom.yaml')},vqav2",
            "--data", os.path.join(EVAL_DATA, "vqav2.jsonl"), "--limit", "1", "--max-new-tokens", "2",
            "--output", str(tmp_path / "spec")]
    assert cli.main(argv) == 0
    assert (tmp_path / "spec" / "custom" / "results.json").is_file()
    assert (tmp_path / "spec" / "vqav2" / "results.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "vqav2_test"], "no public answers"),
    (["--tasks", "vqav2,,chartqa"], "empty name"),
    (["--tasks", ""], "empty name"),
    ([], "no task given"),
    (["--tasks", "vqav2,textvqa", "--data", "a.jsonl"], "1 --data path(s) for 2 task(s)"),
    (["--tasks", "vqav2,textvqa", "--data", "vqav2=a", "--data", "vqav2_val=b"], "given twice"),
    (["--tasks", "vqav2,nope", "--data", "a", "--data", "b"], "unknown task 'nope'"),
    (["--task", "vqav2", "--data", "a", "--data", "b"], "--data given 2 times for one task"),
])
def test_eval_task_list_errors(files, capsys, extra, message):
    assert cli.main(["eval", "--model", files["model"], *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_log_level_on_every_command(files, capsys, monkeypatch):
    import logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)
    for name in cli.COMMANDS:
        assert cli.main([name, "--help"]) == 0
        assert "--log-level" in capsys.readouterr().out, name
    assert cli.main(["info", files["model"], "--log-level", "DEBUG"]) == 0
    assert root.level == logging.DEBUG
    assert cli.main(["info", files["model"], "--log-level", "loud"]) == 2
    assert "invalid choice" in one_error_line(capsys.readouterr().err)


def test_readme_multi_task_eval_command_parses():
    import re
    import shlex

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    (line,) = re.findall(r"^vlmkit eval .*--tasks .*\\\n.*$", readme, flags=re.M)
    argv = shlex.split(line.replace("\\\n", " "), comments=True)[1:]
    args = cli.build_parser().parse_args(argv)
    tasks = cli.eval_command.task_list(args)
    assert tasks == ["textvqa", "chartqa", "synthetic"]
    assert cli.eval_command.data_for(tasks, args.data) == {"textvqa": "textvqa/validation.parquet",
                                                          "chartqa": "chartqa/test.parquet"}


def test_run_json(capsys):
    if not (api.default_model_path() / "config.json").is_file():
        pytest.skip("the embedded default model is not installed")
    args = ["run", "-i", os.path.join(ROOT, "examples", "shapes.png"), "--max-new-tokens", "4", "Describe the image."]
    assert cli.main(args) == 0
    streamed = capsys.readouterr().out
    assert cli.main(args[:1] + ["--json"] + args[1:]) == 0
    out = json.loads(capsys.readouterr().out)  # one JSON object, nothing else on stdout
    assert out["answer"] + "\n" == streamed  # the same answer (greedy) as the stream
    assert out["prompt_tokens"] > 16 and 1 <= out["completion_tokens"] <= 4  # the image alone is 16 tokens
    t = out["timings"]
    assert set(t) == {"load_s", "time_to_first_token_s", "total_s", "tokens_per_s"}
    assert 0 < t["time_to_first_token_s"] <= t["total_s"] and t["load_s"] > 0
    assert t["tokens_per_s"] is None if out["completion_tokens"] == 1 else t["tokens_per_s"] > 0
    assert (out["model"], out["dtype"], out["device"]) == ("default", "float32", "cpu")
