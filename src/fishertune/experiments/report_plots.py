"""The plots of an experiment's report: training curves against the step (±1 std band over seeds)
and one bar chart per metric column, drawn with matplotlib's Agg (no GUI backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fishertune.experiments.report_tables import RunRecord, Table, finite, mean_std

__all__ = ["CURVE_KEYS", "curve_panels", "plot_benchmarks", "plot_training_curves"]


def _series(history: list[dict[str, Any]], key: str) -> dict[float, float]:
    return {
        float(entry["step"]): float(entry[key])
        for entry in history
        if "step" in entry and finite(entry.get(key))
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


def _panels(count: int, size: tuple[float, float]) -> tuple[Any, Any]:
    """A figure with ``count`` panels of ``size`` inches, three to a row, and its axes, flat."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, draws with Agg

    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def _save(fig: Any, unused: Any, title: str | None, path: str | Path) -> Path:
    """Hide the ``unused`` panels, title the figure and write it to ``path``."""
    for ax in unused:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_training_curves(
    records: Sequence[RunRecord], path: str | Path, *, title: str | None = None
) -> Path | None:
    """Training curves against the optimizer step: one line per row, ±1 std band over seeds.

    One panel per logged key of :data:`CURVE_KEYS`: CE (``ce_loss``), the total loss, the penalty
    ``R``, its coefficient and the gradient norm. Returns the PNG's path, or ``None`` when no
    record has a log history.
    """
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        if record.log_history:
            groups.setdefault(record.group, []).append(record)
    panels = curve_panels([r for members in groups.values() for r in members])
    if not panels:
        return None
    fig, axes = _panels(len(panels), (5.5, 3.8))
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
    return _save(fig, axes[len(panels) :], title, path)


def plot_benchmarks(table: Table, path: str | Path, *, title: str | None = None) -> Path | None:
    """One bar chart per metric column: a bar per row, error bars ±1 std over seeds."""
    columns = [c for c in table.columns if any(table.cells[r][c] for r in table.rows)]
    if not columns:
        return None
    fig, axes = _panels(len(columns), (4.5, 3.5))
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
    fig.supxlabel(
        "orange: best mean (by the metric's direction); error bars: ±1 std over seeds",
        fontsize="small",
    )
    return _save(fig, axes[len(columns) :], title, path)
