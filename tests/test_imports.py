"""The import graph of ``src/fishertune``: no circle, and no import that climbs the layers that
CONTRIBUTING.md lists (a module imports only from the rows above its own, or its own row).

Every ``import`` statement counts, those inside functions and under ``TYPE_CHECKING`` too: a
lazy import still ties the two modules together."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# Climbs the layers still hold, each to be removed, never added to.
KNOWN_CLIMBS: set[tuple[str, str]] = set()

# Inside data/, top first: a module imports only from the rows above its own. The reader's
# modules (options .. prepare) come before the tokenizing and loading that use them; formats
# only re-exports the reader's public names; the package's __init__ re-exports the rest.
DATA_LAYERS = [
    "instructions",
    "tasks",
    "builtin",
    "dataset_info",
    "tokenizer",
    "options",
    "normalize",
    "json_text",
    "json_records",
    "readers",
    "prepare",
    "formats",
    "collate",
    "chat",
    "cli",
]

# Private names (``_x``) imported from another module, each to be removed, never added to.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "fishertune").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fishertune modules ``name`` imports (``from package import module`` names the
    module; ``from module import name`` the module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*kept, base] if base else kept)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
    return {t for t in targets if t in modules and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layers() -> list[str]:
    """The rows of CONTRIBUTING's layout, top first: ``penalties``, ``vocab``, ..., ``cli``."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    block = text.split("## Layout", 1)[1].split("```")[1]
    rows = []
    for match in re.finditer(r"^  (\w+)(?:\.py|/)", block, re.M):
        if match.group(1) == "configs":  # package data, and the rows below it are files
            break
        rows.append(match.group(1))
    return rows


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_the_layer_list_names_every_top_level_module() -> None:
    rows = _layers()
    assert rows[:7] == [
        "vocab_chunks", "vocab_pass", "vocab_linear", "vocab", "penalties", "penalty_estimators",
        "penalty_grad",
    ]  # fmt: skip
    assert rows[-1] == "cli"
    top = {name.split(".")[1] for name in _graph() if name.count(".") >= 1}
    # errors is below everything; __main__ is the entry point
    assert top - set(rows) == {"errors", "__main__"}


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle() -> None:
    assert _circles(_graph()) == []


def test_no_import_climbs_a_layer() -> None:
    rows = _layers()

    def row(name: str) -> int | None:
        parts = name.split(".")
        return rows.index(parts[1]) if len(parts) > 1 and parts[1] in rows else None

    climbs = {
        (name, target)
        for name, targets in _graph().items()
        for target in targets
        if row(name) is not None and row(target) is not None and row(target) > row(name)
    }
    assert climbs == KNOWN_CLIMBS


def test_data_modules_import_down_their_own_list() -> None:
    data = {n for n in _modules() if n.startswith("fishertune.data.")}
    assert {n.rsplit(".", 1)[1] for n in data} == set(DATA_LAYERS)

    def row(name: str) -> int | None:
        return DATA_LAYERS.index(name[len("fishertune.data.") :]) if name in data else None

    climbs = {
        (name, target)
        for name, targets in _graph().items()
        for target in targets
        if row(name) is not None and row(target) is not None and row(target) > row(name)
    }
    assert climbs == set()


def test_no_private_name_is_imported_from_another_module() -> None:
    modules = _modules()
    found = set()
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fishertune"):
                found |= {
                    (name, f"{node.module}.{a.name}")
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                }
    assert found == KNOWN_PRIVATE_IMPORTS
