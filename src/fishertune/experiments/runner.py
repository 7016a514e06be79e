"""The local launcher: a grid's runs on this machine, one after another or ``--parallel N`` at
once, each stage a subprocess, resumable.

Each run gets ``OUTPUT_DIR/runs/NAME/`` holding ``fishertune_experiment.json`` (the run's
settings), the logs ``train.log`` / ``evaluate.log``, ``evaluation.json`` from
``fishertune evaluate``, and ``model/``: what ``fishertune train`` saves (weights, tokenizer,
``trainer_state.json``, ``fishertune_run.json``, checkpoints).

Before anything is launched every run's full training configuration is checked as
``fishertune train`` would (unknown options, bad values, unknown methods), so a typo in the last
run of a grid cannot surface hours later. A stage whose output is complete is not run again, so an
interrupted grid is resumed by running the same command: a training run cut off after a checkpoint
continues from it (``--resume``), one cut off before any is started again. A run whose stored
training settings differ from the experiment file is refused when it holds work (a checkpoint or a
finished training) and cleared when it holds none (the debris of a failed attempt); one whose
evaluation settings changed is evaluated again. A failing run is recorded in
``OUTPUT_DIR/experiment_status.json`` and the grid goes on.

Runs are subprocesses rather than calls in this process so that every run starts from a fresh
CUDA context and RNG state, a crash cannot take the grid down, and the multi-GPU path is the same
``accelerate launch`` command a user would type. Each child runs in its own process group, which
is killed when the runner is stopped (Ctrl-C, SIGTERM): an ``accelerate launch`` and its workers go
with it. A lock (``.OUTPUT_DIR.lock`` beside the output directory, holding the owner's PID:
:class:`~fishertune.locks.RunnerLock`) keeps a second runner, and any ``fishertune train`` but the
runs' own, off the output directory. ``--parallel N`` runs N runs at once, each on its own GPUs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from fishertune.errors import FishertuneError, first_line
from fishertune.experiments.checks import check_stored_specs, select_runs, validate_grid
from fishertune.experiments.commands import format_command
from fishertune.experiments.grid import BASE_RUN, ExperimentConfig, RunSpec
from fishertune.experiments.processes import (
    Launcher,
    allow_children,
    stop_children,
    subprocess_launcher,
)
from fishertune.experiments.stages import (
    RunResult,
    pending_stages,
    prepare_grid_data,
    run_run,
    update_status,
)
from fishertune.files import read_status, training_done
from fishertune.locks import RunnerLock

__all__ = ["gpu_slots", "run_experiment"]


def gpu_slots(
    parallel: int, gpus: Sequence[str] | None = None, per_run: int | None = None
) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each of ``parallel`` run slots.

    Args:
        parallel: runs at once.
        gpus: the devices to share out (default: ``CUDA_VISIBLE_DEVICES`` if set, else every GPU
            torch sees).
        per_run: devices per run (default: an equal share; an ``accelerate`` grid's
            ``num_processes``).

    Returns:
        One comma-separated device list per slot, or ``None`` for every slot when there is no
        GPU (CPU runs share the cores).

    Raises:
        FishertuneError: when the GPUs cannot give every slot ``per_run`` devices.
    """
    if gpus is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = [g.strip() for g in visible.split(",") if g.strip()]
        else:
            import torch

            gpus = [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:
        return [None] * parallel
    per_run = per_run or len(gpus) // parallel
    if per_run < 1 or per_run * parallel > len(gpus):
        raise FishertuneError(
            f"--parallel {parallel} with {per_run or 1} GPU(s) per run needs "
            f"{parallel * (per_run or 1)} GPUs; {len(gpus)} available ({','.join(gpus)})"
        )
    return [",".join(gpus[k * per_run : (k + 1) * per_run]) for k in range(parallel)]


def _describe(result: RunResult) -> str:
    if result.status == "failed":
        return (
            f"FAILED at {result.stage} after {result.wall_time_s:.1f} s: {result.message} "
            f"(log: {result.log})"
        )
    if result.status == "skipped":
        return "finished earlier, skipped"
    return f"{result.status} in {result.wall_time_s:.1f} s"


def _refuse_live_slurm_jobs(config: ExperimentConfig, runs: Sequence[RunSpec]) -> None:
    """Refuse to run here what a SLURM job of this output directory is queued or running for:
    both would write the same run folder."""
    records = read_status(config.output_dir)
    live = {
        run.name: records[run.name]["job_id"]
        for run in runs
        if records.get(run.name, {}).get("launcher") == "slurm"
        and records[run.name].get("status") in ("submitted", "running", "requeued")
        and records[run.name].get("job_id")
    }
    if not live:
        return
    from fishertune.experiments import slurm

    states = slurm.slurm_states(list(live.values()), config.slurm_dir)
    active = [
        f"{name} (job {job})"
        for name, job in live.items()
        if states.get(job) in slurm.ACTIVE_STATES
    ]
    if active:
        raise FishertuneError(
            f"SLURM jobs are queued or running for {', '.join(active)} in {config.output_dir}: "
            "wait for them (--status) or scancel them before running the grid here"
        )


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _runs_with_base(config: ExperimentConfig, only: Sequence[str] | None) -> list[RunSpec]:
    """The selected runs, led by the base stage when they need its model and it is not trained."""
    runs = select_runs(config, only)
    base = config.base_run
    if base is not None and runs and runs[0].name != BASE_RUN and not training_done(base.model_dir):
        runs = [base, *runs]  # the selected runs start from the base model: train it first
    return runs


def _print_plan(
    config: ExperimentConfig, runs: Sequence[RunSpec], debris: set[str], log: Callable[[str], None]
) -> list[RunResult]:
    """``--dry_run``: each run's pending commands, launching nothing."""
    results = []
    for index, run in enumerate(runs, 1):
        stages = pending_stages(config, run)
        note = " (folder of an attempt with other settings: cleared first)"
        log(
            f"# [{index}/{len(runs)}] {run.name}"
            + ("" if stages else ": finished, skipped")
            + (note if run.name in debris else "")
        )
        for _, command in stages:
            log(format_command(command, config.env))
        results.append(RunResult(run.name, "planned" if stages else "skipped"))
    return results


def _run_base_first(
    config: ExperimentConfig,
    runs: list[RunSpec],
    launcher: Launcher,
    slots: list[str | None],
    log: Callable[[str], None],
) -> list[RunResult]:
    """The base stage alone first (every other run loads its model), then the rest; when the
    base fails, the rest are recorded as failed without being started."""
    first = _run_queue(config, runs[:1], launcher, slots[:1], log, total=len(runs))
    if first[0].status == "failed":
        blocked = [
            RunResult(
                run.name,
                "failed",
                stage="base",
                message=f"not started: the base stage failed ({first[0].message})",
                log=first[0].log,
            )
            for run in runs[1:]
        ]
        update_status(config, blocked)
        log(f"the base stage failed: {len(blocked)} runs not started")
        return first + blocked
    rest = _run_queue(config, runs[1:], launcher, slots, log, offset=1, total=len(runs))
    return first + rest


def run_experiment(
    config: ExperimentConfig,
    *,
    launcher: Launcher | None = None,
    dry_run: bool = False,
    only: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    parallel: int = 1,
    gpus: Sequence[str] | None = None,
    preload: bool = False,
) -> list[RunResult]:
    """Train and evaluate every unfinished run of the grid, in order, ``parallel`` at a time.

    Every selected run's training configuration is validated first (:func:`validate_grid`), dry
    run included. While runs execute, a :class:`RunnerLock` holds the output directory; when
    the runner is stopped (Ctrl-C, or SIGTERM, turned into ``SystemExit(143)``) the children's
    process groups are killed and their runs recorded as ``interrupted`` before the exception
    goes on. The console gets one line per run (its status and time); the commands and their
    output go to each run's ``train.log`` / ``evaluate.log``.

    Args:
        config: the validated experiment.
        launcher: runs one command; defaults to :func:`subprocess_launcher`.
        dry_run: only print the commands of the stages that would run.
        only: restrict to these run names or row labels (``method[-ablation]``).
        log: where progress lines go.
        parallel: runs at once, each with its own ``CUDA_VISIBLE_DEVICES`` (:func:`gpu_slots`),
            taken from the queue in the grid's order.
        gpus: the devices ``parallel`` shares out (default: all visible).
        preload: run the stages as forks of one process that has imported torch, transformers
            and fishertune (:mod:`fishertune.experiments.preload`) instead of fresh interpreters.

    Returns:
        One :class:`RunResult` per selected run, in the grid's order; failed runs do not stop the
        grid.

    Raises:
        FishertuneError: when ``only`` names no run, a run's configuration is invalid, a run
            folder holds a run trained with other settings (all checked before anything is
            launched), or another runner holds the output directory.
    """
    if parallel < 1:
        raise FishertuneError(f"--parallel must be at least 1, got {parallel}")
    runs = _runs_with_base(config, only)
    # a study data folder not written yet is a name the check does not read: the rows are
    # checked again once they exist, the settings now (before minutes of data preparation)
    validate_grid(config, runs)
    debris = {run.name for run in check_stored_specs(config, runs)}
    if dry_run:
        prepare_grid_data(config, log, dry_run=True)
        return _print_plan(config, runs, debris, log)
    slots: list[str | None] = [None]
    if parallel > 1:
        per_run = config.num_processes if config.launcher == "accelerate" else None
        slots = gpu_slots(parallel, gpus, per_run)
    preloaded = None
    if launcher is None and preload:
        from fishertune.experiments.preload import PreloadedLauncher

        preloaded = PreloadedLauncher(config.env)
    launcher = launcher or preloaded or subprocess_launcher
    allow_children()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        with RunnerLock(config.output_dir):
            _refuse_live_slurm_jobs(config, runs)
            # under the lock: a second runner of this grid never writes the data beside us
            if prepare_grid_data(config, log):
                validate_grid(config, runs)
            if config.base_run is None or runs[0].name != BASE_RUN or len(runs) == 1:
                return _run_queue(config, runs, launcher, slots, log)
            return _run_base_first(config, runs, launcher, slots, log)
    finally:
        if preloaded is not None:
            preloaded.close()
        if main_thread and previous is not None:  # None: a handler installed outside Python
            signal.signal(signal.SIGTERM, previous)


def _run_queue(
    config: ExperimentConfig,
    runs: list[RunSpec],
    launcher: Launcher,
    slots: list[str | None],
    log: Callable[[str], None],
    *,
    offset: int = 0,
    total: int | None = None,
) -> list[RunResult]:
    """Run ``runs`` in order on ``slots`` (one run per slot at a time); progress lines number
    them from ``offset + 1`` out of ``total`` (default ``len(runs)``)."""
    results: dict[str, RunResult] = {}
    free = list(range(len(slots)))
    queue = list(enumerate(runs, offset + 1))
    total = len(runs) if total is None else total
    running: dict[Future, tuple[int, RunSpec, int, float]] = {}
    serial: list[tuple[int, RunSpec, int, float]] = []  # the run in flight when not parallel

    def finish(index: int, run: RunSpec, slot: int, result: RunResult) -> None:
        results[run.name] = result
        update_status(config, [result])
        where = f" (GPUs {slots[slot]})" if slots[slot] is not None else ""
        log(f"[{index}/{total}] {run.name}: {_describe(result)}{where}")

    pool = ThreadPoolExecutor(max_workers=len(slots)) if len(slots) > 1 else None
    try:
        while queue or running:
            while queue and free:
                index, run = queue.pop(0)
                slot = free.pop(0)
                env = {} if slots[slot] is None else {"CUDA_VISIBLE_DEVICES": slots[slot]}
                # runs side by side on one machine: distinct accelerate rendezvous ports
                side_by_side = pool is not None and config.launcher == "accelerate"
                port = 29500 + slot if side_by_side else None
                if pool is None:  # in this thread, so that Ctrl-C reaches the launcher directly
                    serial[:] = [(index, run, slot, time.time())]
                    finish(index, run, slot, _run_one(config, run, launcher, env=env))
                    serial.clear()
                    free.append(slot)
                    continue
                future = pool.submit(
                    _run_one, config, run, launcher, env=env, main_process_port=port
                )
                running[future] = (index, run, slot, time.time())
            if running:
                # a timeout keeps the main thread responsive to signals
                done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    index, run, slot, _ = running.pop(future)
                    finish(index, run, slot, future.result())
                    free.append(slot)
    except BaseException:
        stop_children()
        # a run whose stages all finished before the stop took effect is completed, as
        # --status (which reads the run folders) says
        stopped = [
            RunResult(
                name=run.name,
                status="interrupted" if pending else "completed",
                message="the runner was stopped; run the same command to resume"
                if pending
                else None,
                wall_time_s=round(time.time() - begun, 2),
                started=begun,
            )
            for index, run, slot, begun in [*running.values(), *serial]
            for pending in [bool(pending_stages(config, run))]
        ]
        if stopped:
            update_status(config, stopped)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return [results[run.name] for run in runs]


def _run_one(
    config: ExperimentConfig,
    run: RunSpec,
    launcher: Launcher,
    *,
    env: dict[str, str] | None = None,
    main_process_port: int | None = None,
) -> RunResult:
    """One run's pending stages; a fault of this run (a folder it cannot use, a launch that
    fails) is its ``failed`` result, so the grid goes on."""
    start = time.time()
    try:
        options = {} if main_process_port is None else {"main_process_port": main_process_port}
        return run_run(config, run, launcher, train_options=options, env=env, start=start)
    except (FishertuneError, OSError) as err:
        return RunResult(
            name=run.name,
            status="failed",
            message=first_line(err),
            wall_time_s=round(time.time() - start, 2),
            started=start,
        )
