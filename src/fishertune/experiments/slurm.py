"""Running an experiment grid on SLURM through submitit: one job per run, the grid as a job array.

``fishertune experiment --config GRID --launcher slurm`` validates every run, then submits the
unfinished ones as one submitit job array (``%array_parallelism`` at once) with the resources of
the grid's ``slurm:`` block. Each job (:class:`RunJob`) does what the local runner does for its
run: the training command (``--resume`` from the latest complete checkpoint when there is one),
then the evaluation, with the same logs in the run's folder and the same completion checks.

- Multi-GPU / multi-node: submitit starts one task per node (``srun``); each task runs one
  ``accelerate launch`` with ``--num_machines`` = the job's nodes, ``--machine_rank`` = its
  ``SLURM_NODEID``, ``--main_process_ip`` = the job's first host and a port derived from the job
  id, ``--num_processes`` = nodes x gpus_per_node. Node 0 then evaluates.
- Preemption and time limits: SLURM signals the job (USR2, ``signal_delay_s`` before the limit,
  or ``scancel --signal=USR2``); submitit calls :meth:`RunJob.checkpoint`, which stops the
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

import contextlib
import functools
import getpass
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.experiments.grid import BASE_RUN, ExperimentConfig, RunSpec, expand_grid
from fishertune.experiments.runner import (
    _STOPPING,
    EVALUATION_FILE,
    SPEC_FILE,
    Launcher,
    Rendezvous,
    RunnerLock,
    RunResult,
    check_stored_specs,
    evaluate_command,
    evaluation_done,
    measure_done,
    pending_stages,
    prepare_run,
    read_status,
    run_settings,
    run_stages,
    select_runs,
    step_reached,
    stop_children,
    subprocess_launcher,
    train_command,
    training_done,
    update_status,
    validate_grid,
)
from fishertune.files import RUN_RECORD, read_json_record

try:  # submitit is the `train` extra's; the local launcher works without it
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - exercised only without the extra
    submitit = None
    Checkpointable = object

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

# SLURM job states of a job that is queued or running (it must not be submitted again).
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESV_DEL_HOLD",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "PREEMPTED",  # on its way back to the queue (PreemptMode=REQUEUE) or out
        "RUNNING_LOCAL",  # submitit's local executor, in tests
    }
)
_QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
# the records' own states of an attempt that is (as far as they know) still in SLURM's hands
_LIVE_RECORDS = ("submitted", "running", "requeued")

StateQuery = Callable[[Sequence[str]], dict[str, str]]
"""``states(job_ids) -> {job_id: SLURM state}``; ids SLURM no longer knows are left out."""


def _need_submitit() -> None:
    if submitit is None:
        raise FishertuneError(
            "--launcher slurm needs submitit: pip install 'fishertune[train]' (or submitit)"
        )


def _job_port(spec_port: int | None, raw_job_id: str) -> int:
    """The rendezvous port: the grid's, or one derived from the job id, so that two jobs sharing
    a node do not collide and every node of one job computes the same one."""
    if spec_port is not None:
        return spec_port
    digits = "".join(ch for ch in raw_job_id if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


class _RunFailedError(FishertuneError):
    """A stage of the run failed (already recorded): the SLURM job fails with it."""


def _job_fields(environment: Any) -> dict[str, Any]:
    """The record's ``launcher``, ``job_id`` and ``slurm_log`` (submitit's stdout file) of this
    job."""
    try:
        log = str(environment.paths.stdout)
    except KeyError:  # no SUBMITIT_FOLDER: submitit's debug executor
        log = None
    return {"launcher": "slurm", "job_id": environment.job_id, "slurm_log": log}


class RunJob(Checkpointable):
    """The SLURM job of one run: train (one ``accelerate launch`` per node), then evaluate.

    Picklable (submitit sends it to the job); everything it decides is recomputed from the run
    folder when it starts, which is what makes a requeued job resume.
    """

    def __init__(
        self, config: ExperimentConfig, run_name: str, launcher: Launcher | None = None
    ) -> None:
        self.config = config
        self.run_name = run_name
        self.launcher = launcher

    def _run(self) -> RunSpec:
        runs = {run.name: run for run in expand_grid(self.config)}
        return runs[self.run_name]

    def __call__(self) -> dict[str, Any]:
        """Run the pending stages; node 0 records the outcome. Returns the run's record."""
        environment = submitit.JobEnvironment()
        fields = _job_fields(environment)
        start = time.time()
        try:
            return self._stages(environment, fields, start)
        except Exception as err:
            if environment.node == 0 and not isinstance(err, _RunFailedError):
                # whatever broke, the record must not stay "running"
                update_status(
                    self.config,
                    [
                        RunResult(
                            self.run_name,
                            "failed",
                            message=f"the job failed: {type(err).__name__}: {err}",
                            log=fields["slurm_log"],
                            wall_time_s=round(time.time() - start, 2),
                            started=start,
                            **fields,
                        )
                    ],
                )
            raise

    def _stages(self, environment: Any, fields: dict[str, Any], start: float) -> dict[str, Any]:
        config, run = self.config, self._run()
        node, nodes = environment.node, environment.num_nodes
        _STOPPING.clear()
        if node == 0:
            prepare_run(config, run, pending=bool(pending_stages(config, run)))
        stages = pending_stages(config, run)
        if node == 0:
            update_status(config, [RunResult(run.name, "running", started=start, **fields)])
        port = _job_port(config.slurm.main_process_port, environment.raw_job_id)
        processes = None
        if config.slurm.gpus_per_node is not None:
            processes = nodes * config.slurm.gpus_per_node
        rendezvous = None
        if nodes > 1:
            rendezvous = Rendezvous(nodes, node, environment.hostnames[0], port)
        commands = {
            "train": train_command(
                config,
                run,
                num_processes=processes,
                rendezvous=rendezvous,
                main_process_port=port,
            ),
            "evaluate": evaluate_command(config, run),
        }
        stages = [(stage, commands.get(stage, command)) for stage, command in stages]
        launcher = self.launcher or functools.partial(
            subprocess_launcher, ignore_preemption_signal=True
        )
        if node > 0:  # the other nodes only take part in the training
            stages = [(stage, command) for stage, command in stages if stage == "train"]
            result = run_stages(
                config, run, stages, launcher, start=start, log_tag=f".node{node}", **fields
            )
            if result.status == "failed":
                raise _RunFailedError(f"run {run.name}, node {node}: {result.message}")
            return {"name": run.name, "status": "completed", "node": node}
        result = run_stages(config, run, stages, launcher, start=start, **fields)
        update_status(config, [result])
        if result.status == "failed":
            # a failed run fails its SLURM job too (sacct shows FAILED); the record has the logs
            raise _RunFailedError(f"run {run.name}: {result.message} (log: {result.log})")
        return dict(vars(result))

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on preemption or time limit, before it requeues the job: stop the
        training (its last complete checkpoint is where the requeued job resumes) and record the
        requeue."""
        stop_children()
        with contextlib.suppress(Exception):  # the record is a courtesy; the requeue is not
            update_status(
                self.config,
                [
                    RunResult(
                        self.run_name,
                        "requeued",
                        message="preempted or at its time limit: requeued, resumes from the "
                        "latest complete checkpoint",
                        started=time.time(),
                        **_job_fields(submitit.JobEnvironment()),
                    )
                ],
            )
        return super().checkpoint(*args, **kwargs)


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
    }
    optional = {
        "gpus_per_node": spec.gpus_per_node,
        "cpus_per_task": spec.cpus_per_task,
        "slurm_partition": spec.partition,
        "slurm_account": spec.account,
        "slurm_qos": spec.qos,
        "slurm_mem": spec.mem,
        "slurm_array_parallelism": spec.array_parallelism,
        "slurm_additional_parameters": dict(spec.sbatch) or None,
        "slurm_setup": list(spec.setup) or None,
    }
    params.update({key: value for key, value in optional.items() if value is not None})
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


@dataclass
class RunView:
    """One row of ``--status``.

    Attributes:
        name: the run.
        state: ``completed``, ``queued``, ``running``, ``failed``, ``interrupted``, ``stopped`` (its
            job ended without a record), ``partial`` (started, not running), ``missing``.
        job_id: its latest SLURM job id.
        slurm_state: SLURM's state of that job, when SLURM still knows it.
        step: the training step safely reached (final, or latest complete checkpoint).
        time_s: the run's time (so far, for a running one).
        log: the log to read (a failed stage's, else the SLURM job's).
        message: why it failed.
    """

    name: str
    state: str
    job_id: str | None = None
    slurm_state: str | None = None
    step: int | None = None
    time_s: float | None = None
    log: str | None = None
    message: str | None = None

    @property
    def resubmittable(self) -> bool:
        """Neither finished nor in SLURM's queue."""
        return self.state not in ("completed", "queued", "running")


def _finished(config: ExperimentConfig, run: RunSpec) -> bool:
    stored = read_json_record(run.run_dir / SPEC_FILE)
    same = isinstance(stored, dict) and stored == run_settings(config, run)
    measured = config.measure is None or measure_done(run.run_dir)
    return same and training_done(run.model_dir) and evaluation_done(run.run_dir) and measured


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
    now = time.time()
    views = []
    for run in runs:
        record = records.get(run.name, {})
        job_id = record.get("job_id")
        slurm_state = slurm.get(job_id) if job_id else None
        view = RunView(
            name=run.name,
            state="missing",
            job_id=job_id,
            slurm_state=slurm_state,
            step=step_reached(run.model_dir),
            time_s=record.get("wall_time_s") or None,
            log=record.get("log") or record.get("slurm_log"),
            message=record.get("message"),
        )
        status = record.get("status")
        if _finished(config, run):
            view.state = "completed"
            if view.time_s is None:
                done = read_json_record(run.model_dir / RUN_RECORD) or {}
                view.time_s = done.get("wall_time_s")
        elif slurm_state in ACTIVE_STATES:
            view.state = "queued" if slurm_state in _QUEUED_STATES else "running"
            if view.state == "running" and record.get("started"):
                view.time_s = round(now - record["started"], 1)
        elif status in ("failed", "interrupted"):
            view.state = status
        elif slurm_state is not None and slurm_state != "COMPLETED":
            view.state = "failed"
            view.message = f"SLURM job {job_id} ended {slurm_state}"
        elif status in _LIVE_RECORDS:
            view.state = "stopped"
            view.message = f"job {job_id} is no longer in SLURM's queue and left no result"
        elif run.model_dir.is_dir() or (run.run_dir / EVALUATION_FILE).exists():
            view.state = "partial"
        views.append(view)
    return views


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_status_table(views: Sequence[RunView]) -> str:
    """A plain-text table: run, state, job id, step, time, and what to read for failed runs."""
    rows = [("run", "state", "job", "step", "time", "log / reason")]
    for view in views:
        state = view.state
        if view.slurm_state and view.state in ("queued", "running"):
            state = f"{view.state} ({view.slurm_state})"
        detail = ""
        if view.state in ("failed", "stopped", "interrupted"):
            detail = " ".join(x for x in (view.message, view.log and f"[{view.log}]") if x)
        rows.append(
            (
                view.name,
                state,
                view.job_id or "-",
                "-" if view.step is None else str(view.step),
                _duration(view.time_s),
                detail,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[5]
        for row in rows
    ]
    counts: dict[str, int] = {}
    for view in views:
        counts[view.state] = counts.get(view.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    return "\n".join([*(line.rstrip() for line in lines), f"{len(views)} runs: {summary}"])


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
    config: ExperimentConfig, todo: Sequence[RunSpec], executor: Any, launcher: Launcher | None
) -> list[RunResult]:
    """Prepare the runs' folders and submit them as one job array; record each job id and log."""
    with RunnerLock(config.output_dir):
        for run in todo:
            prepare_run(config, run, pending=bool(pending_stages(config, run)))
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
    if dry_run or not todo:
        for run in todo:
            results[run.name] = RunResult(run.name, "planned", launcher="slurm")
            log(f"would submit {run.name} ({views[run.name].state})")
        return [results[run.name] for run in runs]
    for result in _submit(config, todo, executor or make_executor(config), launcher):
        results[result.name] = result
        log(f"{result.name}: submitted as job {result.job_id} (log: {result.slurm_log})")
    return [results[run.name] for run in runs]
