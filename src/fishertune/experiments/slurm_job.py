"""The SLURM job of one run (``--launcher slurm``): what each job of the grid's job array runs.

Every node of a run's job runs :class:`RunJob`; it runs the run as the local launcher does
(:func:`fishertune.experiments.stages.run_run`), with the training as one ``accelerate launch``
per node meeting at the job's first host. On preemption or at its time limit submitit calls
:meth:`RunJob.checkpoint`, which stops the training and lets submitit requeue the job; the
requeued job recomputes everything from the run folder and resumes from the latest complete
checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.experiments.commands import Rendezvous
from fishertune.experiments.grid import ExperimentConfig, RunSpec, expand_grid
from fishertune.experiments.processes import (
    Launcher,
    allow_children,
    stop_children,
    subprocess_launcher,
)
from fishertune.experiments.stages import RunResult, run_run, update_status

try:  # submitit is the `train` extra's; the local launcher works without it
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - exercised only without the extra
    submitit = None
    Checkpointable = object

__all__ = ["RunJob"]


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
        allow_children()
        port = _job_port(config.slurm.main_process_port, environment.raw_job_id)
        processes = None
        if config.slurm.gpus_per_node is not None:
            processes = nodes * config.slurm.gpus_per_node
        rendezvous = None
        if nodes > 1:
            rendezvous = Rendezvous(nodes, node, environment.hostnames[0], port)
        launcher = self.launcher or functools.partial(
            subprocess_launcher, ignore_preemption_signal=True
        )
        result = run_run(
            config,
            run,
            launcher,
            train_options={
                "num_processes": processes,
                "rendezvous": rendezvous,
                "main_process_port": port,
            },
            node=node,
            # node 0 records the attempt once its folder is ready
            on_start=lambda: update_status(
                config, [RunResult(run.name, "running", started=start, **fields)]
            ),
            start=start,
            **fields,
        )
        if node > 0:
            if result.status == "failed":
                raise _RunFailedError(f"run {run.name}, node {node}: {result.message}")
            return {"name": run.name, "status": "completed", "node": node}
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
