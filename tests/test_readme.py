"""The README's examples run as written and give the right answers on examples/ with the default model: the Python
session of "Use" (as a doctest), and the curl and OpenAI-client examples of "Serve" against a live server."""

import contextlib
import doctest
import io
import json
import os
import re
import shutil
import subprocess

import pytest

import vlmkit
from vlmkit.serve import create_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_use_section_runs_as_a_doctest(tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(os.path.join(ROOT, "examples"))
    monkeypatch.chdir(tmp_path)  # vlmkit.save(m, "out-folder") writes here
    (session,) = blocks("pycon")
    test = doctest.DocTestParser().get_doctest(session, {}, "README.md: Use", "README.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    out = io.StringIO()
    result = runner.run(test, out=out.write)
    assert result.failed == 0, out.getvalue()
    assert result.attempted >= 10


@pytest.fixture(scope="module")
def server():
    from test_serve import LiveServer

    app = create_app(vlmkit.load("default"), model_name="vlmkit-default", ui=False)
    with LiveServer(app) as live:
        yield live


def curl_commands() -> list[str]:
    commands = []
    for block in blocks("bash"):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("curl http://127.0.0.1:8000/"):
                end = i + 1
                while end < len(lines) and lines[end] and not lines[end].startswith(("#", "curl", "vlmkit")):
                    end += 1
                commands.append("\n".join(lines[i:end]))
    return commands


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples_answer_right(server):
    commands = curl_commands()
    assert len(commands) == 2
    answers = []
    for command in commands:
        run = subprocess.run(["bash", "-c", command.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        reply = json.loads(run.stdout)
        assert "error" not in reply, reply
        answers.append(reply["choices"][0]["message"]["content"] if "choices" in reply
                       else reply["message"]["content"])
    assert [a.strip().lower() for a in answers] == ["red", "5"]


def test_openai_client_example_answers_right(server, monkeypatch):
    pytest.importorskip("openai")
    (code,) = [b for b in blocks("python") if "from openai import OpenAI" in b]
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}"), {})
    first, streamed = out.getvalue().split("\n", 1)
    assert first.startswith("red CompletionUsage(") and streamed.strip() == "red"


def test_in_process_server_example_builds_an_app():
    from fastapi.testclient import TestClient

    (code,) = [b for b in blocks("python") if "from vlmkit.serve import create_app" in b]
    scope = {}
    exec(code, scope)
    with TestClient(scope["app"]) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "my-model"
