"""The ``measure:`` block of an experiment file: ``fishertune analyze``'s own options by flag
name, checked by its parser and its own checks (the stage is ``fishertune analyze --record``,
:func:`fishertune.experiments.commands.measure_command`), and ``seeds``; and what a stored entry
of it means (:func:`measure_options`, through which :func:`fishertune.experiments.stages.
canonical_block` compares entries)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.experiments.blocks import StageFlags, stage_flags_block
from fishertune.experiments.fields import field_error, mapping, seed_list

__all__ = [
    "MEASURE_ALIASES",
    "MEASURE_PROGRAM",
    "MEASURE_SET_BY_GRID",
    "MEASURE_STAGE_FLAGS",
    "MEASURE_UNRECORDED",
    "MeasureFlags",
    "measure_block",
    "measure_options",
]

# where a stored entry's values are said to come from in an error (never shown: caught)
STORED = Path("fishertune_experiment.json")

# what a stored measure: entry holds under "program" since the stage is `fishertune analyze`;
# entries without it were written for the stage's former program (stages.canonical_block)
MEASURE_PROGRAM = "analyze"


@dataclass(frozen=True)
class MeasureFlags(StageFlags):
    """The ``measure:`` block: options of ``fishertune analyze`` (its ``build_parser``), run with
    ``--record`` on each measured run's model, and ``seeds``, the grid's own key: measure only
    the runs of these training seeds (and the base); ``None``: every run."""

    seeds: tuple[int, ...] | None = None

    @property
    def stored(self) -> dict[str, Any]:
        seeds = {} if self.seeds is None else {"seeds": list(self.seeds)}
        return {"program": MEASURE_PROGRAM, **self.flags, **seeds}

    def measures(self, seed: int, *, base: bool = False) -> bool:
        """Whether a run of training seed ``seed`` (or the base) gets a measure stage."""
        return base or self.seeds is None or seed in self.seeds


# `fishertune analyze`'s options that the grid gives each run (commands.measure_command)
MEASURE_SET_BY_GRID = ("model", "record", "output")
# block keys read under analyze's name: the stage's former program called --data --dataset
MEASURE_ALIASES = {"dataset": "data"}
# what the stage gives analyze unless the block says otherwise, stored with the block's flags:
# float32, as the stage always measured (analyze's auto is bfloat16 on a GPU, whose rounding
# the runs' differences in Tr(H_X) would drown in); one alpha, two noise pairs and no progress
# bar, since curvature.json holds no noise increase (analyze's 4 alphas x 16 pairs tripled the
# stage's time on the tiny preset's model)
MEASURE_STAGE_FLAGS: dict[str, Any] = {
    "dtype": "float32",
    "alphas": "1",
    "noise_samples": 2,
    "no_progress": True,
}
# analyze's options that curvature.json does not depend on (the noise increase and how it is
# drawn, the target alpha, the progress bar, the device): a change of them redoes nothing
MEASURE_UNRECORDED = (
    "alphas",
    "noise_samples",
    "length_mode",
    "noise",
    "target_noise_ratio",
    "no_progress",
    "device",
)


def _measure_parser() -> argparse.ArgumentParser:
    from fishertune.analysis.options import build_parser

    return build_parser()


def _measure_checked(path: Path, args: argparse.Namespace) -> None:
    """analyze's own checks of its options (sizes, alphas, splits), with the record the stage
    asks for: a one-line error naming the key (a size) or the block."""
    from fishertune.analysis.options import SIZE_MINIMUMS, check_arguments

    for name, low in SIZE_MINIMUMS.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise field_error(path, f"measure.{name}", f"expected an integer >= {low}, got {value}")
    try:
        check_arguments(argparse.Namespace(**{**vars(args), "record": "-"}))
    except FishertuneError as err:
        raise field_error(path, "measure", str(err)) from None


def _measure_aliased(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The block's keys under analyze's names (``dataset`` -> ``data``), in their order."""
    for alias, name in MEASURE_ALIASES.items():
        if alias in raw and name in raw:
            raise field_error(path, f"measure.{alias}", f"the same option as measure.{name}")
    return {MEASURE_ALIASES.get(key, key): item for key, item in raw.items()}


def measure_block(path: Path, value: Any) -> MeasureFlags | None:
    """The ``measure:`` block (``None``: no measure stage), checked by ``fishertune analyze``'s
    own parser, its defaults where left out (but :data:`MEASURE_STAGE_FLAGS`); ``data``
    (``dataset``) left out measures each run's training data, read as it was."""
    if value is None:
        return None
    raw = {**MEASURE_STAGE_FLAGS, **_measure_aliased(path, mapping(path, "measure", value))}
    spec = stage_flags_block(
        path, "measure", raw, _measure_parser(), set_by_grid=MEASURE_SET_BY_GRID, own=("seeds",)
    )
    _measure_checked(path, spec.args)
    seeds = seed_list(path, "measure.seeds", raw["seeds"]) if "seeds" in raw else None
    return MeasureFlags(**{f.name: getattr(spec, f.name) for f in fields(spec)}, seeds=seeds)


def measure_options(flags: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a measurement with these ``measure:`` flags records, resolved by ``fishertune
    analyze``'s parser: every option's value (analyze's default where not given; ``data``
    ``None`` where the run's training data is measured; ``fisher_draws`` resolved to
    ``probes`` where unset), but the grid's and :data:`MEASURE_UNRECORDED`. ``None``: flags the
    parser refuses (an entry written by another version)."""
    try:
        spec = stage_flags_block(STORED, "measure", dict(flags), _measure_parser(), set_by_grid=())
    except FishertuneError:
        return None
    args = vars(spec.args)
    if "data" not in flags:
        args["data"] = None
    if args["fisher_draws"] is None:
        args["fisher_draws"] = args["probes"]
    dropped = {*MEASURE_SET_BY_GRID, *MEASURE_UNRECORDED}
    return {key: item for key, item in args.items() if key not in dropped}
