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

__all__ = ["check_number", "check_numbers", "check_ranges", "number_fields", "yaml_number_form"]


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


_SEED = (0, 2**32 - 1, True)  # numpy's seeds, which transformers' set_seed also sets
_UNIT = (0, 1, False)  # torch's Adam betas
_NON_NEGATIVE = (0, None, True)
# option: (low, high or None, high included); low is always included. What torch, numpy or the
# data loader accept only when they are used, minutes into a run, or a run record later.
RANGES: dict[str, tuple[float, float | None, bool]] = {
    "seed": _SEED,
    "data_seed": _SEED,
    "dataset_subsample_seed": _SEED,
    "adam_beta1": _UNIT,
    "adam_beta2": _UNIT,
    "adam_epsilon": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "dataloader_num_workers": _NON_NEGATIVE,
}


def check_ranges(options: Any) -> None:
    """Refuse, one line naming the option, the values of :data:`RANGES` outside their range,
    and option combinations the libraries accept here but fail on later."""
    for name, (low, high, closed) in RANGES.items():
        value = getattr(options, name, None)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if high is None:
            if value < low:
                raise FishertuneError(f"{name} must be >= {low}, got {value}")
        elif value < low or value > high or (value == high and not closed):
            shown = f"[{low}, {high}]" if closed else f"[{low}, {high})"
            raise FishertuneError(f"{name} must be in {shown}, got {value}")
    limit = getattr(options, "divergence_max_ce", None)
    if limit is not None and limit < 0:
        raise FishertuneError(f"divergence_max_ce must be >= 0 (0: no check), got {limit}")
    strategy = getattr(options, "save_strategy", None)
    strategy = getattr(strategy, "value", strategy)  # an enum once transformers has run
    steps = getattr(options, "save_steps", None)
    # transformers takes save_steps 0 and divides by it at the first save
    if strategy == "steps" and steps is not None and steps <= 0:
        raise FishertuneError(f"save_steps must be > 0 with save_strategy=steps, got {steps}")
    width, heads = (
        getattr(options, "tiny_hidden_size", None),
        getattr(options, "tiny_num_heads", None),
    )
    if width and heads and width > 0 and heads > 0 and width % heads:
        # the attention splits the width into equal heads: the model cannot be built
        raise FishertuneError(
            f"tiny_hidden_size {width} must be a multiple of tiny_num_heads {heads}"
        )


def yaml_number_form(name: str, kind: type, node: Any) -> None:
    """Refuse a YAML number that is not written as one in decimal: quoted text for an integer
    option (``'5'``), and YAML 1.1's hexadecimal, octal (``010`` is 8), ``_``-grouped or
    sexagesimal integers, which PyYAML reads as integers of another value than they show."""
    import re

    import yaml

    if not isinstance(node, yaml.ScalarNode):
        return
    text = node.value
    if kind is int and node.style in ("'", '"'):
        raise FishertuneError(
            f"{name} must be an integer, got the text {text!r} (remove the quotes)"
        )
    if node.tag == "tag:yaml.org,2002:int" and not re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", text):
        wanted = "a decimal integer" if kind is int else "a decimal number"
        raise FishertuneError(f"{name} must be {wanted}, got {text}")
