"""``fishertune experiment --config FILE.yaml|GRID``: run a grid of methods x seeds, then report.

Examples::

    fishertune experiment --config tiny --dry_run
    fishertune experiment --config tiny            # resumable
    fishertune experiment --config tiny --report_only
    # a quick pass over the pipeline: one seed, 20 steps, its own folder
    fishertune experiment --config tiny --seeds 0 --max_steps 20 \\
        --output_dir runs/tiny-smoke
    # one machine with 8 GPUs: 4 runs at once, 2 GPUs each
    fishertune experiment --config GRID.yaml --parallel 4
    # SLURM: the grid as a job array with the file's slurm: resources; watch it; report at the end
    fishertune experiment --config configs/experiments/paper.yaml --launcher slurm \\
        --slurm partition=gpu account=myproject
    fishertune experiment --config configs/experiments/paper.yaml --status
    fishertune experiment --config configs/experiments/paper.yaml --report_only
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from fishertune.errors import FishertuneError
from fishertune.experiments.blocks import SLURM_KEYS

if TYPE_CHECKING:
    from fishertune.experiments.grid import ExperimentConfig
    from fishertune.experiments.stages import RunResult

__all__ = ["build_parser", "main", "parse_set"]


def parse_set(
    items: list[str] | None, flag: str = "--set", raw_keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``["max_steps=20", "bf16=true"]`` -> ``{"max_steps": 20, "bf16": True}`` (YAML values).

    Keys in ``raw_keys`` keep their text (YAML would read SLURM's ``48:00:00`` as a number).
    """
    import yaml

    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FishertuneError(f"{flag} {item!r}: expected KEY=VALUE")
        if key.strip() in raw_keys:
            overrides[key.strip()] = value
            continue
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise FishertuneError(f"{flag} {item!r}: invalid value ({err})") from err
    return overrides


def _add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """Which grid, which of its runs, and what to do with them."""
    parser.add_argument(
        "--config",
        required=True,
        help="experiment YAML, or a shipped grid: tiny, tiny-ablations, sharegpt-equivalence, "
        "paper (a file wins)",
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


def _add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """What replaces or overrides the experiment file's settings."""
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


def _add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the runs go (here, several at once, or SLURM) and how to watch them."""
    parser.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: run here, one after another (or --parallel N at once); slurm: submit the "
        "unfinished runs as a SLURM job array (submitit) with the file's slurm: resources",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="local launcher: runs at once, each with its own share of the GPUs "
        "(CUDA_VISIBLE_DEVICES), queued in the grid's order",
    )
    parser.add_argument(
        "--preload",
        action="store_true",
        help="local launcher: fork each stage from one process that has imported torch, "
        "transformers and fishertune, instead of a fresh interpreter (grids of short CPU runs)",
    )
    parser.add_argument(
        "--gpus",
        default=None,
        help="local launcher: the GPUs --parallel shares out, e.g. 0,1,2,3 (default: all visible)",
    )
    parser.add_argument(
        "--slurm",
        nargs="+",
        metavar="KEY=VALUE",
        help="override the file's slurm: block, e.g. partition=gpu time=4:00:00 "
        f"array_parallelism=4 (fishertune's keys: {' '.join(SLURM_KEYS)}; any other key is a "
        "parameter of submitit's SLURM executor, e.g. partition account qos mem cpus_per_task "
        "array_parallelism setup constraint exclusive additional_parameters)",
    )
    parser.add_argument(
        "--status",
        action="store_true",
        help="print where every run stands (state, SLURM job, step, time) and exit",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (each option also accepts dashes: ``--report-only``)."""
    parser = argparse.ArgumentParser(
        prog="fishertune experiment",
        description="Train and evaluate every run of an experiment grid, skipping finished ones: "
        "here (one at a time, or --parallel N) then write tables and plots to "
        "OUTPUT_DIR/report/, or on SLURM (--launcher slurm, then --status and --report_only).",
    )
    _add_grid_arguments(parser)
    _add_override_arguments(parser)
    _add_launch_arguments(parser)
    return parser


def _refuse_conflicting_flags(args: argparse.Namespace) -> None:
    if args.report_only and (args.dry_run or args.no_report):
        raise FishertuneError("--report_only cannot be combined with --dry_run or --no_report")
    if args.status and (args.report_only or args.dry_run):
        raise FishertuneError("--status cannot be combined with --report_only or --dry_run")
    if args.launcher == "slurm" and (args.parallel != 1 or args.gpus or args.preload):
        raise FishertuneError(
            "--parallel / --gpus are for --launcher local, as is --preload "
            "(SLURM: array_parallelism)"
        )


def _load_config(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment file with the command line's replacements and overrides applied."""
    from fishertune.experiments.experiment_file import load_experiment

    overrides = parse_set(args.set_)
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    return load_experiment(
        args.config,
        output_dir=args.output_dir,
        seeds=args.seeds,
        overrides=overrides,
        slurm=parse_set(args.slurm, "--slurm", raw_keys=("time",)),
    )


def _show_status(config: ExperimentConfig, only: list[str] | None) -> int:
    """``--status``: one line per run."""
    from fishertune.experiments.checks import select_runs
    from fishertune.experiments.slurm import format_status_table, grid_status

    print(format_status_table(grid_status(config, select_runs(config, only))))
    return 0


def _submit_to_slurm(config: ExperimentConfig, args: argparse.Namespace) -> int:
    """``--launcher slurm``: submit the unfinished runs, count them by status, say what's next."""
    from fishertune.experiments.slurm import submit_grid

    results = submit_grid(config, only=args.only, dry_run=args.dry_run)
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    print(", ".join(f"{n} {status}" for status, n in counts.items()))
    if not args.dry_run:
        shown = f"fishertune experiment --config {args.config}"
        print(f"watch: {shown} --status; when done: {shown} --report_only")
    return 0


def _print_outcome(results: list[RunResult]) -> list[RunResult]:
    """Print how many runs finished and why each failed one failed; return the failed ones."""
    failed = [r for r in results if r.status == "failed"]
    done = sum(r.status in ("completed", "skipped") for r in results)
    print(f"{done}/{len(results)} runs finished, {len(failed)} failed")
    for result in failed:
        print(f"  {result.name}: {result.message} (log: {result.log})")
    return failed


def _write_reports(config: ExperimentConfig) -> None:
    """The grid's tables and plots (and its study's, if the file asks for it)."""
    from fishertune.experiments.checks import select_runs
    from fishertune.experiments.report import load_run_records, write_report
    from fishertune.experiments.study import find_study

    # The whole grid, not only --only's runs: the report always shows everything done so far.
    names = [run.name for run in select_runs(config) if run.run_dir.is_dir()]
    records = load_run_records(config.runs_dir, names)
    if not records:
        print(f"no runs under {config.runs_dir} yet: no report written")
        return
    written = write_report(
        records,
        config.report_dir,
        metrics=config.report_metrics,
        title=config.path.stem,
    )
    if config.study is not None and config.report_options is not None:
        study = find_study(config.path, "report.study", config.study)
        try:
            written.update(
                study.write_report(
                    config.runs_dir,
                    names,
                    config.report_dir,
                    title=config.path.stem,
                    options=config.report_options,
                )
            )
        except FishertuneError as err:  # e.g. the base not measured yet
            print(f"no {config.study} report: {err}")
    print(f"report: {', '.join(str(p) for p in written.values())}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 when every selected run finished, 1 when one failed."""
    from fishertune.experiments.checks import check_stored_specs, select_runs
    from fishertune.experiments.runner import run_experiment

    args = build_parser().parse_args(argv)
    _refuse_conflicting_flags(args)
    config = _load_config(args)
    if args.status:
        return _show_status(config, args.only)
    if args.launcher == "slurm" and not args.report_only:
        return _submit_to_slurm(config, args)
    failed = []
    if args.report_only:
        # A report must not mix in runs made with other settings (e.g. a --max_steps pass).
        check_stored_specs(config, select_runs(config, args.only))
    else:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        try:
            results = run_experiment(
                config,
                dry_run=args.dry_run,
                only=args.only,
                parallel=args.parallel,
                gpus=gpus,
                preload=args.preload,
            )
        except KeyboardInterrupt:
            print("stopped: the runs in progress were terminated; run the same command to resume")
            return 130
        if args.dry_run:
            return 0
        failed = _print_outcome(results)
    if not args.no_report:
        _write_reports(config)
    return 1 if failed else 0
