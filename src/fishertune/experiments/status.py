"""``--status``: where every run of a grid stands, from its run folder, its entry in
``experiment_status.json`` and SLURM's state of its latest job, as a plain-text table."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fishertune.experiments.grid import ExperimentConfig, RunSpec
from fishertune.experiments.stages import same_settings, stored_settings
from fishertune.files import EVALUATION_FILE, RunFolder

__all__ = ["ACTIVE_STATES", "RunView", "format_status_table", "run_views"]

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
QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
# the records' own states of an attempt that is (as far as they know) still in SLURM's hands
LIVE_RECORDS = ("submitted", "running", "requeued")


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


def _finished(config: ExperimentConfig, run: RunSpec, folder: RunFolder) -> bool:
    from fishertune.experiments.grid import BASE_RUN

    measured = (
        config.measure is None
        or not config.measure.measures(run.seed, base=run.name == BASE_RUN)
        or folder.measured
    )
    same = same_settings(folder.spec, stored_settings(config, run))
    return same and folder.trained and folder.evaluated and measured


def run_views(
    config: ExperimentConfig,
    runs: Sequence[RunSpec],
    records: dict[str, dict[str, Any]],
    slurm: dict[str, str],
) -> list[RunView]:
    """One :class:`RunView` per run, from its folder, its status ``records`` entry and
    ``slurm`` (SLURM's state by job id; jobs it no longer knows are left out)."""
    now = time.time()
    views = []
    for run in runs:
        folder = RunFolder(run.run_dir)
        record = records.get(run.name, {})
        job_id = record.get("job_id")
        slurm_state = slurm.get(job_id) if job_id else None
        view = RunView(
            name=run.name,
            state="missing",
            job_id=job_id,
            slurm_state=slurm_state,
            step=folder.step,
            time_s=record.get("wall_time_s") or None,
            log=record.get("log") or record.get("slurm_log"),
            message=record.get("message"),
        )
        status = record.get("status")
        if _finished(config, run, folder):
            view.state = "completed"
            if view.time_s is None:
                view.time_s = (folder.run_record or {}).get("wall_time_s")
        elif slurm_state in ACTIVE_STATES:
            view.state = "queued" if slurm_state in QUEUED_STATES else "running"
            if view.state == "running" and record.get("started"):
                view.time_s = round(now - record["started"], 1)
        elif status in ("failed", "interrupted"):
            view.state = status
        elif slurm_state is not None and slurm_state != "COMPLETED":
            view.state = "failed"
            view.message = f"SLURM job {job_id} ended {slurm_state}"
        elif status in LIVE_RECORDS:
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
