"""The blocks of an experiment file that configure a stage or a launcher: ``evaluation:``,
``slurm:``, ``launcher:`` (with ``accelerate_config``, ``num_processes``), ``env:`` and
``report:``, each checked into its spec (``measure:``: :mod:`fishertune.experiments.measure_block`;
a study's blocks: :mod:`fishertune.experiments.study`)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from fishertune.experiments.fields import (
    field_error,
    mapping,
    non_negative_int,
    resolve_path,
    str_list,
)

__all__ = [
    "EVALUATION_PATHS",
    "EVALUATION_SET_BY_GRID",
    "LAUNCHERS",
    "SLURM_KEYS",
    "SlurmSpec",
    "StageFlags",
    "env_block",
    "evaluation_block",
    "launcher_block",
    "report_block",
    "slurm_block",
    "stage_flags_block",
]

LAUNCHERS = ("local", "accelerate")
# fishertune's own keys of the slurm: block; every other key is a parameter of submitit's SLURM
# executor (partition, account, qos, mem, cpus_per_task, array_parallelism, setup, constraint,
# exclusive, additional_parameters, ...), handed to it as slurm_<key> and checked by it at load
SLURM_KEYS = (
    "nodes",
    "gpus_per_node",
    "time",
    "max_requeues",
    "signal_delay_s",
    "job_name",
    "folder",
    "main_process_port",
)
SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass(frozen=True)
class SlurmSpec:
    """Resources and behaviour of the SLURM job of each run (``--launcher slurm``).

    Attributes:
        nodes: nodes per run; above 1 the run needs ``launcher: accelerate`` (one
            ``accelerate launch`` per node).
        gpus_per_node: ``sbatch --gpus-per-node``; with ``launcher: accelerate`` the run starts
            ``nodes * gpus_per_node`` processes.
        time_min: time limit in minutes (``time:`` accepts SLURM's ``D-HH:MM:SS`` forms).
        max_requeues: how many times a run that reaches its time limit requeues itself
            (preemptions always requeue).
        signal_delay_s: seconds before the time limit at which the job is told to stop and requeue.
        job_name: the jobs' name (default: the experiment file's stem).
        folder: where submitit keeps the jobs' scripts, pickles and logs (default
            ``OUTPUT_DIR/slurm``; must be on a file system the nodes share).
        main_process_port: port of the multi-node rendezvous (default derived from the job id).
        submitit: every other key of the block, a parameter of submitit's SLURM executor by its
            name there without the ``slurm_`` prefix (``partition``, ``account``, ``qos``,
            ``mem``, ``cpus_per_task``, ``array_parallelism``, ``setup``, ``constraint``,
            ``exclusive``, ``additional_parameters``, ...); ``mem`` given as a number means GB
            and a ``setup`` string is one line.
    """

    nodes: int = 1
    gpus_per_node: int | None = None
    time_min: int = 60
    max_requeues: int = 3
    signal_delay_s: int = 120
    job_name: str | None = None
    folder: Path | None = None
    main_process_port: int | None = None
    submitit: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageFlags:
    """A stage block: options of the stage's command by flag name (``limit: 10`` is
    ``--limit 10``), checked by that command's own parser.

    Attributes:
        block: the block's name (``evaluation``).
        flags: the block as given (paths resolved, a mapping value as ``k=v,...``): what the
            run's settings record stores and :attr:`argv` turns into flags.
        argv: the flags on the command line.
        args: the command's parsed options, its own defaults for those not given; read them
            as attributes (``spec.max_new_tokens``).
    """

    block: str
    flags: dict[str, Any]
    argv: tuple[str, ...]
    args: argparse.Namespace

    def __getattr__(self, name: str) -> Any:
        # only reached for names that are not fields; the guard keeps copy/pickle (submitit
        # pickles the config) from recursing before the fields exist
        args = self.__dict__.get("args")
        if name.startswith("_") or args is None or not hasattr(args, name):
            raise AttributeError(name)
        return getattr(args, name)

    @property
    def stored(self) -> dict[str, Any]:
        """What the run's settings record stores of the block."""
        return dict(self.flags)

    @property
    def tasks(self) -> tuple[str, ...]:
        """``--tasks``' comma list as names."""
        return tuple(t.strip() for t in self.args.tasks.split(",") if t.strip())


class _ParserError(Exception):
    pass


def _raise(message: str) -> NoReturn:
    raise _ParserError(message)


def _flag_argv(path: Path, where: str, action: argparse.Action, value: Any) -> list[str]:
    """One option's flags: a switch given as true/false, a repeatable option's list as the flag
    repeated, another list as a comma list (``tasks: [mmlu, ifeval]``), a mapping as
    ``k=v,...`` (``model_args``)."""
    option = next(o for o in action.option_strings if o.startswith("--"))
    if action.nargs == 0:  # store_true / store_false / --x and --no-x
        if not isinstance(value, bool):
            raise field_error(path, where, f"expected true/false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [option if value else option.replace("--", "--no-", 1)]
        return [option] if value != action.default else []
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or any(isinstance(item, (list, tuple, dict)) for item in items):
        raise field_error(path, where, f"expected a value or a list of values, got {value!r}")
    if isinstance(action, argparse._AppendAction):
        return [text for item in items for text in (option, str(item))]
    if action.nargs in ("+", "*"):
        return [option, *map(str, items)]
    return [option, ",".join(map(str, items))]


def stage_flags_block(
    path: Path,
    block: str,
    value: Any,
    parser: argparse.ArgumentParser,
    *,
    set_by_grid: Sequence[str],
    paths: Sequence[str] = (),
    own: Sequence[str] = (),
) -> StageFlags:
    """A stage block checked by its command's ``parser``: only its options (and ``own``, the
    grid's keys, left to the caller), none of ``set_by_grid``, each value one the parser
    accepts (a one-line error naming the key); the options in ``paths`` are resolved like the
    file's other paths."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in set_by_grid}
    actions.pop("help", None)
    raw = mapping(path, block, value)
    grid = sorted(set(raw) & set(set_by_grid))
    if grid:
        raise field_error(path, f"{block}.{grid[0]}", "set by the grid for each run")
    raw = mapping(path, block, raw, sorted([*actions, *own]))
    flags: dict[str, Any] = {}
    for key, item in raw.items():
        if key in own:
            continue
        if key in paths and item is not None:
            many = isinstance(item, (list, tuple))
            resolved = [
                str(resolve_path(path, f"{block}.{key}", p)) for p in (item if many else [item])
            ]
            item = resolved if many else resolved[0]
        if isinstance(item, Mapping):
            item = ",".join(f"{k}={v}" for k, v in item.items())
        if item is not None:
            flags[key] = item
    # the options the grid sets, as placeholders: the parser requires some of them
    required = [
        text
        for a in parser._actions
        if a.required and a.option_strings
        for text in (a.option_strings[-1], "-")
    ]
    parser.error = _raise  # type: ignore[method-assign]
    argv: list[str] = []
    for key, item in flags.items():
        where = f"{block}.{key}"
        own = _flag_argv(path, where, actions[key], item)
        try:
            parser.parse_args([*required, *own])
        except _ParserError as err:
            # argparse's "argument --limit: " repeats what the key already names
            raise field_error(path, where, str(err).split(": ", 1)[-1]) from None
        argv += own
    try:
        args = parser.parse_args([*required, *argv])
    except _ParserError as err:
        raise field_error(path, block, str(err)) from None
    return StageFlags(block=block, flags=flags, argv=tuple(argv), args=args)


# `fishertune evaluate`'s options that the grid gives each run (evaluate_command)
EVALUATION_SET_BY_GRID = ("model", "output", "seed", "answers_dir", "model_id")
# its options that name files: resolved against the experiment file like its other paths
EVALUATION_PATHS = (
    "include_path",
    "alpacaeval_questions",
    "mtbench_questions",
    "validation_file",
    "test_file",
)


def evaluation_block(path: Path, value: Any) -> StageFlags:
    """The ``evaluation:`` block: options of ``fishertune evaluate`` (its ``build_parser``)."""
    from fishertune.evaluation.cli import build_parser

    return stage_flags_block(
        path,
        "evaluation",
        value,
        build_parser(),
        set_by_grid=EVALUATION_SET_BY_GRID,
        paths=EVALUATION_PATHS,
    )


def slurm_minutes(path: Path, value: Any) -> int:
    """Minutes from an integer or SLURM's ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = SLURM_TIME.match(value) if isinstance(value, str) else None
    if match is None:
        raise field_error(
            path,
            "slurm.time",
            f"expected minutes or SLURM's D-HH:MM:SS (quoted in YAML), got {value!r}",
        )
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = first * 3600 + second * 60 + third
    elif second is not None:  # MM:SS
        seconds = first * 60 + second
    else:  # MM
        seconds = first * 60
    if seconds <= 0:
        raise field_error(path, "slurm.time", f"must be positive, got {value!r}")
    return max(1, -(-seconds // 60))


def submitit_parameters(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The block's keys that are submitit's, checked by submitit's own executor (an unknown
    name is a one-line error naming the field); ``mem`` as a number is GB, ``setup`` a line."""
    params = {key: value for key, value in raw.items() if key not in SLURM_KEYS}
    mem = params.get("mem")
    if isinstance(mem, (int, float)) and not isinstance(mem, bool) and mem > 0:
        params["mem"] = f"{int(mem)}G"
    if isinstance(params.get("setup"), str):
        params["setup"] = [params["setup"]]
    if not params:
        return params
    try:
        import submitit
    except ImportError:  # the launcher refuses in one line when it is asked for
        return params
    # submitit checks its parameters' names when they are set; the debug executor writes nothing
    executor = submitit.AutoExecutor(folder=Path(path).parent / ".submitit-check", cluster="debug")
    for key, value in params.items():
        try:
            executor.update_parameters(**{f"slurm_{key}": value})
        except (NameError, ValueError, TypeError) as err:
            message = str(err).splitlines()[0].split(". Valid arguments")[0]
            raise field_error(
                path, f"slurm.{key}", f"not a submitit SLURM parameter ({message})"
            ) from None
    return params


def slurm_block(path: Path, value: Any, *, launcher: str, num_processes: int | None) -> SlurmSpec:
    raw = mapping(path, "slurm", value)
    if "sbatch" in raw:
        raise field_error(
            path,
            "slurm.sbatch",
            "give #SBATCH options as submitit's parameters in the slurm: block itself "
            "(e.g. exclusive: true, constraint: h100) or under additional_parameters:",
        )
    job_name = raw.get("job_name")
    if job_name is not None and not isinstance(job_name, str):
        raise field_error(path, "slurm.job_name", f"expected a string, got {job_name!r}")
    counts = {}
    for key in ("nodes", "gpus_per_node", "max_requeues"):
        counts[key] = non_negative_int(path, f"slurm.{key}", raw.get(key))
        if key != "max_requeues" and counts[key] == 0:
            raise field_error(path, f"slurm.{key}", "must be at least 1")
    nodes = counts["nodes"] or 1
    if nodes > 1 and launcher != "accelerate":
        raise field_error(
            path,
            "slurm.nodes",
            "more than one node needs launcher: accelerate (one accelerate launch per node)",
        )
    gpus = counts["gpus_per_node"]
    if num_processes and gpus and nodes * gpus != num_processes:
        raise field_error(
            path,
            "slurm",
            f"num_processes {num_processes} differs from nodes x gpus_per_node = {nodes} x {gpus}",
        )
    if num_processes and gpus is None and num_processes % nodes == 0 and num_processes >= nodes:
        gpus = num_processes // nodes  # ask SLURM for the GPUs that accelerate will use
    port = non_negative_int(path, "slurm.main_process_port", raw.get("main_process_port"))
    signal_delay = non_negative_int(path, "slurm.signal_delay_s", raw.get("signal_delay_s"))
    return SlurmSpec(
        nodes=nodes,
        gpus_per_node=gpus,
        time_min=slurm_minutes(path, raw["time"]) if raw.get("time") is not None else 60,
        max_requeues=3 if counts["max_requeues"] is None else counts["max_requeues"],
        signal_delay_s=120 if signal_delay is None else signal_delay,
        job_name=job_name,
        folder=resolve_path(path, "slurm.folder", raw["folder"], must_exist=False)
        if raw.get("folder")
        else None,
        main_process_port=port,
        submitit=submitit_parameters(path, raw),
    )


def launcher_block(path: Path, raw: Mapping[str, Any]) -> tuple[str, Path | None, int | None]:
    """``launcher``, ``accelerate_config`` and ``num_processes`` (the last two need
    ``launcher: accelerate``)."""
    launcher = raw.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise field_error(path, "launcher", f"{launcher!r} is not one of {', '.join(LAUNCHERS)}")
    accelerate_config = None
    if raw.get("accelerate_config") is not None:
        accelerate_config = resolve_path(
            path, "accelerate_config", raw["accelerate_config"], preset="accelerate"
        )
    num_processes = non_negative_int(path, "num_processes", raw.get("num_processes"))
    if launcher == "local" and (accelerate_config or num_processes):
        raise field_error(
            path, "launcher", "accelerate_config / num_processes need launcher: accelerate"
        )
    return launcher, accelerate_config, num_processes


def env_block(path: Path, value: Any) -> dict[str, str]:
    """The ``env:`` block, values as the strings a process environment holds."""
    env = mapping(path, "env", value)
    for key, item in env.items():
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise field_error(path, f"env.{key}", f"expected a string or a number, got {item!r}")
        env[key] = str(item)
    return env


def report_block(path: Path, value: Any) -> tuple[str, ...] | None:
    """The ``report:`` block's table metrics (``None``: every metric); its other keys belong to
    the study it names (:mod:`fishertune.experiments.study`)."""
    report = mapping(path, "report", value)
    return str_list(path, "report.metrics", report["metrics"]) if "metrics" in report else None
