"""Running an experiment grid on SLURM through submitit: one job per run, the grid as a job array.

``fishertune experiment --config GRID --launcher slurm`` validates every run, then submits the
unfinished ones as one submitit job array (``%array_parallelism`` at once) with the resources of
the grid's ``slurm:`` block. Each job (:class:`~fishertune.experiments.slurm_job.RunJob`) runs
its run as the local runner does (:func:`~fishertune.experiments.stages.run_run`): the training
(``--resume`` from the latest complete checkpoint when there is one), then the evaluation, with
the same logs in the run's folder and the same completion checks.

- Multi-GPU / multi-node: submitit starts one task per node (``srun``); each task runs one
  ``accelerate launch`` with ``--num_machines`` = the job's nodes, ``--machine_rank`` = its
  ``SLURM_NODEID``, ``--main_process_ip`` = the job's first host and a port derived from the job
  id, ``--num_processes`` = nodes x gpus_per_node. Node 0 then evaluates.
- Preemption and time limits: SLURM signals the job (USR2, ``signal_delay_s`` before the limit,
  or ``scancel --signal=USR2``); submitit calls ``RunJob.checkpoint``, which stops the
  training's process group, and requeues the job. The requeued job recomputes its command from
  the run folder, so it resumes from the latest complete checkpoint exactly as a rerun of the
  local runner would. Time-limit requeues are capped by ``max_requeues``.
- Records: the submitter writes each run's job id and SLURM log to ``experiment_status.json``
  (state ``submitted``); the job updates it (``running``, then ``completed`` or ``failed`` with its
  logs). A failed job fails in SLURM too; the other runs go on.
- ``--status`` (:func:`grid_status`) merges those records with SLURM's view (``squeue``, then
  ``sacct`` through submitit) and the run folders (step reached); submitting again skips finished
  runs and runs whose job is queued or running, and resubmits the rest.
"""

from __future__ import annotations

import functools
import getpass
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.experiments.checks import check_stored_specs, select_runs, validate_grid
from fishertune.experiments.grid import BASE_RUN, ExperimentConfig, RunSpec, expand_grid
from fishertune.experiments.processes import Launcher
from fishertune.experiments.slurm_job import RunJob
from fishertune.experiments.stages import (
    RunResult,
    prepare_grid_data,
    prepare_run,
    update_status,
)
from fishertune.experiments.status import ACTIVE_STATES, RunView, format_status_table, run_views
from fishertune.files import read_status
from fishertune.locks import RunnerLock

try:  # submitit is the `train` extra's; the local launcher works without it
    import submitit
except ImportError:  # pragma: no cover - exercised only without the extra
    submitit = None

__all__ = [
    "ACTIVE_STATES",
    "RunJob",
    "RunView",
    "format_status_table",
    "grid_status",
    "make_executor",
    "slurm_states",
    "submit_grid",
]

StateQuery = Callable[[Sequence[str]], dict[str, str]]
"""``states(job_ids) -> {job_id: SLURM state}``; ids SLURM no longer knows are left out."""


def _need_submitit() -> None:
    if submitit is None:
        raise FishertuneError(
            "--launcher slurm needs submitit: pip install 'fishertune[train]' (or submitit)"
        )


def make_executor(config: ExperimentConfig, cluster: str | None = "slurm") -> Any:
    """A submitit executor with the grid's ``slurm:`` resources.

    Args:
        config: the experiment.
        cluster: ``slurm``, or submitit's ``local`` / ``debug`` executors (tests).
    """
    _need_submitit()
    spec = config.slurm
    try:
        executor = submitit.AutoExecutor(
            folder=config.slurm_dir, cluster=cluster, slurm_max_num_timeout=spec.max_requeues
        )
    except RuntimeError as err:  # submitit's "Could not detect srun"
        raise FishertuneError(f"--launcher slurm: no SLURM on this machine ({err})") from err
    params: dict[str, Any] = {
        "name": spec.job_name or config.path.stem,
        "timeout_min": spec.time_min,
        "nodes": spec.nodes,
        "tasks_per_node": 1,  # one task per node: it runs that node's accelerate launch
        "slurm_signal_delay_s": spec.signal_delay_s,
        **{f"slurm_{key}": value for key, value in spec.submitit.items()},
    }
    if spec.gpus_per_node is not None:
        params["gpus_per_node"] = spec.gpus_per_node
    try:
        executor.update_parameters(**params)
    except ValueError as err:
        raise FishertuneError(f"{config.path}: slurm: {str(err).splitlines()[0]}") from err
    return executor


def slurm_states(job_ids: Sequence[str], folder: Path | None = None) -> dict[str, str]:
    """SLURM's view of these jobs: ``squeue`` for queued and running ones, then ``sacct`` through
    submitit for finished ones (which needs accounting storage; without it they are unknown).

    submitit reads only ``sacct``, which clusters without accounting storage lack, and ``squeue``
    forgets a job soon after it ends: hence both.
    """
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    try:
        output = subprocess.run(
            ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        # unknown is not "gone": treating it so would resubmit a job into a live run's folder
        detail = (str(getattr(err, "stderr", None) or "").strip() or str(err)).splitlines()
        raise FishertuneError(
            f"squeue failed ({detail[0] if detail else type(err).__name__}): cannot tell "
            f"whether SLURM jobs {', '.join(job_ids)} are queued or running"
        ) from err
    for line in output.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id in job_ids:
            states[job_id] = state
    rest = [job_id for job_id in job_ids if job_id not in states]
    if rest and submitit is not None and folder is not None:
        quiet = logging.getLogger("submitit")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "Bypassing sacct error" on clusters without accounting
        try:
            for job_id in rest:
                state = submitit.SlurmJob(folder=folder, job_id=job_id).state
                if state and state != "UNKNOWN":
                    states[job_id] = state.split()[0]  # "CANCELLED by 0" -> "CANCELLED"
        except Exception:
            pass
        finally:
            quiet.setLevel(level)
    return states


def grid_status(
    config: ExperimentConfig,
    runs: Sequence[RunSpec] | None = None,
    states: StateQuery | None = None,
) -> list[RunView]:
    """Where every run stands, from the run folders, ``experiment_status.json`` and SLURM.

    Args:
        config: the experiment.
        runs: the runs to show (default: the whole grid).
        states: SLURM's view of job ids (default :func:`slurm_states`).
    """
    runs = list(expand_grid(config) if runs is None else runs)
    records = read_status(config.output_dir)
    job_ids = [
        records[run.name]["job_id"]
        for run in runs
        if run.name in records and records[run.name].get("job_id")
    ]
    query = states or functools.partial(slurm_states, folder=config.slurm_dir)
    slurm = query(job_ids) if job_ids else {}
    return run_views(config, runs, records, slurm)


def _triage(
    runs: Sequence[RunSpec], views: dict[str, RunView]
) -> tuple[dict[str, RunResult], list[RunSpec]]:
    """The results of runs not to submit (finished, or their job queued or running), and the runs
    to submit (never submitted, failed, stopped)."""
    results: dict[str, RunResult] = {}
    todo = []
    for run in runs:
        view = views[run.name]
        if view.state == "completed":
            results[run.name] = RunResult(run.name, "skipped", launcher="slurm")
        elif not view.resubmittable:
            results[run.name] = RunResult(
                run.name, view.state, launcher="slurm", job_id=view.job_id
            )
        else:
            todo.append(run)
    return results, todo


def _refuse_before_base(
    config: ExperimentConfig,
    todo: Sequence[RunSpec],
    views: dict[str, RunView],
    states: StateQuery | None,
) -> None:
    """Refuse to submit runs that start from the base stage's model before that model exists."""
    base = config.base_run
    if (
        base is not None
        and any(run.name != BASE_RUN for run in todo)
        and (views.get(BASE_RUN) or grid_status(config, [base], states)[0]).state != "completed"
    ):
        raise FishertuneError(
            f"{config.path}: the base stage is not finished and every run starts from its model: "
            f"submit it first (--only {BASE_RUN}), then the grid once it is done (--status)"
        )


def _submit(
    config: ExperimentConfig,
    todo: Sequence[RunSpec],
    executor: Any,
    launcher: Launcher | None,
    log: Callable[[str], None],
) -> list[RunResult]:
    """Prepare the study data and the runs' folders and submit them as one job array; record
    each job id and log."""
    with RunnerLock(config.output_dir):
        # the jobs read the study data: written here, under the lock, before any is submitted
        if prepare_grid_data(config, log):
            validate_grid(config, todo)
        for run in todo:
            prepare_run(config, run)
        with executor.batch():
            jobs = [executor.submit(RunJob(config, run.name, launcher)) for run in todo]
        submitted = [
            RunResult(
                run.name,
                "submitted",
                launcher="slurm",
                job_id=str(job.job_id),
                slurm_log=str(job.paths.stdout),
                started=time.time(),
            )
            for run, job in zip(todo, jobs, strict=True)
        ]
        update_status(config, submitted, unless_same_job=True)
    return submitted


def submit_grid(
    config: ExperimentConfig,
    *,
    only: Sequence[str] | None = None,
    executor: Any = None,
    states: StateQuery | None = None,
    dry_run: bool = False,
    launcher: Launcher | None = None,
    log: Callable[[str], None] = print,
) -> list[RunResult]:
    """Submit the unfinished runs of the grid as one job array.

    Every selected run is validated first (as the local runner does). Runs that are finished, or
    whose job is queued or running, are left alone; the others (never submitted, failed, stopped)
    are submitted. Each submitted run is recorded with its job id and SLURM log.

    Args:
        config: the experiment.
        only: restrict to these run names or row labels.
        executor: a submitit executor (default :func:`make_executor`; tests pass a local one).
        states: SLURM's view of job ids (default :func:`slurm_states`).
        dry_run: print what would be submitted, submit nothing.
        launcher: runs each stage inside the job (default: a subprocess in its own group).
        log: where progress lines go.

    Returns:
        One :class:`RunResult` per selected run: ``submitted`` (with ``job_id``), ``skipped``
        (finished), ``queued`` / ``running`` (left alone), or ``planned`` (dry run).
    """
    runs = select_runs(config, only)
    validate_grid(config, runs)
    check_stored_specs(config, runs)
    views = {view.name: view for view in grid_status(config, runs, states)}
    results, todo = _triage(runs, views)
    _refuse_before_base(config, todo, views, states)
    for index, run in enumerate(runs, 1):
        if run.name in results:
            result = results[run.name]
            what = "finished, skipped" if result.status == "skipped" else result.status
            job = f" (job {result.job_id})" if result.job_id else ""
            log(f"[{index}/{len(runs)}] {run.name}: {what}{job}")
    if dry_run and todo:
        prepare_grid_data(config, log, dry_run=True)
    if dry_run or not todo:
        for run in todo:
            results[run.name] = RunResult(run.name, "planned", launcher="slurm")
            log(f"would submit {run.name} ({views[run.name].state})")
        return [results[run.name] for run in runs]
    for result in _submit(config, todo, executor or make_executor(config), launcher, log):
        results[result.name] = result
        log(f"{result.name}: submitted as job {result.job_id} (log: {result.slurm_log})")
    return [results[run.name] for run in runs]
