"""Running an experiment grid: one training and one evaluation subprocess per run, resumable.

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
with it. A lock (``OUTPUT_DIR/.fishertune-runner.lock``, holding the owner's PID) keeps a second
runner off the same output directory. ``--parallel N`` runs N runs at once, each on its own GPUs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError, first_line
from fishertune.experiments.grid import (
    BASE_RUN,
    MODEL_SUBDIR,
    ExperimentConfig,
    RunSpec,
    expand_grid,
)
from fishertune.files import (
    CHECKPOINT_RECORD,
    RUN_RECORD,
    FolderLock,
    read_json_record,
    write_json_atomic,
)

__all__ = [
    "EVALUATION_FILE",
    "LOCK_FILE",
    "MEASURE_FILE",
    "RUN_RECORD",
    "SPEC_FILE",
    "STATUS_FILE",
    "Launcher",
    "Rendezvous",
    "RunResult",
    "RunnerLock",
    "check_stored_specs",
    "evaluate_command",
    "evaluation_done",
    "format_command",
    "gpu_slots",
    "measure_command",
    "measure_done",
    "override_flags",
    "pending_stages",
    "prepare_run",
    "read_status",
    "restart_flags",
    "run_experiment",
    "run_settings",
    "select_runs",
    "step_reached",
    "stop_children",
    "subprocess_launcher",
    "train_command",
    "training_done",
    "update_status",
    "validate_grid",
    "validate_train_flags",
    "write_json_atomic",
]

EVALUATION_FILE = "evaluation.json"
MEASURE_FILE = "curvature.json"
SPEC_FILE = "fishertune_experiment.json"
STATUS_FILE = "experiment_status.json"
LOCK_FILE = ".fishertune-runner.lock"

Launcher = Callable[[list[str], Path, dict[str, str]], int]
"""``launcher(command, log_path, env) -> return code``: runs one stage of one run, with the
experiment's ``env`` added to the environment."""


@dataclass
class RunResult:
    """What happened to one run in this invocation.

    Attributes:
        name: the run's name.
        status: ``completed`` (both stages ran or were already done), ``skipped`` (nothing to do),
            ``failed``, ``interrupted`` (the runner or the job was stopped), ``planned`` (dry run),
            or under SLURM ``submitted``, ``running``, ``requeued``.
        stage: the stage that failed (``train`` or ``evaluate``), if any.
        returncode: the failing stage's exit status.
        message: why it failed.
        log: the failing stage's log file.
        wall_time_s: seconds spent on this run in this invocation.
        launcher: ``local`` or ``slurm``.
        job_id: the SLURM job id (``ARRAY_TASK`` for array jobs).
        slurm_log: the SLURM job's own log (submitit's stdout file).
        started: when this attempt started (``time.time()``), for the elapsed time of live runs.
    """

    name: str
    status: str
    stage: str | None = None
    returncode: int | None = None
    message: str | None = None
    log: str | None = None
    wall_time_s: float = 0.0
    launcher: str = "local"
    job_id: str | None = None
    slurm_log: str | None = None
    started: float | None = None


def training_done(model_dir: Path) -> bool:
    """Whether ``fishertune train`` finished in ``model_dir`` (``fishertune_run.json`` says so)."""
    record = read_json_record(model_dir / RUN_RECORD)
    return isinstance(record, dict) and record.get("status") == "completed"


def evaluation_done(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete ``evaluation.json`` (written atomically at the end)."""
    record = read_json_record(run_dir / EVALUATION_FILE)
    return isinstance(record, dict) and isinstance(record.get("metrics"), dict)


def measure_done(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete ``curvature.json`` (the ``measure`` stage's)."""
    record = read_json_record(run_dir / MEASURE_FILE)
    return isinstance(record, dict) and isinstance(record.get("final"), dict)


def _checkpoint_steps(model_dir: Path) -> list[int]:
    # The same rule as fishertune.training.cli.latest_checkpoint (a checkpoint counts once its
    # record is written), without importing the training stack for a status table.
    steps = []
    for child in model_dir.glob("checkpoint-*"):
        suffix = child.name.split("-", 1)[1]
        if suffix.isdigit() and (child / CHECKPOINT_RECORD).is_file():
            steps.append(int(suffix))
    return steps


def step_reached(model_dir: Path) -> int | None:
    """The training step a run has safely reached: its final step once finished, else its latest
    complete checkpoint's; ``None`` when it has neither."""
    record = read_json_record(model_dir / RUN_RECORD)
    if isinstance(record, dict) and record.get("status") == "completed":
        step = record.get("global_step")
        if isinstance(step, int):
            return step
        state = read_json_record(model_dir / "trainer_state.json")
        if isinstance(state, dict) and isinstance(state.get("global_step"), int):
            return state["global_step"]
    steps = _checkpoint_steps(model_dir)
    return max(steps) if steps else None


def _holds_work(run: RunSpec) -> bool:
    """A trained model or a complete checkpoint: something a cleanup would lose."""
    return training_done(run.model_dir) or bool(_checkpoint_steps(run.model_dir))


def _flag_values(key: str, value: Any) -> list[str]:
    # TRL/HfArgumentParser conventions: booleans as true/false, lists as several values
    # (nargs="+"), mappings as a JSON string (dict-typed fields parse JSON).
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, (list, tuple)):
        if not value:
            raise FishertuneError(
                f"override {key}: an empty list cannot be given on a command line"
            )
        return [json.dumps(v) if isinstance(v, dict) else str(v) for v in value]
    if isinstance(value, dict):
        return [json.dumps(value)]
    return [str(value)]


def override_flags(overrides: dict[str, Any]) -> list[str]:
    """``{"neftune_alpha": 5, "bf16": True}`` -> ``["--neftune_alpha", "5", "--bf16", "true"]``."""
    flags: list[str] = []
    for key, value in overrides.items():
        flags += [f"--{key}", *_flag_values(key, value)]
    return flags


def restart_flags(model_dir: Path) -> list[str]:
    """Flags that let ``fishertune train`` reuse ``model_dir`` after an interrupted run.

    ``fishertune train`` refuses a non-empty output folder: continue from the latest complete
    checkpoint when there is one, otherwise start that run again from scratch.
    """
    from fishertune.training.cli import latest_checkpoint

    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        return []
    if latest_checkpoint(model_dir) is not None:
        return ["--resume", "true"]
    return ["--overwrite_output_dir", "true"]


@dataclass(frozen=True)
class Rendezvous:
    """Where the processes of one run spread over several machines meet: ``accelerate launch``'s
    ``--num_machines``, ``--machine_rank``, ``--main_process_ip`` and ``--main_process_port``."""

    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int


def train_command(
    config: ExperimentConfig,
    run: RunSpec,
    *,
    num_processes: int | None = None,
    rendezvous: Rendezvous | None = None,
    main_process_port: int | None = None,
    restart: bool = True,
) -> list[str]:
    """The ``fishertune train`` command of a run (through ``accelerate launch`` if configured).

    Args:
        config: the experiment.
        run: the run.
        num_processes: total processes of an ``accelerate launch`` (default: the file's).
        rendezvous: the machine flags of a multi-node run (one command per node).
        main_process_port: the rendezvous port of a single-machine ``accelerate launch`` (runs
            side by side on one machine need different ones).
        restart: add the flags that continue or restart an interrupted run in ``run.model_dir``.
    """
    train = [
        "-m",
        "fishertune.cli",
        "train",
        "--config",
        str(run.base_config),
        *override_flags(run.overrides),
        "--output_dir",
        str(run.model_dir),
        *(restart_flags(run.model_dir) if restart else []),
    ]
    if config.launcher == "local":
        return [sys.executable, *train]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if config.accelerate_config is not None:
        launch += ["--config_file", str(config.accelerate_config)]
    processes = num_processes if num_processes is not None else config.num_processes
    if processes is not None:
        launch += ["--num_processes", str(processes)]
    if rendezvous is not None:
        launch += [
            "--num_machines",
            str(rendezvous.num_machines),
            "--machine_rank",
            str(rendezvous.machine_rank),
            "--main_process_ip",
            rendezvous.main_process_ip,
            "--main_process_port",
            str(rendezvous.main_process_port),
            # each node runs its own launcher (srun): DeepSpeed's default multi-node launcher
            # (pdsh over ssh) would start the other nodes a second time; ignored without DeepSpeed
            "--deepspeed_multinode_launcher",
            "standard",
        ]
    elif main_process_port is not None:
        launch += ["--main_process_port", str(main_process_port)]
    return [*launch, *train]


def evaluate_command(config: ExperimentConfig, run: RunSpec) -> list[str]:
    """The ``fishertune evaluate`` command of a run (one process; lm-eval and the exports)."""
    spec = config.evaluation
    command = [
        sys.executable,
        "-m",
        "fishertune.cli",
        "evaluate",
        "--model",
        str(run.model_dir),
        "--tasks",
        ",".join(spec.tasks),
        "--output",
        str(run.run_dir / EVALUATION_FILE),
        "--seed",
        str(run.seed),
    ]
    options: dict[str, Any] = {
        "limit": spec.limit,
        "batch_size": spec.batch_size,
        "max_new_tokens": spec.max_new_tokens,
        "max_length": spec.max_length,
        "dataset": spec.dataset,
        "num_fewshot": spec.num_fewshot,
        "model_args": spec.model_args,
        "device": spec.device,
        "alpacaeval_questions": spec.alpacaeval_questions,
        "mtbench_questions": spec.mtbench_questions,
        "answer_max_new_tokens": spec.answer_max_new_tokens,
    }
    for key, value in options.items():
        if value is not None:
            command += [f"--{key}", str(value)]
    for include in spec.include_path:
        command += ["--include_path", include]
    if spec.alpacaeval_questions or spec.mtbench_questions:
        command += ["--answers_dir", str(run.run_dir / "answers"), "--model_id", run.name]
    return [*command, *spec.extra_args]


def measure_command(config: ExperimentConfig, run: RunSpec) -> list[str]:
    """The ``measure`` stage of a run: :mod:`fishertune.experiments.curvature` on its model (and
    its checkpoints), settings from the grid's ``measure:`` block."""
    spec = config.measure
    if spec is None:
        raise FishertuneError(f"{config.path}: no measure: block")
    command = [
        sys.executable,
        "-m",
        "fishertune.experiments.curvature",
        "--model",
        str(run.model_dir),
        "--output",
        str(run.run_dir / MEASURE_FILE),
        "--data",
        str(run.overrides.get("dataset_name", "builtin:tiny-tasks")),
        "--split",
        spec.split,
        "--batches",
        str(spec.batches),
        "--batch_size",
        str(spec.batch_size),
        "--probes",
        str(spec.probes),
        "--max_length",
        str(spec.max_length),
        "--seed",
        str(spec.seed),
    ]
    if spec.fisher_draws is not None:
        command += ["--fisher_draws", str(spec.fisher_draws)]
    if spec.checkpoints:
        command += ["--checkpoints"]
    return command


def format_command(command: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Shell-quoted command line as a user would type it (``accelerate launch``, ``fishertune``),
    preceded by the ``env`` assignments."""
    shown = list(command)
    if shown[:3] == [sys.executable, "-m", "accelerate.commands.launch"]:
        shown = ["accelerate", "launch", *shown[3:]]
    elif shown[:3] == [sys.executable, "-m", "fishertune.cli"]:
        shown = ["fishertune", *shown[3:]]
    assignments = [f"{key}={shlex.quote(value)}" for key, value in (env or {}).items()]
    return " ".join([*assignments, shlex.join(shown)])


# Children of this process that are running now, so that stopping the runner (from any thread's
# point of view) can kill each one's process group; set when the runner is being stopped, so that
# no new child starts after that.
_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _kill_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group (an ``accelerate launch`` and its workers), then SIGKILL
    what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            # the group leader is gone; workers it left behind still share its group id
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_children() -> None:
    """Kill the process group of every running child and start no new one (until the next
    :func:`run_experiment`)."""
    _STOPPING.set()
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for child in children:
        _kill_group(child)


def _ignore_preemption_signal() -> None:
    # In a SLURM job the preemption / time-limit signal (USR2, submitit's) reaches every process
    # of the job step; only the job's own handler should act on it (it stops the child and
    # requeues), so children inherit an ignored disposition (kept across exec).
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def subprocess_launcher(
    command: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    *,
    ignore_preemption_signal: bool = False,
) -> int:
    """Run ``command`` with ``env`` added to the environment and its output appended to
    ``log_path``; return its exit status.

    The child runs in its own session (process group): when this call is interrupted (Ctrl-C,
    SIGTERM turned into an exception, ``SystemExit`` from a signal handler) or
    :func:`stop_children` is called, the whole group is terminated, so no training outlives the
    runner that started it. ``ignore_preemption_signal`` (inside a SLURM job, which has no other
    threads: ``preexec_fn`` is unsafe with threads) makes the child ignore USR2.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("a") as log:
        log.write(f"\n$ {format_command(command, env)}\n")
        log.flush()
        if _STOPPING.is_set():
            log.write("not started: the runner is stopping\n")
            return -int(signal.SIGTERM)
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
            preexec_fn=_ignore_preemption_signal if ignore_preemption_signal else None,
        )
        with _CHILDREN_LOCK:
            _CHILDREN.add(process)
        try:
            return process.wait()
        except BaseException:
            _kill_group(process)
            raise
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(process)


def _normalized(value: Any) -> Any:
    # Through JSON and back, so tuples and lists (and int/float keys) compare as stored.
    return json.loads(json.dumps(value))


def run_settings(config: ExperimentConfig, run: RunSpec) -> dict[str, Any]:
    """What ``fishertune_experiment.json`` stores: the run's identity, training overrides and
    evaluation settings."""
    settings = {**run.to_json(), "evaluation": asdict(config.evaluation)}
    if config.measure is not None:
        settings["measure"] = asdict(config.measure)
    return _normalized(settings)


def _changed_training(stored: Any, current: dict[str, Any]) -> bool:
    if not isinstance(stored, dict):
        return False
    # the preset by content (records written before the hash existed: by path)
    preset = "base_config_sha256" if "base_config_sha256" in stored else "base_config"
    return any(stored.get(key) != current[key] for key in (preset, "overrides"))


def check_stored_specs(config: ExperimentConfig, runs: list[RunSpec]) -> list[RunSpec]:
    """Refuse run folders that hold work trained with other settings than the experiment's.

    A folder whose stored settings differ but which holds no work (no finished training, no
    complete checkpoint: what a failed attempt leaves) is not in the way: it is returned, and
    :func:`prepare_run` clears it when that run is launched.

    Returns:
        The runs whose folders are such debris.

    Raises:
        FishertuneError: naming the runs whose ``fishertune_experiment.json`` differs and whose
            folder holds a trained model or a checkpoint.
    """
    changed = [
        run
        for run in runs
        if _changed_training(read_json_record(run.run_dir / SPEC_FILE), run_settings(config, run))
    ]
    kept = [run.name for run in changed if _holds_work(run)]
    if kept:
        raise FishertuneError(
            f"run folder(s) {', '.join(kept)} under {config.runs_dir} hold runs trained with "
            f"other settings (see their {SPEC_FILE}); choose another output_dir or delete those "
            "folders"
        )
    return changed


def validate_train_flags(argv: list[str]) -> None:
    """Check a ``fishertune train`` argument list as ``fishertune train`` would, without training.

    :func:`fishertune.training.cli.validate_train_argv` checks the YAML's keys, every flag's name
    and value, the method's options, sizes and rates, and every row of a local data file; the
    run folder itself is the runner's to check (debris of failed attempts is cleared at launch).
    ``--use_cpu true`` is added: the machine that checks the grid (a SLURM login node) need not
    have the GPUs that ``bf16`` asks for; the job's own ``fishertune train`` checks the hardware.

    Raises:
        FishertuneError: one line naming the problem.
    """
    import warnings

    from fishertune.training.cli import validate_train_argv

    with warnings.catch_warnings():  # deprecation notes belong in the run's own train.log
        warnings.simplefilter("ignore")
        validate_train_argv([*argv, "--use_cpu", "true"], check_output_dir=False)


def validate_grid(config: ExperimentConfig, runs: Sequence[RunSpec]) -> None:
    """Check every run's full training configuration before the first one starts.

    Raises:
        FishertuneError: naming the first run whose configuration ``fishertune train`` refuses.
    """
    for run in runs:
        command = train_command(config, run, restart=False)
        argv = command[command.index("train") + 1 :]
        try:
            validate_train_flags(argv)
        except FishertuneError as err:
            raise FishertuneError(
                f"{config.path}: run {run.name} (method {run.method!r}"
                + (f", ablation {run.ablation!r}" if run.ablation else "")
                + f"): {err}"
            ) from err


def _evaluation_stale(config: ExperimentConfig, run: RunSpec) -> bool:
    """An ``evaluation.json`` made with other evaluation settings than the experiment's."""
    stored = read_json_record(run.run_dir / SPEC_FILE)
    current = run_settings(config, run)["evaluation"]
    return isinstance(stored, dict) and stored.get("evaluation") != current


def pending_stages(config: ExperimentConfig, run: RunSpec) -> list[tuple[str, list[str]]]:
    """The stages of a run still to do, with their commands: ``train`` and/or ``evaluate``."""
    stages = []
    trained = training_done(run.model_dir)
    if not trained:
        stages.append(("train", train_command(config, run)))
    if not trained or not evaluation_done(run.run_dir) or _evaluation_stale(config, run):
        stages.append(("evaluate", evaluate_command(config, run)))
    if config.measure is not None and (
        not trained or not measure_done(run.run_dir) or _measure_stale(config, run)
    ):
        stages.append(("measure", measure_command(config, run)))
    return stages


def _measure_stale(config: ExperimentConfig, run: RunSpec) -> bool:
    """A ``curvature.json`` made with other ``measure:`` settings than the experiment's."""
    stored = read_json_record(run.run_dir / SPEC_FILE)
    current = run_settings(config, run).get("measure")
    return isinstance(stored, dict) and stored.get("measure") != current


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[Any]:
    """An exclusive ``flock`` on ``path`` for the ``with`` block (blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_status(output_dir: Path) -> dict[str, dict[str, Any]]:
    """The runs' entries of ``OUTPUT_DIR/experiment_status.json``, by run name."""
    previous = read_json_record(output_dir / STATUS_FILE)
    if isinstance(previous, dict) and isinstance(previous.get("runs"), list):
        return {e["name"]: e for e in previous["runs"] if isinstance(e, dict) and "name" in e}
    return {}


def update_status(
    config: ExperimentConfig, results: Sequence[RunResult], *, unless_same_job: bool = False
) -> None:
    """Replace these runs' entries of ``experiment_status.json``; other runs keep theirs.

    Several writers share the file (the runner, and SLURM jobs each recording their own run), so
    the read-modify-write holds a lock on ``experiment_status.json.lock``. ``unless_same_job``
    keeps an entry that already speaks of the same job (a job that started before its
    submission was recorded).
    """
    path = config.output_dir / STATUS_FILE
    with _file_lock(path.with_name(STATUS_FILE + ".lock")):
        entries = read_status(config.output_dir)
        for result in results:
            old = entries.get(result.name, {})
            if unless_same_job and result.job_id and old.get("job_id") == result.job_id:
                continue
            entries[result.name] = asdict(result)
        order = {run.name: index for index, run in enumerate(expand_grid(config))}
        write_json_atomic(
            path,
            {
                "experiment": str(config.path),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "runs": sorted(entries.values(), key=lambda e: order.get(e["name"], len(order))),
            },
        )


class RunnerLock(FolderLock):
    """``with RunnerLock(output_dir):`` one runner per output directory: a
    :class:`~fishertune.files.FolderLock` on ``OUTPUT_DIR/.fishertune-runner.lock`` (the owner's
    PID and host, taken over when its owner died)."""

    def __init__(self, output_dir: Path) -> None:
        super().__init__(Path(output_dir) / LOCK_FILE, "fishertune experiment", output_dir)


def prepare_run(config: ExperimentConfig, run: RunSpec, *, pending: bool) -> None:
    """Make a run's folder ready for its stages: clear the debris of an attempt with other
    settings (a folder :func:`check_stored_specs` let through), drop an ``evaluation.json`` that
    the pending stages will replace, and write the run's settings file."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    stored = read_json_record(run.run_dir / SPEC_FILE)
    if _changed_training(stored, run_settings(config, run)):
        if _holds_work(run):  # checked before, but never delete work on a race
            raise FishertuneError(f"{run.run_dir} holds a run trained with other settings")
        shutil.rmtree(run.model_dir, ignore_errors=True)
        shutil.rmtree(run.run_dir / "answers", ignore_errors=True)
        pending = True
        stages = {"train", "evaluate", "measure"}
    else:
        stages = {stage for stage, _ in pending_stages(config, run)} if pending else set()
    if pending:
        # A new training or new evaluation settings make the old scores meaningless; removing them
        # first also means a failed evaluation can never leave old numbers in the report.
        if stages & {"train", "evaluate"}:
            (run.run_dir / EVALUATION_FILE).unlink(missing_ok=True)
        if stages & {"train", "measure"}:
            (run.run_dir / MEASURE_FILE).unlink(missing_ok=True)
    write_json_atomic(run.run_dir / SPEC_FILE, run_settings(config, run))


def run_stages(
    config: ExperimentConfig,
    run: RunSpec,
    stages: Sequence[tuple[str, list[str]]],
    launch: Launcher,
    *,
    env: dict[str, str] | None = None,
    start: float | None = None,
    log_tag: str = "",
    **fields: Any,
) -> RunResult:
    """Run a run's stages in order with ``launch``; the first failing one ends the run.

    A stage fails when its exit status is not 0 or when it exits 0 without its product
    (``model/fishertune_run.json``, ``evaluation.json``) complete; the product is checked only
    for the main log (``log_tag`` empty): another node of a multi-node run finishes before the
    main one has written it. Stage ``s`` logs to ``s{log_tag}.log`` in the run folder.
    ``fields`` go into the result (``launcher``, ``job_id``, ``slurm_log``).
    """
    start = time.time() if start is None else start
    checks: dict[str, tuple[Callable[[], bool], str]] = {
        "train": (lambda: training_done(run.model_dir), f"{MODEL_SUBDIR}/{RUN_RECORD}"),
        "evaluate": (lambda: evaluation_done(run.run_dir), EVALUATION_FILE),
        "measure": (lambda: measure_done(run.run_dir), MEASURE_FILE),
    }
    for stage, command in stages:
        log_path = run.run_dir / f"{stage}{log_tag}.log"
        code = launch(command, log_path, {**config.env, **(env or {})})
        done, product = checks[stage]
        message = None
        if code != 0:
            message = f"{stage} exited with status {code}"
        elif not log_tag and not done():
            message = f"{stage} exited with status 0 but {product} is missing or incomplete"
        if message is not None:
            return RunResult(
                name=run.name,
                status="failed",
                stage=stage,
                returncode=code,
                message=message,
                log=str(log_path),
                wall_time_s=round(time.time() - start, 2),
                started=start,
                **fields,
            )
    return RunResult(
        name=run.name,
        status="completed" if stages else "skipped",
        wall_time_s=round(time.time() - start, 2),
        started=start,
        **fields,
    )


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
        return _run_stages(config, run, launcher, env=env, main_process_port=main_process_port)
    except (FishertuneError, OSError) as err:
        return RunResult(
            name=run.name,
            status="failed",
            message=first_line(err),
            wall_time_s=round(time.time() - start, 2),
            started=start,
        )


def _run_stages(
    config: ExperimentConfig,
    run: RunSpec,
    launcher: Launcher,
    *,
    env: dict[str, str] | None = None,
    main_process_port: int | None = None,
) -> RunResult:
    start = time.time()
    prepare_run(config, run, pending=bool(pending_stages(config, run)))
    stages = pending_stages(config, run)  # after the debris of another attempt is gone
    if main_process_port is not None:
        stages = [
            (stage, train_command(config, run, main_process_port=main_process_port))
            if stage == "train"
            else (stage, command)
            for stage, command in stages
        ]
    return run_stages(config, run, stages, launcher, env=env, start=start)


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
    from fishertune.experiments.slurm import ACTIVE_STATES, slurm_states

    states = slurm_states(list(live.values()), config.slurm_dir)
    active = [
        f"{name} (job {job})" for name, job in live.items() if states.get(job) in ACTIVE_STATES
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
    validate_grid(config, runs)
    debris = {run.name for run in check_stored_specs(config, runs)}
    if dry_run:
        return _print_plan(config, runs, debris, log)
    slots: list[str | None] = [None]
    if parallel > 1:
        per_run = config.num_processes if config.launcher == "accelerate" else None
        slots = gpu_slots(parallel, gpus, per_run)
    launcher = launcher or subprocess_launcher
    _STOPPING.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        with RunnerLock(config.output_dir):
            _refuse_live_slurm_jobs(config, runs)
            if config.base_run is None or runs[0].name != BASE_RUN or len(runs) == 1:
                return _run_queue(config, runs, launcher, slots, log)
            return _run_base_first(config, runs, launcher, slots, log)
    finally:
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
