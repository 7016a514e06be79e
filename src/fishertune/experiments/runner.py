"""Running an experiment grid: one training and one evaluation subprocess per run, resumable.

Each run gets ``OUTPUT_DIR/runs/NAME/`` holding ``fishertune_experiment.json`` (the run's
settings), the logs ``train.log`` / ``evaluate.log``, ``evaluation.json`` from
``fishertune evaluate``, and ``model/``: what ``fishertune train`` saves (weights, tokenizer,
``trainer_state.json``, ``fishertune_run.json``, checkpoints).

A stage whose output is complete is not run again, so an interrupted grid is resumed by running the
same command: a training run cut off after a checkpoint continues from it (``--resume``), one cut
off before any is started again. A run whose stored training settings differ from the experiment
file is refused instead of being silently reused; one whose evaluation settings changed is
evaluated again. A failing run is recorded in ``OUTPUT_DIR/experiment_status.json`` and the grid
goes on.

Runs are subprocesses rather than calls in this process so that every run starts from a fresh
CUDA context and RNG state, a crash cannot take the grid down, and the multi-GPU path is the same
``accelerate launch`` command a user would type.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.experiments.grid import MODEL_SUBDIR, ExperimentConfig, RunSpec, expand_grid
from fishertune.files import write_json_atomic

__all__ = [
    "EVALUATION_FILE",
    "RUN_FILE",
    "SPEC_FILE",
    "STATUS_FILE",
    "Launcher",
    "RunResult",
    "check_stored_specs",
    "evaluate_command",
    "evaluation_done",
    "format_command",
    "override_flags",
    "pending_stages",
    "restart_flags",
    "run_experiment",
    "run_settings",
    "select_runs",
    "subprocess_launcher",
    "train_command",
    "training_done",
    "write_json_atomic",
]

RUN_FILE = "fishertune_run.json"
EVALUATION_FILE = "evaluation.json"
SPEC_FILE = "fishertune_experiment.json"
STATUS_FILE = "experiment_status.json"

Launcher = Callable[[list[str], Path, dict[str, str]], int]
"""``launcher(command, log_path, env) -> return code``: runs one stage of one run, with the
experiment's ``env`` added to the environment."""


@dataclass
class RunResult:
    """What happened to one run in this invocation.

    Attributes:
        name: the run's name.
        status: ``completed`` (both stages ran or were already done), ``skipped`` (nothing to do),
            ``failed``, or ``planned`` (dry run).
        stage: the stage that failed (``train`` or ``evaluate``), if any.
        returncode: the failing stage's exit status.
        message: why it failed.
        log: the failing stage's log file.
        wall_time_s: seconds spent on this run in this invocation.
    """

    name: str
    status: str
    stage: str | None = None
    returncode: int | None = None
    message: str | None = None
    log: str | None = None
    wall_time_s: float = 0.0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training_done(model_dir: Path) -> bool:
    """Whether ``fishertune train`` finished in ``model_dir`` (``fishertune_run.json`` says so)."""
    record = _read_json(model_dir / RUN_FILE)
    return isinstance(record, dict) and record.get("status") == "completed"


def evaluation_done(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete ``evaluation.json`` (written atomically at the end)."""
    record = _read_json(run_dir / EVALUATION_FILE)
    return isinstance(record, dict) and isinstance(record.get("metrics"), dict)


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


def train_command(config: ExperimentConfig, run: RunSpec) -> list[str]:
    """The ``fishertune train`` command of a run (through ``accelerate launch`` if configured)."""
    train = [
        "-m",
        "fishertune.cli",
        "train",
        "--config",
        str(run.base_config),
        *override_flags(run.overrides),
        "--output_dir",
        str(run.model_dir),
        *restart_flags(run.model_dir),
    ]
    if config.launcher == "local":
        return [sys.executable, *train]
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if config.accelerate_config is not None:
        launch += ["--config_file", str(config.accelerate_config)]
    if config.num_processes is not None:
        launch += ["--num_processes", str(config.num_processes)]
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


def subprocess_launcher(
    command: list[str], log_path: Path, env: dict[str, str] | None = None
) -> int:
    """Run ``command`` with ``env`` added to the environment and its output appended to
    ``log_path``; return its exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("a") as log:
        log.write(f"\n$ {format_command(command, env)}\n")
        log.flush()
        return subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=full_env, check=False
        ).returncode


def _normalized(value: Any) -> Any:
    # Through JSON and back, so tuples and lists (and int/float keys) compare as stored.
    return json.loads(json.dumps(value))


def run_settings(config: ExperimentConfig, run: RunSpec) -> dict[str, Any]:
    """What ``fishertune_experiment.json`` stores: the run's identity, training overrides and
    evaluation settings."""
    return _normalized({**run.to_json(), "evaluation": asdict(config.evaluation)})


def _changed_training(stored: Any, current: dict[str, Any]) -> bool:
    return isinstance(stored, dict) and any(
        stored.get(key) != current[key] for key in ("base_config", "overrides")
    )


def check_stored_specs(config: ExperimentConfig, runs: list[RunSpec]) -> None:
    """Refuse run folders that hold runs trained with other settings than the experiment's.

    Raises:
        FishertuneError: naming the runs whose ``fishertune_experiment.json`` differs.
    """
    changed = [
        run.name
        for run in runs
        if _changed_training(_read_json(run.run_dir / SPEC_FILE), run_settings(config, run))
    ]
    if changed:
        raise FishertuneError(
            f"run folder(s) {', '.join(changed)} under {config.runs_dir} hold runs trained with "
            f"other settings (see their {SPEC_FILE}); choose another output_dir or delete those "
            "folders"
        )


def _evaluation_stale(config: ExperimentConfig, run: RunSpec) -> bool:
    """An ``evaluation.json`` made with other evaluation settings than the experiment's."""
    stored = _read_json(run.run_dir / SPEC_FILE)
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
    return stages


def _write_status(config: ExperimentConfig, results: list[RunResult]) -> None:
    """Update ``experiment_status.json``: runs of earlier invocations keep their entries."""
    path = config.output_dir / STATUS_FILE
    previous = _read_json(path)
    entries: dict[str, dict[str, Any]] = {}
    if isinstance(previous, dict) and isinstance(previous.get("runs"), list):
        entries = {e["name"]: e for e in previous["runs"] if isinstance(e, dict) and "name" in e}
    entries.update({result.name: asdict(result) for result in results})
    order = {run.name: index for index, run in enumerate(expand_grid(config))}
    write_json_atomic(
        path,
        {
            "experiment": str(config.path),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "runs": sorted(entries.values(), key=lambda e: order.get(e["name"], len(order))),
        },
    )


def _run_one(
    config: ExperimentConfig, run: RunSpec, launcher: Launcher, log: Callable[[str], None]
) -> RunResult:
    start = time.perf_counter()
    stages = pending_stages(config, run)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if stages:
        # A new training or new evaluation settings make the old scores meaningless; removing them
        # first also means a failed evaluation can never leave old numbers in the report.
        (run.run_dir / EVALUATION_FILE).unlink(missing_ok=True)
    write_json_atomic(run.run_dir / SPEC_FILE, run_settings(config, run))
    checks: dict[str, tuple[Callable[[], bool], str]] = {
        "train": (lambda: training_done(run.model_dir), f"{MODEL_SUBDIR}/{RUN_FILE}"),
        "evaluate": (lambda: evaluation_done(run.run_dir), EVALUATION_FILE),
    }
    for stage, command in stages:
        log_path = run.run_dir / f"{stage}.log"
        log(f"  {stage}: {format_command(command, config.env)}")
        code = launcher(command, log_path, dict(config.env))
        done, product = checks[stage]
        message = None
        if code != 0:
            message = f"{stage} exited with status {code}"
        elif not done():
            message = f"{stage} exited with status 0 but {product} is missing or incomplete"
        if message is not None:
            return RunResult(
                name=run.name,
                status="failed",
                stage=stage,
                returncode=code,
                message=message,
                log=str(log_path),
                wall_time_s=round(time.perf_counter() - start, 2),
            )
    return RunResult(
        name=run.name,
        status="completed" if stages else "skipped",
        wall_time_s=round(time.perf_counter() - start, 2),
    )


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


def run_experiment(
    config: ExperimentConfig,
    *,
    launcher: Launcher | None = None,
    dry_run: bool = False,
    only: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[RunResult]:
    """Train and evaluate every unfinished run of the grid, one at a time, in order.

    Args:
        config: the validated experiment.
        launcher: runs one command; defaults to :func:`subprocess_launcher`.
        dry_run: only print the commands of the stages that would run.
        only: restrict to these run names or row labels (``method[-ablation]``).
        log: where progress lines go.

    Returns:
        One :class:`RunResult` per selected run; failed runs do not stop the grid.

    Raises:
        FishertuneError: when ``only`` names no run, or a run folder holds a run trained with
            other settings (checked for every selected run before anything is launched).
    """
    runs = select_runs(config, only)
    check_stored_specs(config, runs)
    launcher = launcher or subprocess_launcher
    results: list[RunResult] = []
    for index, run in enumerate(runs, 1):
        prefix = f"[{index}/{len(runs)}] {run.name}"
        if dry_run:
            stages = pending_stages(config, run)
            log(f"# {prefix}" + ("" if stages else ": finished, skipped"))
            for _, command in stages:
                log(format_command(command, config.env))
            results.append(RunResult(run.name, "planned" if stages else "skipped"))
            continue
        log(prefix)
        result = _run_one(config, run, launcher, log)
        if result.status == "failed":
            log(f"  FAILED: {result.message} (log: {result.log})")
        elif result.status == "skipped":
            log("  finished earlier, skipped")
        results.append(result)
        _write_status(config, results)
    return results
