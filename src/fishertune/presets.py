"""Shipped presets, addressed by name: ``fishertune presets`` and the lookup behind ``--config``.

The YAML presets are package data under ``fishertune/configs/`` (a checkout's ``configs/`` is a
link to that folder, so there is one copy). A preset's name is its path under that folder
without ``.yaml``; each command takes the names of its own kind:

- training presets (``fishertune train --config NAME``): ``tiny``, ``paper/token-f``, ...
- experiment grids (``fishertune experiment --config NAME``): ``tiny``, ``tiny-ablations``,
  ``sharegpt-equivalence``,
  ``paper`` (also ``experiments/tiny``)
- accelerate launch configs: ``accelerate/fsdp``, ... (``fishertune presets --path
  accelerate/fsdp`` prints the file for ``accelerate launch --config_file``)

A value that names an existing file is always that file: a path wins over a preset name.

Examples::

    fishertune presets                              # every preset with its first comment line
    fishertune presets --path accelerate/fsdp       # a real file path
    fishertune presets --show tiny > my-tiny.yaml   # a copy to edit
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
from importlib.resources import as_file, files
from pathlib import Path

from fishertune.errors import FishertuneError

__all__ = [
    "KINDS",
    "describe",
    "main",
    "preset_names",
    "preset_path",
    "presets_root",
    "resolve_config",
]

# kind -> (sub-folder of configs/ holding its presets, or "" for the rest; what takes it)
KINDS: dict[str, tuple[str, str]] = {
    "train": ("", "fishertune train --config NAME"),
    "experiment": ("experiments", "fishertune experiment --config NAME"),
    "accelerate": (
        "accelerate",
        "accelerate launch --config_file $(fishertune presets --path NAME)",
    ),
}
_SUFFIXES = (".yaml", ".yml")


@functools.cache
def presets_root() -> Path:
    """The ``configs/`` folder of the installed package, as a real directory.

    ``importlib.resources`` rather than ``__file__``, so presets are found wherever the package
    is installed. For an ordinary install the folder is returned as it is; ``as_file`` extracts
    it when the package is not on a file system (a zipped install, Python 3.12+), for the life of
    the process, because runs launch subprocesses that read the files.
    """
    stack = contextlib.ExitStack()
    atexit.register(stack.close)
    return Path(stack.enter_context(as_file(files("fishertune") / "configs")))


def _all_names() -> list[str]:
    root = presets_root()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _kind_of(name: str) -> str:
    top = name.split("/", 1)[0] if "/" in name else ""
    return next((k for k, (folder, _) in KINDS.items() if folder and folder == top), "train")


def preset_names(kind: str | None = None) -> list[str]:
    """Names of the shipped presets of one kind (as that kind's command takes them), or all of
    them by their path under ``configs/`` when ``kind`` is ``None``."""
    if kind is None:
        return _all_names()
    if kind not in KINDS:
        raise ValueError(f"unknown preset kind {kind!r}; kinds: {', '.join(KINDS)}")
    names = [n for n in _all_names() if _kind_of(n) == kind]
    if kind == "experiment":  # `fishertune experiment --config tiny`
        names = [n.split("/", 1)[1] for n in names]
    return names


def _normalize(value: str) -> str:
    """``configs/tiny.yaml`` and ``tiny.yaml`` name the ``tiny`` preset too (older commands)."""
    name = value.strip().replace("\\", "/")
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.removeprefix("./").removeprefix("configs/")


def preset_path(name: str, kind: str | None = None) -> Path | None:
    """The file of preset ``name`` of ``kind`` (any kind when ``None``), or ``None``."""
    name = _normalize(name)
    if not name or name.startswith("/") or ".." in name.split("/"):
        return None  # names stay inside the presets folder
    root = presets_root()
    candidates = [name]
    if kind is not None and KINDS[kind][0] and not name.startswith(KINDS[kind][0] + "/"):
        candidates.insert(0, f"{KINDS[kind][0]}/{name}")
    for candidate in candidates:
        if kind is not None and _kind_of(candidate) != kind:
            continue
        path = root / f"{candidate}.yaml"
        if path.is_file():
            return path
    return None


def resolve_config(value: str | Path, kind: str) -> Path:
    """A ``--config`` value: an existing file (a path wins), else the preset of that name.

    Raises:
        FishertuneError: naming the value and listing the presets of that kind (and saying so
            when the name is a preset of another kind, e.g. a grid given to ``train``).
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    found = preset_path(str(value), kind)
    if found is not None:
        return found
    message = f"{value}: no such file, and no {kind} preset of that name"
    others = [k for k in KINDS if k != kind and preset_path(str(value), k) is not None]
    if others:
        uses = "; ".join(KINDS[k][1].replace("NAME", str(value)) for k in others)
        message += f" (there is {'a preset' if len(others) == 1 else 'presets'} for: {uses})"
    raise FishertuneError(f"{message}; {kind} presets: {', '.join(preset_names(kind))}")


def describe(path: Path) -> str:
    """A preset's first comment line (its one-line description)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def _listing() -> str:
    lines = []
    for kind, (_, usage) in KINDS.items():
        names = preset_names(kind)
        lines.append(f"{kind} presets ({usage}):")
        width = max(len(n) for n in names)
        for name in names:
            lines.append(f"  {name:<{width}}  {describe(preset_path(name, kind))}")  # type: ignore[arg-type]
        lines.append("")
    lines.append(f"files: {presets_root()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``fishertune presets [--path NAME | --show NAME]``."""
    parser = argparse.ArgumentParser(
        prog="fishertune presets",
        description="List the shipped presets, or print one's file path or contents. NAME is the "
        "preset's path under configs/ without .yaml: tiny, paper/token-f, experiments/tiny, "
        "accelerate/fsdp.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--path", metavar="NAME", help="print the preset's file path")
    group.add_argument("--show", metavar="NAME", help="print the preset's YAML (to copy and edit)")
    args = parser.parse_args(argv)
    name = args.path or args.show
    if name is None:
        print(_listing())
        return 0
    path = preset_path(name)
    if path is None:
        raise FishertuneError(f"{name}: no preset of that name; presets: {', '.join(_all_names())}")
    print(path if args.path else path.read_text(), end="\n" if args.path else "")
    return 0
