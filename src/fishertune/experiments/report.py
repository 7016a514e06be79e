"""The report of an experiment: its run folders read into records (through
:class:`fishertune.files.RunFolder`), then ``results.md``, the CSV tables
(:mod:`fishertune.experiments.report_tables`) and the plots
(:mod:`fishertune.experiments.report_plots`) written into the report folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fishertune.experiments.report_plots import plot_benchmarks, plot_training_curves
from fishertune.experiments.report_tables import (
    RunRecord,
    aggregate,
    default_metrics,
    finite,
    format_markdown,
    metric_directions,
    write_csv,
)
from fishertune.files import SPEC_FILE, RunFolder

__all__ = ["load_run_records", "write_report"]


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
                record.metrics.update({k: float(v) for k, v in metrics.items() if finite(v)})
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
