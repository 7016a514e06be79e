"""Tables and plots of an experiment: mean ± std over seeds, best per column, training curves.

The aggregation (:func:`aggregate`) is a pure function of run records, so it is tested on
synthetic ones; reading run folders (:func:`load_run_records`) and drawing (:func:`plot_*`) are
kept apart from it.

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

from fishertune.files import SPEC_FILE, RunFolder

__all__ = [
    "CURVE_KEYS",
    "Cell",
    "RunRecord",
    "Table",
    "aggregate",
    "curve_panels",
    "default_metrics",
    "format_markdown",
    "load_run_records",
    "mean_std",
    "metric_directions",
    "plot_benchmarks",
    "plot_training_curves",
    "write_csv",
    "write_report",
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


def _finite(value: Any) -> bool:
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
            if _finite(value):
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


def load_run_records(runs_dir: str | Path, names: Sequence[str] | None = None) -> list[RunRecord]:
    """Read every run folder under ``runs_dir`` (or the named ones, in that order).

    A run folder holds ``fishertune_experiment.json`` (name, method, ablation, seed), once
    trained ``model/fishertune_run.json`` and ``model/trainer_state.json``, and once evaluated
    ``evaluation.json``. Metrics from any ``metrics_*.json`` file there
    (``{"metrics": {...}, "higher_is_better": {...}}`` or a flat mapping, e.g. judge scores added
    by hand) are merged in. Folders without a readable settings file are left out.
    """
    runs_dir = Path(runs_dir)
    if names is None:
        children = runs_dir.iterdir() if runs_dir.is_dir() else []
        folders = sorted(p for p in children if (p / SPEC_FILE).is_file())
    else:
        folders = [runs_dir / name for name in names]
    records = []
    for path in folders:
        folder = RunFolder(path)
        spec = folder.spec
        if spec is None or not isinstance(spec.get("name"), str):
            continue
        run = folder.run_record or {}
        evaluation = folder.evaluation
        state = folder.trainer_state or {}
        record = RunRecord(
            name=spec["name"],
            method=spec["method"],
            ablation=spec.get("ablation"),
            seed=spec.get("seed"),
            log_history=list(state.get("log_history", [])),
            wall_time_s=run.get("wall_time_s"),
        )
        sources = [evaluation, *folder.extra_metrics()]
        for source in sources:
            if not isinstance(source, dict):
                continue
            metrics = source.get("metrics", source)
            if isinstance(metrics, dict):
                record.metrics.update({k: float(v) for k, v in metrics.items() if _finite(v)})
            directions = source.get("higher_is_better")
            if isinstance(directions, dict):
                record.higher_is_better.update(
                    {k: v for k, v in directions.items() if isinstance(v, bool)}
                )
        if run.get("status") != "completed":
            record.status = "incomplete"
        elif evaluation is None:
            record.status = "trained"
        records.append(record)
    return records


def _series(history: list[dict[str, Any]], key: str) -> dict[float, float]:
    return {
        float(entry["step"]): float(entry[key])
        for entry in history
        if "step" in entry and _finite(entry.get(key))
    }


def _band(per_seed: list[dict[float, float]]) -> tuple[list[float], list[float], list[float]]:
    steps = sorted({step for series in per_seed for step in series})
    means, stds = [], []
    for step in steps:
        cell = mean_std([series[step] for series in per_seed if step in series])
        means.append(cell.mean)
        stds.append(cell.std or 0.0)
    return steps, means, stds


# log_history keys drawn by plot_training_curves, with their axis labels, in panel order.
CURVE_KEYS: dict[str, str] = {
    "ce_loss": "training CE (without the penalty)",
    "loss": "training loss (CE + coefficient x penalty)",
    "penalty": "penalty R (before the coefficient)",
    "penalty_coef": "penalty coefficient (warm-up)",
    "grad_norm": "gradient norm",
}


def curve_panels(records: Sequence[RunRecord]) -> list[str]:
    """The :data:`CURVE_KEYS` logged (with a finite value) by at least one record."""
    return [
        key for key in CURVE_KEYS if any(_series(record.log_history, key) for record in records)
    ]


def plot_training_curves(
    records: Sequence[RunRecord], path: str | Path, *, title: str | None = None
) -> Path | None:
    """Training curves against the optimizer step: one line per row, ±1 std band over seeds.

    One panel per logged key of :data:`CURVE_KEYS`: CE (``ce_loss``), the total loss, the penalty
    ``R``, its coefficient and the gradient norm. Returns the PNG's path, or ``None`` when no
    record has a log history.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, draws with Agg

    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        if record.log_history:
            groups.setdefault(record.group, []).append(record)
    panels = curve_panels([r for members in groups.values() for r in members])
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = {group: f"C{index % 10}" for index, group in enumerate(groups)}
    for ax, key in zip(axes, panels, strict=False):
        positive = True
        for group, members in groups.items():
            per_seed = [s for s in (_series(r.log_history, key) for r in members) if s]
            if not per_seed:
                continue
            steps, means, stds = _band(per_seed)
            ax.plot(steps, means, color=colors[group], label=f"{group} (n={len(per_seed)})")
            low = [m - s for m, s in zip(means, stds, strict=True)]
            high = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(steps, low, high, color=colors[group], alpha=0.2, linewidth=0)
            positive = positive and min(low) > 0
        ax.set_xlabel("step")
        ax.set_title(CURVE_KEYS[key], fontsize="medium")
        if key == "penalty" and positive:  # spans orders of magnitude early in training
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_benchmarks(table: Table, path: str | Path, *, title: str | None = None) -> Path | None:
    """One bar chart per metric column: a bar per row, error bars ±1 std over seeds."""
    from matplotlib.figure import Figure

    columns = [c for c in table.columns if any(table.cells[r][c] for r in table.rows)]
    if not columns:
        return None
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.5 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, column in zip(axes, columns, strict=False):
        rows = [r for r in table.rows if table.cells[r][column] is not None]
        means = [table.cells[r][column].mean for r in rows]
        errors = [table.cells[r][column].std or 0.0 for r in rows]
        colors = ["tab:orange" if r in table.best.get(column, ()) else "tab:blue" for r in rows]
        ax.bar(range(len(rows)), means, yerr=errors, capsize=4, color=colors)
        ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right", fontsize="small")
        arrow = {True: " (↑)", False: " (↓)", None: ""}[table.directions.get(column)]
        ax.set_title(column + arrow, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    fig.supxlabel(
        "orange: best mean (by the metric's direction); error bars: ±1 std over seeds",
        fontsize="small",
    )
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_report(
    records: Sequence[RunRecord],
    out_dir: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    higher_is_better: Mapping[str, bool] | None = None,
    title: str = "Results",
) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` (and ``ablations.*``) and the PNG plots.

    The main table has the runs without an ablation. The ablation table has, for each method that
    has ablations, its main row followed by its ablation rows, so each ablation reads against its
    reference. Returns the written files by kind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    directions = metric_directions(records, higher_is_better)
    if metrics is None:
        metrics = default_metrics(records)
    main = [r for r in records if r.ablation is None]
    ablated = [r for r in records if r.ablation is not None]
    written: dict[str, Path] = {}
    parts = [f"# {title}\n"]
    skipped = [r.name for r in records if r.status != "completed"]
    if main:
        table = aggregate(main, metrics=metrics, higher_is_better=directions)
        parts.append(format_markdown(table, title="Main results"))
        write_csv(table, out_dir / "results.csv")
        written["results_csv"] = out_dir / "results.csv"
        if (png := plot_benchmarks(table, out_dir / "benchmarks.png", title=title)) is not None:
            written["benchmarks_png"] = png
        curves = plot_training_curves(main, out_dir / "training_curves.png", title=title)
        if curves is not None:
            written["training_curves_png"] = curves
    if ablated:
        ordered: list[RunRecord] = []
        for method in dict.fromkeys(r.method for r in ablated):
            ordered += [r for r in main if r.method == method]
            ordered += [r for r in ablated if r.method == method]
        table = aggregate(ordered, metrics=metrics, higher_is_better=directions)
        parts.append(format_markdown(table, title="Ablations"))
        write_csv(table, out_dir / "ablations.csv")
        written["ablations_csv"] = out_dir / "ablations.csv"
        png = plot_benchmarks(table, out_dir / "ablations.png", title=f"{title}: ablations")
        if png is not None:
            written["ablations_png"] = png
        curves = plot_training_curves(
            ordered, out_dir / "training_curves_ablations.png", title=f"{title}: ablations"
        )
        if curves is not None:
            written["training_curves_ablations_png"] = curves
    if skipped:
        parts.append(
            f"Runs without complete results (left out of the means where a metric is "
            f"missing): {', '.join(skipped)}\n"
        )
    (out_dir / "results.md").write_text("\n".join(parts))
    written["results_md"] = out_dir / "results.md"
    return written
