"""The house keeps its shape: pipeline/ imports run one way, from jobs down to config, with no circle;
a sibling imported inside a function says why it is deferred; no module grows past ~500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

# Lower floors never import higher ones; rooms on one floor do not import each other.
FLOORS = {
    "config": 0,
    "errors": 0,
    "cluster": 1,
    "reaper": 1,
    "transforms": 1,
    "models": 1,
    "data": 2,
    "tracking": 2,
    "train": 3,
    "experiments": 4,
}
MAX_LINES = 520


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports(path: Path) -> list[tuple[str, ast.ImportFrom | ast.Import, bool]]:
    """(imported pipeline module, node, at module level) for every import of a pipeline module in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    known = modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            for alias in node.names:  # `from pipeline.data import sample` imports the module pipeline.data.sample
                candidate = f"{node.module}.{alias.name}"
                found.append((candidate if candidate in known else node.module, node, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, node, id(node) in top) for a in node.names if a.name.split(".")[0] == "pipeline"]
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pipeline"


def test_rooms_import_downward_only():
    upward = []
    for name, path in modules().items():
        if room(name) == "pipeline":
            continue
        for target, node, _ in imports(path):
            here, there = room(name), room(target)
            if here != there and there != "pipeline" and FLOORS[there] >= FLOORS[here]:
                upward.append(f"{path.relative_to(ROOT)}:{node.lineno} ({here}) imports {target} ({there})")
    assert not upward, "\n".join(upward)
    assert set(FLOORS) == {room(n) for n in modules()} - {"pipeline"}, "a new room needs its floor here"


def test_no_import_circle():
    graph = {name: {t for t, _, _ in imports(path) if t != name} for name, path in modules().items()}
    # A package's __init__ that re-exports its modules is not a cycle with them.
    graph = {
        n: {t for t in ts if not (n.startswith(t + ".") and modules()[t].name == "__init__.py")}
        for n, ts in graph.items()
    }
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for name in graph:
        if name not in seen:
            visit(name, [name])


def test_imports_inside_functions_say_why_they_are_deferred():
    """A pipeline module imported inside a function hides the real graph; allowed only to defer a heavy or
    optional dependency, which a comment on the line (or the line above) names with `deferred:`."""
    silent = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        for target, node, at_top in imports(path):
            if at_top:
                continue
            said = " ".join(lines[node.lineno - 2 : node.end_lineno])
            if "deferred:" not in said:
                silent.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not silent, "\n".join(silent)


def test_jobs_import_the_library_only_from_the_top():
    for path in sorted((ROOT / "jobs").glob("*.py")):
        for target, node, _ in imports(path):
            assert target in modules(), f"{path.name}:{node.lineno} imports {target}, which does not exist"


def test_no_module_grows_past_500_lines():
    long = {
        str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
