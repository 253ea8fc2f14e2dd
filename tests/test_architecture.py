"""The layout of docs/ARCHITECTURE.md holds: imports point one way, no import cycle (imports inside functions
count), no oversized module, and every file of the package is listed in the document."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vlmkit"

# Left to right: a module may import from its own package or from a layer to its left.
LAYERS = [
    {"config", "machine", "hardware", "allocator", "plots"},
    {"distributed"},
    {"models"},
    {"checkpoints", "processing"},
    {"data", "generation"},
    {"api"},
    {"image_tasks", "serve", "eval", "train", "benchmark"},
    {"cli"},
    {"__init__", "__main__"},
]
# Siblings that may import one way: processing reads GGUF metadata and configs through checkpoints; training runs
# an eval task between steps; hardware decides from what the torch-free machine module reads.
ONE_WAY = {("processing", "checkpoints"), ("train", "eval"), ("hardware", "machine")}
MAX_LINES = 500


def _layer(top: str) -> int:
    return next(i for i, group in enumerate(LAYERS) if top in group)


def _modules() -> dict:
    """module name -> path, for every file of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set:
    """The package modules `name` imports, anywhere in the file (functions included)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            else:
                base = []
            stem = base + (node.module.split(".") if node.module else [])
            targets = [stem + [alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name.split(".") for alias in node.names]
        for parts in targets:
            while parts and ".".join(parts) not in modules:
                parts = parts[:-1]
            if parts and parts[0] == "vlmkit" and ".".join(parts) != name:
                out.add(".".join(parts))
    return out


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_point_one_way():
    wrong = []
    for name, targets in _graph().items():
        for target in targets:
            a, b = _top(name), _top(target)
            if a == b or (a, b) in ONE_WAY or target == "vlmkit":
                continue
            if _layer(b) >= _layer(a):
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the arrows of docs/ARCHITECTURE.md:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph = _graph()
    # Tarjan's strongly connected components; any component of more than one module is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package __init__ importing its own submodules is not a cycle of concerns
            component = [c for c in component if not any(o.startswith(c + ".") for o in component)]
            if len(component) > 1:
                cycles.append(" <-> ".join(sorted(component)))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_is_oversized():
    big = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_architecture_lists_every_file():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "data" and len(rel.parts) > 2:  # listed as the synthetic/ folder with its files
            if f"`{rel.parts[1]}/`" not in doc:
                missing.append(str(rel))
            continue
        if f"`{path.name}`" not in doc:
            missing.append(str(rel))
    assert not missing, "files docs/ARCHITECTURE.md does not list: " + ", ".join(sorted(missing))
