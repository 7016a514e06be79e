"""Numeric options: a number of the right type and finite, or a one-line refusal naming it.

argparse converts command-line text with ``float``, which accepts ``nan`` and ``inf``; a YAML
value reaches the dataclasses unconverted (``learning_rate: true`` is the bool ``True``, which
Python also counts as the integer 1). Neither is a setting anyone means: a NaN coefficient
compares false with every bound and silently switches a penalty off, an infinite rate fails
only once training has started. These checks run on the parsed options, before anything is
loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any

from fishertune.errors import FishertuneError

__all__ = ["check_number", "check_numbers", "number_fields"]


@functools.cache
def number_fields(cls: type) -> dict[str, tuple[type, bool]]:
    """``{field: (int or float, optional)}`` for the dataclass fields typed ``int`` or ``float``
    (``float`` fields take integers too), optional when ``None`` is allowed."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name, f.type)
        args = set(typing.get_args(hint)) or {hint}
        kinds = args - {type(None)}
        if kinds and kinds <= {int, float}:
            found[f.name] = (float if float in kinds else int, type(None) in args)
    return found


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def check_number(name: str, value: Any, kind: type, optional: bool) -> Any:
    """``value`` as the option ``name`` takes it (text converted as argparse would); raise
    :class:`FishertuneError` (``"NAME must be ..., got VALUE"``) for a bool, a list, a
    mapping, ``None`` where it is not allowed, text that is not a number, or a non-finite float.
    """
    if value is None and optional:
        return None
    number: Any = value
    if isinstance(value, str):
        try:
            number = kind(value)
        except ValueError:
            number = None
    wanted = "an integer" if kind is int else "a number"
    allowed = int if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(number, allowed):
        raise FishertuneError(f"{name} must be {wanted}, got {_shown(value)}")
    if not math.isfinite(number):
        raise FishertuneError(f"{name} must be a finite number, got {_shown(value)}")
    return number


def check_numbers(options: Any) -> None:
    """:func:`check_number` on every ``int`` / ``float`` field of the dataclass ``options``."""
    for name, (kind, optional) in number_fields(type(options)).items():
        check_number(name, getattr(options, name), kind, optional)
