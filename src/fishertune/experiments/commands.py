"""The command lines of a run's stages: ``fishertune train`` (through ``accelerate launch`` when
the grid says so), ``fishertune evaluate`` and the ``measure`` stage, and how they are shown."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.experiments.grid import ExperimentConfig, RunSpec
from fishertune.files import ANSWERS_SUBDIR, EVALUATION_FILE, MEASURE_FILE, latest_checkpoint

__all__ = [
    "Rendezvous",
    "evaluate_command",
    "format_command",
    "measure_command",
    "override_flags",
    "restart_flags",
    "train_command",
]


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
    """The ``fishertune evaluate`` command of a run (one process; lm-eval and the exports): the
    run's model, output and seed, then the ``evaluation:`` block's flags."""
    spec = config.evaluation
    command = [
        sys.executable,
        "-m",
        "fishertune.cli",
        "evaluate",
        "--model",
        str(run.model_dir),
        "--output",
        str(run.run_dir / EVALUATION_FILE),
        "--seed",
        str(run.seed),
        *spec.argv,
    ]
    if spec.alpacaeval_questions or spec.mtbench_questions:
        command += ["--answers_dir", str(run.run_dir / ANSWERS_SUBDIR), "--model_id", run.name]
    return command


def measure_command(config: ExperimentConfig, run: RunSpec) -> list[str]:
    """The ``measure`` stage of a run: ``fishertune analyze --record`` on its model (and its
    checkpoints, with ``checkpoints: true``) into its ``curvature.json``, then the ``measure:``
    block's flags; without ``data`` there, the run's training data with its reader options, so
    the measure reads the same rows."""
    spec = config.measure
    if spec is None:
        raise FishertuneError(f"{config.path}: no measure: block")
    command = [
        sys.executable,
        "-m",
        "fishertune.cli",
        "analyze",
        "--model",
        str(run.model_dir),
        "--record",
        str(run.run_dir / MEASURE_FILE),
    ]
    if "data" not in spec.flags:  # other data: the reader detects its format
        command += ["--data", str(run.overrides.get("dataset_name", "builtin:tiny-tasks"))]
        for key in ("data_format", "data_columns", "data_roles", "on_bad_rows"):
            if run.overrides.get(key) is not None:
                command += [f"--{key}", str(run.overrides[key])]
    if run.overrides.get("keep_truncated_records") in (True, "true", "True"):
        command += ["--keep_truncated_records"]
    return [*command, *spec.argv]


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
