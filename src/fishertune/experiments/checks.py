"""Checks of a grid before anything is launched: which runs, every run's training
configuration as ``fishertune train`` would check it, and run folders holding work done with
other settings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fishertune.errors import FishertuneError
from fishertune.experiments.commands import train_command
from fishertune.experiments.grid import ExperimentConfig, RunSpec, expand_grid
from fishertune.experiments.stages import changed_training, stored_settings
from fishertune.files import SPEC_FILE, RunFolder

__all__ = ["check_stored_specs", "select_runs", "validate_grid", "validate_train_flags"]


def select_runs(config: ExperimentConfig, only: Sequence[str] | None = None) -> list[RunSpec]:
    """The grid's runs, or those named in ``only`` (run names or row labels ``method[-ablation]``).

    Raises:
        FishertuneError: when ``only`` names no run of the grid.
    """
    runs = expand_grid(config)
    if not only:
        return runs
    wanted = set(only)
    unknown = wanted - {r.name for r in runs} - {r.group for r in runs}
    if unknown:
        raise FishertuneError(
            f"--only: unknown run(s) {sorted(unknown)}; runs: {[r.name for r in runs]}"
        )
    return [r for r in runs if r.name in wanted or r.group in wanted]


def check_stored_specs(config: ExperimentConfig, runs: list[RunSpec]) -> list[RunSpec]:
    """Refuse run folders that hold work trained with other settings than the experiment's.

    A folder whose stored settings differ but which holds no work (no finished training, no
    complete checkpoint: what a failed attempt leaves) is not in the way: it is returned, and
    :func:`~fishertune.experiments.stages.prepare_run` clears it when that run is launched.

    Returns:
        The runs whose folders are such debris.

    Raises:
        FishertuneError: naming the runs whose ``fishertune_experiment.json`` differs and whose
            folder holds a trained model or a checkpoint.
    """
    changed = [
        run
        for run in runs
        if changed_training(RunFolder(run.run_dir).spec, stored_settings(config, run))
    ]
    kept = [run.name for run in changed if RunFolder(run.run_dir).holds_work]
    if kept:
        raise FishertuneError(
            f"run folder(s) {', '.join(kept)} under {config.runs_dir} hold runs trained with "
            f"other settings (see their {SPEC_FILE}); choose another output_dir or delete those "
            "folders"
        )
    return changed


def validate_train_flags(argv: list[str], unwritten_data: Path | None = None) -> None:
    """Check a ``fishertune train`` argument list as ``fishertune train`` would, without training.

    :func:`fishertune.training.cli.validate_train_argv` checks the YAML's keys, every flag's name
    and value, the method's options, sizes and rates, and every row of a local data file; the
    run folder itself is the runner's to check (debris of failed attempts is cleared at launch).
    ``--use_cpu true`` is added: the machine that checks the grid (a SLURM login node) need not
    have the GPUs that ``bf16`` asks for; the job's own ``fishertune train`` checks the hardware.
    Data inside ``unwritten_data`` (study data not prepared yet) is not read.

    Raises:
        FishertuneError: one line naming the problem.
    """
    import warnings

    from fishertune.training.cli import validate_train_argv

    with warnings.catch_warnings():  # deprecation notes belong in the run's own train.log
        warnings.simplefilter("ignore")
        validate_train_argv(
            [*argv, "--use_cpu", "true"], check_output_dir=False, unwritten_data=unwritten_data
        )


def validate_grid(config: ExperimentConfig, runs: Sequence[RunSpec]) -> None:
    """Check every run's full training configuration before the first one starts.

    Raises:
        FishertuneError: naming the first run whose configuration ``fishertune train`` refuses.
    """
    study = config.study_data
    # study data is prepared at launch, under the lock: its rows are checked once written
    unwritten = study.out if study and not study.written else None
    for run in runs:
        command = train_command(config, run, restart=False)
        argv = command[command.index("train") + 1 :]
        try:
            validate_train_flags(argv, unwritten)
        except FishertuneError as err:
            raise FishertuneError(
                f"{config.path}: run {run.name} (method {run.method!r}"
                + (f", ablation {run.ablation!r}" if run.ablation else "")
                + f"): {err}"
            ) from err
