"""``fishertune experiment --config FILE.yaml|GRID``: run a grid of methods x seeds, then report.

Examples::

    fishertune experiment --config tiny --dry_run
    fishertune experiment --config tiny            # resumable
    fishertune experiment --config tiny --report_only
    # a quick pass over the pipeline: one seed, 20 steps, its own folder
    fishertune experiment --config tiny --seeds 0 --max_steps 20 \\
        --output_dir runs/tiny-smoke
"""

from __future__ import annotations

import argparse
from typing import Any

from fishertune.errors import FishertuneError

__all__ = ["build_parser", "main", "parse_set"]


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["max_steps=20", "bf16=true"]`` -> ``{"max_steps": 20, "bf16": True}`` (YAML values)."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FishertuneError(f"--set {item!r}: expected KEY=VALUE")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise FishertuneError(f"--set {item!r}: invalid value ({err})") from err
    return overrides


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (each option also accepts dashes: ``--report-only``)."""
    parser = argparse.ArgumentParser(
        prog="fishertune experiment",
        description="Train and evaluate every run of an experiment grid, one at a time, skipping "
        "finished ones, then write tables and plots to OUTPUT_DIR/report/.",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="experiment YAML, or a shipped grid: tiny, tiny-ablations, paper (a file wins)",
    )
    parser.add_argument(
        "--dry_run",
        "--dry-run",
        action="store_true",
        help="print the commands of unfinished runs and exit",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these runs (e.g. token-f-seed0) or rows (e.g. token-f, token-f-no-warmup)",
    )
    parser.add_argument(
        "--report_only",
        "--report-only",
        action="store_true",
        help="launch nothing; rebuild the report from the runs already in OUTPUT_DIR",
    )
    parser.add_argument(
        "--no_report",
        "--no-report",
        action="store_true",
        help="do not write the report after the grid",
    )
    parser.add_argument(
        "--output_dir", "--output-dir", default=None, help="replaces the file's output_dir"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="replace the file's seeds (all runs)"
    )
    parser.add_argument(
        "--max_steps",
        "--max-steps",
        type=int,
        default=None,
        help="training steps of every run (same as --set max_steps=N)",
    )
    parser.add_argument(
        "--set",
        dest="set_",
        nargs="+",
        metavar="KEY=VALUE",
        help="training overrides for every run, below the methods' and ablations' own",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 when every selected run finished, 1 when one failed."""
    from fishertune.experiments.grid import load_experiment
    from fishertune.experiments.report import load_run_records, write_report
    from fishertune.experiments.runner import check_stored_specs, run_experiment, select_runs

    args = build_parser().parse_args(argv)
    if args.report_only and (args.dry_run or args.no_report):
        raise FishertuneError("--report_only cannot be combined with --dry_run or --no_report")
    overrides = parse_set(args.set_)
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    config = load_experiment(
        args.config, output_dir=args.output_dir, seeds=args.seeds, overrides=overrides
    )
    failed = []
    if args.report_only:
        # A report must not mix in runs made with other settings (e.g. a --max_steps pass).
        check_stored_specs(config, select_runs(config, args.only))
    else:
        results = run_experiment(config, dry_run=args.dry_run, only=args.only)
        if args.dry_run:
            return 0
        failed = [r for r in results if r.status == "failed"]
        done = sum(r.status in ("completed", "skipped") for r in results)
        print(f"{done}/{len(results)} runs finished, {len(failed)} failed")
        for result in failed:
            print(f"  {result.name}: {result.message} (log: {result.log})")
    if not args.no_report:
        # The whole grid, not only --only's runs: the report always shows everything done so far.
        names = [run.name for run in select_runs(config) if run.run_dir.is_dir()]
        records = load_run_records(config.runs_dir, names)
        if not records:
            print(f"no runs under {config.runs_dir} yet: no report written")
        else:
            written = write_report(
                records,
                config.report_dir,
                metrics=config.report_metrics,
                title=config.path.stem,
            )
            print(f"report: {', '.join(str(p) for p in written.values())}")
    return 1 if failed else 0
