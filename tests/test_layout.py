"""The size of the pieces of ``src/fishertune``: no module over ``MAX_MODULE_LINES`` lines and no
function or method over ``MAX_FUNCTION_LINES`` lines (a long one is split by what it does), save
the entries of the allow-lists below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fishertune"

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 100

# Modules over the limit, each with its size when it was listed: a listed module may not grow
# past its number (lower the number when it shrinks), and its entry goes once it is within the
# limit. Nothing is added here: a module that outgrows the limit is split.
LONG_MODULES: dict[str, int] = {}

# Functions over the limit ("module.py:qualified.name" -> lines), under the same rule.
LONG_FUNCTIONS: dict[str, int] = {}


def _modules() -> dict[str, str]:
    """Each module's source, by its path relative to the package."""
    return {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def module_lengths(sources: dict[str, str]) -> dict[str, int]:
    """Lines of each module (what ``wc -l`` counts for a file that ends with a newline)."""
    return {name: len(text.splitlines()) for name, text in sources.items()}


def function_lengths(sources: dict[str, str]) -> dict[str, int]:
    """Lines of each function and method, decorators left out, nested ones counted on their own
    too: ``{"module.py:Class.method": lines}``."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, module: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    assert child.end_lineno is not None
                    lengths[f"{module}:{name}"] = child.end_lineno - child.lineno + 1
                visit(child, module, f"{name}.")
            else:
                visit(child, module, prefix)

    for module, text in sources.items():
        visit(ast.parse(text), module, "")
    return lengths


def _over(lengths: dict[str, int], limit: int, allowed: dict[str, int], what: str) -> list[str]:
    """The faults of ``lengths`` against ``limit`` and its allow-list, one line each."""
    faults = []
    for name, lines in sorted(lengths.items()):
        if lines > allowed.get(name, limit):
            cap = f"its allow-listed {allowed[name]}" if name in allowed else f"{limit}"
            faults.append(f"{what} {name} has {lines} lines, over {cap}: split it")
    for name in sorted(allowed):
        if name not in lengths:
            faults.append(f"allow-listed {what} {name} is gone: remove its entry")
        elif lengths[name] <= limit:
            faults.append(f"allow-listed {what} {name} is within {limit} lines: remove its entry")
    return faults


def test_no_module_is_over_the_limit() -> None:
    faults = _over(module_lengths(_modules()), MAX_MODULE_LINES, LONG_MODULES, "module")
    assert not faults, "\n".join(faults)


def test_no_function_is_over_the_limit() -> None:
    faults = _over(function_lengths(_modules()), MAX_FUNCTION_LINES, LONG_FUNCTIONS, "function")
    assert not faults, "\n".join(faults)


def test_the_measures_count_what_they_say() -> None:
    source = '''"""doc"""


class A:
    @property
    def one(self):
        return 1

    def two(self):
        def inner():
            return 2

        return inner()


async def three():
    return 3
'''
    assert module_lengths({"m.py": source}) == {"m.py": 17}
    assert function_lengths({"m.py": source}) == {
        "m.py:A.one": 2,
        "m.py:A.two": 5,
        "m.py:A.two.inner": 2,
        "m.py:three": 2,
    }


@pytest.mark.parametrize(
    ("lengths", "allowed", "fault"),
    [
        ({"a.py": 11}, {}, "module a.py has 11 lines, over 10: split it"),
        ({"a.py": 21}, {"a.py": 20}, "module a.py has 21 lines, over its allow-listed 20"),
        ({"a.py": 10}, {"a.py": 20}, "allow-listed module a.py is within 10 lines"),
        ({}, {"a.py": 20}, "allow-listed module a.py is gone"),
    ],
)
def test_faults_are_found(lengths: dict[str, int], allowed: dict[str, int], fault: str) -> None:
    assert [f for f in _over(lengths, 10, allowed, "module") if fault in f] != []
    assert _over({"a.py": 10, "b.py": 20}, 10, {"b.py": 20}, "module") == []
    assert _over({"b.py": 19}, 10, {"b.py": 20}, "module") == []  # shrinking is allowed
