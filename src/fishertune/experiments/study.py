"""Studies: an analysis with its own data and its own report, plugged into the runner by name.

A study is a package beside the library (``fishertune/studies/NAME/``) with one object that
implements :class:`Study`. An experiment file names it in ``report: {study: NAME, ...}``, or, to
prepare the study's data without its report, in ``study_data: {study: NAME, ...}``. Then

* the file's ``study_data:`` block and the report's keys other than ``metrics`` and ``study`` are
  the study's, checked by :meth:`Study.parse_block` (one-line errors naming the field);
* both launchers write the study's data before any run starts, under the runner's lock
  (:meth:`Study.prepare_data`, through
  :func:`fishertune.experiments.stages.prepare_grid_data`); ``"{study_data}"`` in the file's
  run blocks names the data's folder;
* ``fishertune experiment`` writes the study's report beside the grid's
  (:meth:`Study.write_report`).

A second study adds its package and one line to :data:`STUDIES`, and changes no other generic
module. The runner imports a study only once a file names it, through the string registered
here: no module of ``experiments/`` imports ``fishertune.studies`` (CONTRIBUTING.md's layers put
the studies above the experiments).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fishertune.experiments.fields import field_error, mapping

__all__ = ["REPORT_KEYS", "STUDIES", "Study", "StudyBlocks", "StudyData", "find_study"]

# study name -> "module:object" of its Study
STUDIES: dict[str, str] = {
    "equivalence": "fishertune.studies.equivalence.study:STUDY",
}
# the report: block's own keys; the others belong to the study it names
REPORT_KEYS = ("metrics", "study")


class StudyData(Protocol):
    """A study's parsed ``study_data:`` block."""

    @property
    def out(self) -> Path:
        """The folder the data goes into (what ``"{study_data}"`` names)."""
        ...

    @property
    def written(self) -> bool:
        """Whether the data is in ``out`` already (the runs' data can be checked now)."""
        ...


@dataclass(frozen=True)
class StudyBlocks:
    """What :meth:`Study.parse_block` found: the data block (``None``: the file has none) and the
    report's options (``None``: the file asks for no report of the study)."""

    data: StudyData | None
    report: dict[str, Any] | None


class Study(Protocol):
    """A study as the runner sees it."""

    def parse_block(
        self,
        path: Path,
        raw: Mapping[str, Any],
        *,
        output_dir: Path,
        report: Mapping[str, Any] | None,
    ) -> StudyBlocks:
        """Check the study's blocks of the experiment file ``path``: ``raw["study_data"]``
        (without its ``study`` key; a relative ``out`` lies in ``output_dir``) and ``report``,
        the report block's keys other than :data:`REPORT_KEYS` (``None``: the file asks for no
        report of the study). ``raw`` is the whole file, for a study that needs other blocks.

        Raises:
            FishertuneError: one line naming the field at fault.
        """
        ...

    def prepare_data(
        self, config: Any, log: Callable[[str], None], *, dry_run: bool = False
    ) -> bool:
        """Write ``config.study_data``'s data before the runs (nothing when it is there with
        the same settings; with ``dry_run`` only say whether it would be); returns whether data
        was written. ``config`` is the :class:`~fishertune.experiments.grid.ExperimentConfig`
        (typed ``Any``: ``grid`` imports this module)."""
        ...

    def write_report(
        self,
        runs_dir: Path,
        names: Sequence[str],
        out_dir: Path,
        *,
        title: str,
        options: Mapping[str, Any],
    ) -> dict[str, Path]:
        """Write the study's report on the runs ``names`` of ``runs_dir`` into ``out_dir``;
        returns the written files by kind."""
        ...


def find_study(path: Path, where: str, name: Any) -> Study:
    """The registered study called ``name``; ``where`` is the field that names it.

    Raises:
        FishertuneError: no study has that name.
    """
    target = STUDIES.get(name) if isinstance(name, str) else None
    if target is None:
        raise field_error(path, where, f"{name!r} is not one of {', '.join(STUDIES)}")
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def study_blocks(
    path: Path, raw: Mapping[str, Any], output_dir: Path
) -> tuple[str | None, StudyBlocks]:
    """The study the file names (``report.study``, else ``study_data.study``) and its blocks.

    Raises:
        FishertuneError: an unknown study, two different names, a ``study_data:`` block that
            names no study, or a report key that no named study reads.
    """
    report = mapping(path, "report", raw.get("report"))
    options = {k: v for k, v in report.items() if k not in REPORT_KEYS}
    name, where = report.get("study"), "report.study"
    data = raw.get("study_data")
    if data is not None:
        data = dict(mapping(path, "study_data", data))
        own = data.pop("study", None)
        if own is not None and name is not None and own != name:
            raise field_error(
                path, "study_data.study", f"{own!r} differs from report.study {name!r}"
            )
        if name is None:
            if own is None:
                raise field_error(
                    path, "study_data.study", "missing (the study whose data this is)"
                )
            name, where = own, "study_data.study"
    if name is None:
        if options:
            raise field_error(
                path,
                "report",
                f"unknown key(s) {sorted(options)}; allowed: {list(REPORT_KEYS)}",
            )
        return None, StudyBlocks(data=None, report=None)
    study = find_study(path, where, name)
    asked = options if "study" in report else None
    if asked is None and options:
        raise field_error(
            path, "report", f"{sorted(options)} belong to a study's report: name it (study:)"
        )
    blocks = study.parse_block(
        path, {**raw, "study_data": data}, output_dir=output_dir, report=asked
    )
    return name, blocks
