"""The aggregation of an experiment's runs: mean ± std over seeds, best per column, as Markdown
and CSV tables.

:func:`aggregate` is a pure function of run records (:class:`RunRecord`), so it is tested on
synthetic ones; reading run folders (:mod:`fishertune.experiments.report`) and drawing
(:mod:`fishertune.experiments.report_plots`) are kept apart from it.

Layout follows the paper: rows are methods, columns are benchmark metrics, each cell is
``mean ± std`` over seeds (sample standard deviation, ``ddof=1``; a single seed shows the mean
alone), the best mean of each column is in bold (highest or lowest according to the metric's
direction; every tied row is marked), and a column ``n`` gives the number of seeds.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Cell",
    "RunRecord",
    "Table",
    "aggregate",
    "default_metrics",
    "finite",
    "format_markdown",
    "mean_std",
    "metric_directions",
    "write_csv",
]

# Columns left out of default tables: counts and standard errors are not results.
_NOT_REPORTED = re.compile(r"(^|/)(n_test|n_samples)$|stderr")
# Directions of common lm-eval / offline metric names, used when a record does not carry one.
_KNOWN_DIRECTIONS = {
    "acc": True,
    "acc_norm": True,
    "exact_match": True,
    "prompt_level_strict_acc": True,
    "prompt_level_loose_acc": True,
    "inst_level_strict_acc": True,
    "inst_level_loose_acc": True,
    "perplexity": False,
    "val_loss": False,
    "eval_loss": False,
    "word_perplexity": False,
    "byte_perplexity": False,
    "bits_per_byte": False,
}


@dataclass
class RunRecord:
    """What one finished (or partly finished) run left behind.

    Attributes:
        name: the run's name.
        method: method name (a key of the experiment's ``methods``).
        ablation: ablation name or ``None``.
        seed: training seed.
        status: ``completed``, ``trained`` (no evaluation yet) or ``incomplete``.
        metrics: flat ``{"task/metric": value}``.
        higher_is_better: direction of the metrics that declare one.
        log_history: ``trainer_state.json``'s ``log_history``.
        wall_time_s: training wall time from ``fishertune_run.json``.
    """

    name: str
    method: str
    ablation: str | None = None
    seed: int | None = None
    status: str = "completed"
    metrics: dict[str, float] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float | None = None

    @property
    def group(self) -> str:
        """Row label: ``method`` or ``method-ablation``."""
        return self.method if self.ablation is None else f"{self.method}-{self.ablation}"


@dataclass(frozen=True)
class Cell:
    """Aggregate of one metric over one row's seeds; ``std`` is ``None`` for a single value."""

    mean: float
    std: float | None
    n: int


@dataclass
class Table:
    """Aggregated results: ``cells[row][column]`` is a :class:`Cell` or ``None`` (no values).

    Attributes:
        rows: row labels in first-appearance order.
        columns: metric names.
        cells: the aggregates.
        n_runs: number of runs (seeds) per row, counted whether or not a metric is present.
        best: per column, the rows holding the best mean (empty if the direction is unknown).
        directions: per column, ``True`` if higher is better, ``False`` if lower, ``None`` unknown.
        row_info: per row, ``(method, ablation)``.
    """

    rows: list[str]
    columns: list[str]
    cells: dict[str, dict[str, Cell | None]]
    n_runs: dict[str, int]
    best: dict[str, set[str]]
    directions: dict[str, bool | None]
    row_info: dict[str, tuple[str, str | None]] = field(default_factory=dict)


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: Sequence[float]) -> Cell:
    """Mean and sample standard deviation of ``values``, the one ``mean ± std`` of the reports:

    ``mean = sum(v) / n``, ``std = sqrt(sum((v - mean)^2) / (n - 1))`` (``ddof=1``, as papers
    report); ``std`` is ``None`` for a single value, and ``mean`` NaN for none (``n = 0``).
    """
    n = len(values)
    if n == 0:
        return Cell(math.nan, None, 0)
    mean = math.fsum(values) / n
    if n == 1:
        return Cell(mean, None, 1)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Cell(mean, math.sqrt(var), n)


def metric_directions(
    records: Iterable[RunRecord], extra: Mapping[str, bool] | None = None
) -> dict[str, bool]:
    """Merge the directions known for each metric name.

    Sources, later ones winning: common metric names (``acc`` up, ``perplexity`` down), the
    offline scorer's ``METRICS`` (as ``offline/<name>``), the directions stored in each run's
    evaluation file, then ``extra``.
    """
    directions: dict[str, bool] = {}
    names = {name for record in records for name in record.metrics}
    for name in names:
        base = name.rsplit("/", 1)[-1].split(":", 1)[0]
        if base in _KNOWN_DIRECTIONS:
            directions[name] = _KNOWN_DIRECTIONS[base]
    try:
        from fishertune.evaluation.offline import METRICS
    except ImportError:  # the offline scorer is optional for reading lm-eval results
        METRICS = {}
    for name, higher in METRICS.items():
        directions[f"offline/{name}"] = bool(higher)
    for record in records:
        directions.update(record.higher_is_better)
    directions.update(extra or {})
    return directions


def default_metrics(records: Iterable[RunRecord]) -> list[str]:
    """Metric names present in the records, first-appearance order, counts and stderrs left out."""
    seen: dict[str, None] = {}
    for record in records:
        for name in record.metrics:
            if not _NOT_REPORTED.search(name):
                seen.setdefault(name, None)
    return list(seen)


def aggregate(
    records: Sequence[RunRecord],
    *,
    metrics: Sequence[str] | None = None,
    higher_is_better: Mapping[str, bool] | None = None,
    rel_tol: float = 1e-9,
) -> Table:
    """Aggregate run records into a table: one row per ``method[-ablation]``.

    Cell = mean and sample standard deviation (``ddof=1``) of the finite values present; a row
    with no value for a metric gets ``None`` there. The best mean per column is chosen by the
    metric's direction; rows whose means are equal to it within ``rel_tol`` are all marked.

    Args:
        records: runs; their order fixes the rows' order.
        metrics: columns; default :func:`default_metrics`.
        higher_is_better: metric -> direction; metrics missing from it get no best marking.
        rel_tol: relative tolerance of a tie.
    """
    columns = list(metrics) if metrics is not None else default_metrics(records)
    directions = dict(higher_is_better or {})
    rows: list[str] = []
    values: dict[str, dict[str, list[float]]] = {}
    n_runs: dict[str, int] = {}
    row_info: dict[str, tuple[str, str | None]] = {}
    for record in records:
        row = record.group
        if row not in values:
            rows.append(row)
            values[row] = {column: [] for column in columns}
            n_runs[row] = 0
            row_info[row] = (record.method, record.ablation)
        n_runs[row] += 1
        for column in columns:
            value = record.metrics.get(column)
            if finite(value):
                values[row][column].append(float(value))
    cells = {row: {c: (mean_std(v) if v else None) for c, v in values[row].items()} for row in rows}
    best: dict[str, set[str]] = {}
    for column in columns:
        direction = directions.get(column)
        present = {row: cells[row][column].mean for row in rows if cells[row][column] is not None}
        if direction is None or not present:
            best[column] = set()
            continue
        target = max(present.values()) if direction else min(present.values())
        best[column] = {
            row
            for row, mean in present.items()
            if math.isclose(mean, target, rel_tol=rel_tol, abs_tol=1e-12)
        }
    return Table(
        rows=rows,
        columns=columns,
        cells=cells,
        n_runs=n_runs,
        best=best,
        directions={c: directions.get(c) for c in columns},
        row_info=row_info,
    )


def _format_cell(cell: Cell | None, n_runs: int, digits: int) -> str:
    if cell is None:
        return "–"
    text = f"{cell.mean:.{digits}f}"
    if cell.std is not None:
        text += f" ± {cell.std:.{digits}f}"
    if cell.n != n_runs:  # some seeds lack this metric: say over how many the mean is
        text += f" (n={cell.n})"
    return text


def format_markdown(table: Table, *, digits: int = 3, title: str | None = None) -> str:
    """The table as GitHub Markdown: best cells in bold, arrows give each metric's direction."""
    arrows = {True: " ↑", False: " ↓", None: ""}
    header = ["method", "n", *[f"{c}{arrows[table.directions.get(c)]}" for c in table.columns]]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        cells = []
        for column in table.columns:
            text = _format_cell(table.cells[row][column], table.n_runs[row], digits)
            cells.append(f"**{text}**" if row in table.best.get(column, ()) else text)
        lines.append("| " + " | ".join([row, str(table.n_runs[row]), *cells]) + " |")
    unknown = [c for c in table.columns if table.directions.get(c) is None]
    lines.append("")
    lines.append(
        "Mean ± sample std (ddof=1) over n seeds; best mean per column in bold."
        + (f" No best marked for {', '.join(unknown)} (direction unknown)." if unknown else "")
    )
    return "\n".join(lines) + "\n"


def write_csv(table: Table, path: str | Path) -> None:
    """One line per row: row, method, ablation, n, then per metric ``_mean _std _n _best``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["row", "method", "ablation", "n"]
        for column in table.columns:
            header += [f"{column}_mean", f"{column}_std", f"{column}_n", f"{column}_best"]
        writer.writerow(header)
        for row in table.rows:
            method, ablation = table.row_info.get(row, (row, None))
            line: list[Any] = [row, method, ablation or "", table.n_runs[row]]
            for column in table.columns:
                cell = table.cells[row][column]
                if cell is None:
                    line += ["", "", 0, ""]
                else:
                    std = "" if cell.std is None else repr(cell.std)
                    best = int(row in table.best.get(column, ()))
                    line += [repr(cell.mean), std, cell.n, best]
            writer.writerow(line)
