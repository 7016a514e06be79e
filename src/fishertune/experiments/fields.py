"""The experiment file's field checks: every fault is one line naming the file and the field
(``FILE: methods.a.seed: ...``); relative paths resolve as the module docstring of
:mod:`fishertune.experiments.experiment_file` says."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError

__all__ = [
    "RESERVED_OVERRIDES",
    "checked_name",
    "field_error",
    "mapping",
    "non_negative_int",
    "overrides_block",
    "resolve_path",
    "seed_list",
    "str_list",
]

# Keys the grid sets itself; a method or ablation giving them would be silently overridden.
RESERVED_OVERRIDES = ("output_dir", "seed", "config")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def field_error(path: Path, where: str, message: str) -> FishertuneError:
    return FishertuneError(f"{path}: {where}: {message}")


def resolve_path(
    path: Path, where: str, value: Any, *, must_exist: bool = True, preset: str | None = None
) -> Path:
    """A path named in the experiment file; ``preset`` (a kind of :mod:`fishertune.presets`)
    lets the value also be a shipped preset's name (``tiny``, ``paper/token-f``,
    ``accelerate/deepspeed_zero3``), so the shipped grids work from an installed package."""
    if not isinstance(value, str) or not value:
        raise field_error(path, where, f"expected a path string, got {value!r}")
    candidate = Path(value).expanduser()
    exists = Path.is_file if preset else Path.exists
    if candidate.is_absolute():
        if must_exist and not exists(candidate):
            raise field_error(path, where, f"{candidate} does not exist")
        return candidate
    if not must_exist:
        return Path.cwd() / candidate
    here = path.resolve().parent
    for root in (Path.cwd(), here):
        if exists(root / candidate):
            return (root / candidate).resolve()
    if preset is not None:
        from fishertune.presets import preset_path

        found = preset_path(value, preset)
        if found is not None:
            return found.resolve()
    # Grids kept inside a checkout may name files relative to the repository root: try the
    # experiment file's parent folders too.
    for root in here.parents:
        if exists(root / candidate):
            return (root / candidate).resolve()
    known = ""
    if preset is not None:
        from fishertune.presets import preset_names

        known = f"; {preset} presets: {', '.join(preset_names(preset))}"
    raise field_error(
        path,
        where,
        f"{value} not found (looked in the current directory and above {path.parent}){known}",
    )


def mapping(
    path: Path, where: str, value: Any, allowed: Sequence[str] | None = None
) -> dict[str, Any]:
    """``value`` as a mapping with string keys (``None``: empty), only ``allowed`` ones if given."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise field_error(path, where, f"expected a mapping, got {type(value).__name__} {value!r}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise field_error(path, where, f"keys must be strings, got {bad!r}")
    unknown = sorted(set(value) - set(allowed)) if allowed is not None else []
    if unknown:
        raise field_error(
            path, where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    return dict(value)


def checked_name(path: Path, where: str, name: str) -> str:
    if not NAME.match(name):
        raise field_error(
            path,
            where,
            f"name {name!r} must start with a letter or digit and use only "
            "letters, digits and _ . + - (it becomes a folder name)",
        )
    return name


def overrides_block(path: Path, where: str, value: Any) -> dict[str, Any]:
    overrides = mapping(path, where, value)
    for key, item in overrides.items():
        if key in RESERVED_OVERRIDES:
            raise field_error(path, f"{where}.{key}", "set by the grid for every run; remove it")
        if item is None:
            raise field_error(
                path,
                f"{where}.{key}",
                "null cannot be passed on a command line; remove the key "
                "to keep the preset's value",
            )
        if isinstance(item, Mapping) and not item:
            raise field_error(path, f"{where}.{key}", "empty mapping")
    return overrides


def seed_list(path: Path, where: str, value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        raise field_error(path, where, f"expected a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise field_error(path, where, f"seeds repeat: {value!r}")
    return tuple(value)


def non_negative_int(path: Path, where: str, value: Any, *, allow_fraction: bool = False) -> Any:
    if value is None:
        return None
    if allow_fraction and isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise field_error(path, where, f"expected a non-negative integer, got {value!r}")
    return value


def str_list(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise field_error(path, where, f"expected a list of strings, got {value!r}")
    return tuple(value)
