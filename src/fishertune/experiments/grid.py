"""Experiment files: validation and expansion of a methods x ablations x seeds grid into runs.

An experiment YAML names a training preset and the variations to run on it::

    base_config: tiny                       # training YAML or preset: `fishertune train --config`
    output_dir: runs/tiny                   # one folder per run under OUTPUT_DIR/runs/
    overrides: {max_steps: 40}              # optional, every run
    methods:                                # name -> training overrides
      baseline: {method: baseline}
      neftune: {method: neftune, neftune_alpha: 5}
      token-f: {method: token-f, base_config: paper/token-f}  # own preset (or a file)
    seeds: [0, 1, 2]
    ablations:                              # optional: name -> overrides
      no-warmup: {penalty_warmup_steps: 0}
    ablation_methods: [token-f]             # or {no-warmup: [token-f], ...}; default all
    ablation_seeds: [0, 1, 2]               # optional; default seeds
    evaluation: {tasks: [offline]}
    launcher: local                         # or accelerate (+ accelerate_config, num_processes)
    env: {OMP_NUM_THREADS: "1"}             # optional: environment of every launched command
    report: {metrics: [offline/val_loss]}   # optional: table columns; default every metric
    base:                                   # optional: a model trained once, which every
      max_steps: 500                        #   run fine-tunes (training overrides)
    measure: {batches: 2, probes: 4}        # optional: Tr(F_X), Tr(H_X) of every run
    slurm:                                  # optional: resources of `--launcher slurm` jobs
      partition: gpu
      nodes: 1
      gpus_per_node: 8
      time: "48:00:00"                      # quoted: YAML reads 48:00:00 as a number

Runs are named ``{method}[-{ablation}]-seed{seed}``; each gets ``OUTPUT_DIR/runs/NAME/`` with the
trained model (``fishertune train --output_dir``) in its ``model/`` sub-folder. Training options
are merged with the precedence base YAML < ``overrides`` < method < ablation < seed (the grid's
seed always wins).

A ``base:`` block adds a first run named ``base`` (folder ``OUTPUT_DIR/runs/base``), trained with
base YAML < ``overrides`` < the block (its own ``base_config`` and ``seed``, default 0, allowed),
evaluated and measured like any run; every other run then starts from its saved model
(``model_name_or_path`` = ``OUTPUT_DIR/runs/base/model``, set by the grid, so no method may set it).
A ``measure:`` block adds a third stage to every run (:mod:`fishertune.experiments.curvature`):
the estimators of ``fishertune analyze`` (CE, ``Tr(F_X)``, ``Tr(H_X)``) on validation data, for
the final model and each saved checkpoint, into the run's ``curvature.json``.

Relative input paths are resolved against the current directory, then against the experiment
file's directory, then (``base_config``, ``accelerate_config``) as the name of a shipped preset
(``fishertune presets``), then against the experiment file's parent directories; a file always
wins over a preset of the same name. ``output_dir`` is relative to the current directory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError

__all__ = [
    "BASE_RUN",
    "EVALUATION_KEYS",
    "LAUNCHERS",
    "MEASURE_KEYS",
    "MODEL_SUBDIR",
    "SLURM_KEYS",
    "EvaluationSpec",
    "ExperimentConfig",
    "MeasureSpec",
    "RunSpec",
    "SlurmSpec",
    "expand_grid",
    "load_experiment",
    "parse_experiment",
]

LAUNCHERS = ("local", "accelerate")
TOP_LEVEL_KEYS = (
    "base_config",
    "output_dir",
    "overrides",
    "methods",
    "seeds",
    "ablations",
    "ablation_methods",
    "ablation_seeds",
    "evaluation",
    "launcher",
    "accelerate_config",
    "num_processes",
    "env",
    "report",
    "slurm",
    "base",
    "measure",
)
EVALUATION_KEYS = (
    "tasks",
    "limit",
    "batch_size",
    "max_new_tokens",
    "max_length",
    "dataset",
    "include_path",
    "num_fewshot",
    "model_args",
    "device",
    "alpacaeval_questions",
    "mtbench_questions",
    "answer_max_new_tokens",
    "extra_args",
)
REPORT_KEYS = ("metrics", "study")
STUDIES = ("equivalence",)
MEASURE_KEYS = (
    "batches",
    "batch_size",
    "probes",
    "fisher_draws",
    "max_length",
    "split",
    "checkpoints",
    "seed",
)
BASE_RUN = "base"
SLURM_KEYS = (
    "partition",
    "account",
    "qos",
    "nodes",
    "gpus_per_node",
    "cpus_per_task",
    "mem",
    "time",
    "array_parallelism",
    "sbatch",
    "setup",
    "max_requeues",
    "signal_delay_s",
    "job_name",
    "folder",
    "main_process_port",
)
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
# Keys the grid sets itself; a method or ablation giving them would be silently overridden.
RESERVED_OVERRIDES = ("output_dir", "seed", "config")
MODEL_SUBDIR = "model"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class EvaluationSpec:
    """What ``fishertune evaluate`` runs on every finished run (see ``fishertune evaluate -h``)."""

    tasks: tuple[str, ...] = ("offline",)
    limit: int | float | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    dataset: str | None = None
    include_path: tuple[str, ...] = ()
    num_fewshot: int | None = None
    model_args: str | None = None
    device: str | None = None
    alpacaeval_questions: str | None = None
    mtbench_questions: str | None = None
    answer_max_new_tokens: int | None = None
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class MeasureSpec:
    """What the ``measure`` stage computes on every run (:mod:`fishertune.experiments.curvature`).

    Attributes:
        batches, batch_size: validation batches measured (the same ones for every run and
            checkpoint: they are drawn with ``seed``).
        probes: Rademacher probes per batch for ``Tr(H_X)`` (Hutchinson).
        fisher_draws: token-F draws ``y' ~ p`` per batch for ``Tr(F_X)`` (default ``probes``).
        max_length: truncation of the conversations.
        split: the data split measured (the training data set's).
        checkpoints: also measure every saved ``checkpoint-N`` (the curvature trajectory).
        seed: seeds the batches, probes and draws.
    """

    batches: int = 2
    batch_size: int = 8
    probes: int = 4
    fisher_draws: int | None = None
    max_length: int = 128
    split: str = "validation"
    checkpoints: bool = True
    seed: int = 0


@dataclass(frozen=True)
class SlurmSpec:
    """Resources and behaviour of the SLURM job of each run (``--launcher slurm``).

    Attributes:
        partition, account, qos: ``sbatch --partition/--account/--qos``.
        nodes: nodes per run; above 1 the run needs ``launcher: accelerate`` (one
            ``accelerate launch`` per node).
        gpus_per_node: ``sbatch --gpus-per-node``; with ``launcher: accelerate`` the run starts
            ``nodes * gpus_per_node`` processes.
        cpus_per_task: ``sbatch --cpus-per-task`` (one task per node).
        mem: ``sbatch --mem`` (e.g. ``"480G"``; a number means GB).
        time_min: time limit in minutes (``time:`` accepts SLURM's ``D-HH:MM:SS`` forms).
        array_parallelism: at most this many runs of the grid at once (the array's ``%N``).
        sbatch: further ``#SBATCH`` options, e.g. ``{constraint: h100, exclusive: true}``.
        setup: shell lines run before the job's command (``module load ...``, ``source venv``).
        max_requeues: how many times a run that reaches its time limit requeues itself
            (preemptions always requeue).
        signal_delay_s: seconds before the time limit at which the job is told to stop and requeue.
        job_name: the jobs' name (default: the experiment file's stem).
        folder: where submitit keeps the jobs' scripts, pickles and logs (default
            ``OUTPUT_DIR/slurm``; must be on a file system the nodes share).
        main_process_port: port of the multi-node rendezvous (default derived from the job id).
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time_min: int = 60
    array_parallelism: int | None = None
    sbatch: dict[str, Any] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    max_requeues: int = 3
    signal_delay_s: int = 120
    job_name: str | None = None
    folder: Path | None = None
    main_process_port: int | None = None


@dataclass(frozen=True)
class RunSpec:
    """One training + evaluation run of the grid.

    Attributes:
        name: ``{method}[-{ablation}]-seed{seed}``.
        method: the method's name in the experiment file (a key of ``methods``).
        ablation: the ablation's name, or ``None`` for a main run.
        seed: the training seed.
        base_config: training YAML given to ``--config``.
        overrides: merged training overrides, in precedence order, seed last.
        run_dir: the run's folder (settings, logs, ``evaluation.json``; the model in ``model/``).
    """

    name: str
    method: str
    ablation: str | None
    seed: int
    base_config: Path
    overrides: dict[str, Any]
    run_dir: Path

    @property
    def group(self) -> str:
        """Row label in reports: the method, with its ablation if any."""
        return self.method if self.ablation is None else f"{self.method}-{self.ablation}"

    @property
    def model_dir(self) -> Path:
        """``fishertune train --output_dir``: a sub-folder, because ``fishertune train`` refuses a
        non-empty output folder and the run folder already holds the settings and logs."""
        return self.run_dir / MODEL_SUBDIR

    def to_json(self) -> dict[str, Any]:
        """JSON-serializable description, stored in the run folder to detect changed settings."""
        return {
            "name": self.name,
            "method": self.method,
            "ablation": self.ablation,
            "seed": self.seed,
            "base_config": str(self.base_config),
            # the preset's content, not its path: an installed preset moves with the environment
            "base_config_sha256": hashlib.sha256(Path(self.base_config).read_bytes()).hexdigest(),
            "overrides": self.overrides,
        }


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment file (see the module docstring for its fields)."""

    path: Path
    base_config: Path | None
    output_dir: Path
    methods: dict[str, dict[str, Any]]
    method_configs: dict[str, Path]
    seeds: tuple[int, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)
    ablation_methods: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ablation_seeds: tuple[int, ...] = ()
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    launcher: str = "local"
    accelerate_config: Path | None = None
    num_processes: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    report_metrics: tuple[str, ...] | None = None
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    base_run: RunSpec | None = None
    measure: MeasureSpec | None = None
    study: str | None = None

    @property
    def slurm_dir(self) -> Path:
        """submitit's folder for the grid's SLURM jobs (scripts, pickles, logs)."""
        return self.slurm.folder or self.output_dir / "slurm"

    @property
    def runs_dir(self) -> Path:
        """Folder holding one sub-folder per run."""
        return self.output_dir / "runs"

    @property
    def report_dir(self) -> Path:
        """Folder receiving the tables and plots."""
        return self.output_dir / "report"


def _err(path: Path, where: str, message: str) -> FishertuneError:
    return FishertuneError(f"{path}: {where}: {message}")


def _resolve(
    path: Path, where: str, value: Any, *, must_exist: bool = True, preset: str | None = None
) -> Path:
    """A path named in the experiment file; ``preset`` (a kind of :mod:`fishertune.presets`)
    lets the value also be a shipped preset's name (``tiny``, ``paper/token-f``,
    ``accelerate/deepspeed_zero3``), so the shipped grids work from an installed package."""
    if not isinstance(value, str) or not value:
        raise _err(path, where, f"expected a path string, got {value!r}")
    candidate = Path(value).expanduser()
    exists = Path.is_file if preset else Path.exists
    if candidate.is_absolute():
        if must_exist and not exists(candidate):
            raise _err(path, where, f"{candidate} does not exist")
        return candidate
    if not must_exist:
        return Path.cwd() / candidate
    here = path.resolve().parent
    for root in (Path.cwd(), here):
        if exists(root / candidate):
            return (root / candidate).resolve()
    if preset is not None:
        from fishertune.presets import preset_path

        found = preset_path(value, preset)
        if found is not None:
            return found.resolve()
    # Grids kept inside a checkout may name files relative to the repository root: try the
    # experiment file's parent folders too.
    for root in here.parents:
        if exists(root / candidate):
            return (root / candidate).resolve()
    known = ""
    if preset is not None:
        from fishertune.presets import preset_names

        known = f"; {preset} presets: {', '.join(preset_names(preset))}"
    raise _err(
        path,
        where,
        f"{value} not found (looked in the current directory and above {path.parent}){known}",
    )


def _mapping(
    path: Path, where: str, value: Any, allowed: Sequence[str] | None = None
) -> dict[str, Any]:
    """``value`` as a mapping with string keys (``None``: empty), only ``allowed`` ones if given."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _err(path, where, f"expected a mapping, got {type(value).__name__} {value!r}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise _err(path, where, f"keys must be strings, got {bad!r}")
    unknown = sorted(set(value) - set(allowed)) if allowed is not None else []
    if unknown:
        raise _err(
            path, where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    return dict(value)


def _name(path: Path, where: str, name: str) -> str:
    if not _NAME.match(name):
        raise _err(
            path,
            where,
            f"name {name!r} must start with a letter or digit and use only "
            "letters, digits and _ . + - (it becomes a folder name)",
        )
    return name


def _overrides(path: Path, where: str, value: Any) -> dict[str, Any]:
    overrides = _mapping(path, where, value)
    for key, item in overrides.items():
        if key in RESERVED_OVERRIDES:
            raise _err(path, f"{where}.{key}", "set by the grid for every run; remove it")
        if item is None:
            raise _err(
                path,
                f"{where}.{key}",
                "null cannot be passed on a command line; remove the key "
                "to keep the preset's value",
            )
        if isinstance(item, Mapping) and not item:
            raise _err(path, f"{where}.{key}", "empty mapping")
    return overrides


def _seeds(path: Path, where: str, value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        raise _err(path, where, f"expected a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise _err(path, where, f"seeds repeat: {value!r}")
    return tuple(value)


def _positive_int(path: Path, where: str, value: Any, *, allow_fraction: bool = False) -> Any:
    if value is None:
        return None
    if allow_fraction and isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _err(path, where, f"expected a non-negative integer, got {value!r}")
    return value


def _str_list(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _err(path, where, f"expected a list of strings, got {value!r}")
    return tuple(value)


def _evaluation(path: Path, value: Any) -> EvaluationSpec:
    raw = _mapping(path, "evaluation", value, EVALUATION_KEYS)
    tasks = _str_list(path, "evaluation.tasks", raw.get("tasks", ["offline"]))
    if not tasks:
        raise _err(path, "evaluation.tasks", "empty task list")
    include = tuple(
        str(_resolve(path, "evaluation.include_path", p))
        for p in _str_list(path, "evaluation.include_path", raw.get("include_path", []))
    )
    questions = {
        key: str(_resolve(path, f"evaluation.{key}", raw[key])) if raw.get(key) else None
        for key in ("alpacaeval_questions", "mtbench_questions")
    }
    model_args = raw.get("model_args")
    if isinstance(model_args, Mapping):
        model_args = ",".join(f"{k}={v}" for k, v in model_args.items())
    if model_args is not None and not isinstance(model_args, str):
        raise _err(
            path, "evaluation.model_args", f"expected k=v,... or a mapping, got {model_args!r}"
        )
    for key in ("dataset", "device"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise _err(path, f"evaluation.{key}", f"expected a string, got {raw[key]!r}")
    return EvaluationSpec(
        tasks=tasks,
        limit=_positive_int(path, "evaluation.limit", raw.get("limit"), allow_fraction=True),
        batch_size=_positive_int(path, "evaluation.batch_size", raw.get("batch_size")),
        max_new_tokens=_positive_int(path, "evaluation.max_new_tokens", raw.get("max_new_tokens")),
        max_length=_positive_int(path, "evaluation.max_length", raw.get("max_length")),
        dataset=raw.get("dataset"),
        include_path=include,
        num_fewshot=_positive_int(path, "evaluation.num_fewshot", raw.get("num_fewshot")),
        model_args=model_args,
        device=raw.get("device"),
        answer_max_new_tokens=_positive_int(
            path, "evaluation.answer_max_new_tokens", raw.get("answer_max_new_tokens")
        ),
        extra_args=_str_list(path, "evaluation.extra_args", raw.get("extra_args", [])),
        **questions,
    )


def _slurm_time(path: Path, value: Any) -> int:
    """Minutes from an integer or SLURM's ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SLURM_TIME.match(value) if isinstance(value, str) else None
    if match is None:
        raise _err(
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
        raise _err(path, "slurm.time", f"must be positive, got {value!r}")
    return max(1, -(-seconds // 60))


def _slurm(path: Path, value: Any, *, launcher: str, num_processes: int | None) -> SlurmSpec:
    raw = _mapping(path, "slurm", value, SLURM_KEYS)
    strings = {}
    for key in ("partition", "account", "qos", "job_name"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise _err(path, f"slurm.{key}", f"expected a string, got {raw[key]!r}")
        strings[key] = raw.get(key)
    counts = {}
    for key in ("nodes", "gpus_per_node", "cpus_per_task", "array_parallelism", "max_requeues"):
        counts[key] = _positive_int(path, f"slurm.{key}", raw.get(key))
        if key != "max_requeues" and counts[key] == 0:
            raise _err(path, f"slurm.{key}", "must be at least 1")
    mem = raw.get("mem")
    if isinstance(mem, (int, float)) and not isinstance(mem, bool) and mem > 0:
        mem = f"{int(mem)}G"
    if mem is not None and not isinstance(mem, str):
        raise _err(path, "slurm.mem", f"expected e.g. '64G' or a number of GB, got {mem!r}")
    sbatch = _mapping(path, "slurm.sbatch", raw.get("sbatch"))
    for key, item in sbatch.items():
        if not isinstance(item, (str, int, float, bool)):
            raise _err(path, f"slurm.sbatch.{key}", f"expected a scalar, got {item!r}")
    setup = raw.get("setup", [])
    if isinstance(setup, str):
        setup = [setup]
    setup = _str_list(path, "slurm.setup", setup) if setup else ()
    nodes = counts["nodes"] or 1
    if nodes > 1 and launcher != "accelerate":
        raise _err(
            path,
            "slurm.nodes",
            "more than one node needs launcher: accelerate (one accelerate launch per node)",
        )
    gpus = counts["gpus_per_node"]
    if num_processes and gpus and nodes * gpus != num_processes:
        raise _err(
            path,
            "slurm",
            f"num_processes {num_processes} differs from nodes x gpus_per_node = {nodes} x {gpus}",
        )
    if num_processes and gpus is None and num_processes % nodes == 0 and num_processes >= nodes:
        gpus = num_processes // nodes  # ask SLURM for the GPUs that accelerate will use
    port = _positive_int(path, "slurm.main_process_port", raw.get("main_process_port"))
    signal_delay = _positive_int(path, "slurm.signal_delay_s", raw.get("signal_delay_s"))
    return SlurmSpec(
        **strings,
        nodes=nodes,
        gpus_per_node=gpus,
        cpus_per_task=counts["cpus_per_task"],
        mem=mem,
        time_min=_slurm_time(path, raw["time"]) if raw.get("time") is not None else 60,
        array_parallelism=counts["array_parallelism"],
        sbatch=sbatch,
        setup=tuple(setup),
        max_requeues=3 if counts["max_requeues"] is None else counts["max_requeues"],
        signal_delay_s=120 if signal_delay is None else signal_delay,
        folder=_resolve(path, "slurm.folder", raw["folder"], must_exist=False)
        if raw.get("folder")
        else None,
        main_process_port=port,
    )


def _measure(path: Path, value: Any) -> MeasureSpec | None:
    if value is None:
        return None
    raw = _mapping(path, "measure", value, MEASURE_KEYS)
    values: dict[str, Any] = {}
    for key, low in (("batches", 1), ("batch_size", 1), ("probes", 2), ("fisher_draws", 2),
                     ("max_length", 2), ("seed", 0)):  # fmt: skip
        if key in raw:
            item = raw[key]
            if not isinstance(item, int) or isinstance(item, bool) or item < low:
                raise _err(path, f"measure.{key}", f"expected an integer >= {low}, got {item!r}")
            values[key] = item
    if "split" in raw:
        if not isinstance(raw["split"], str) or not raw["split"]:
            raise _err(path, "measure.split", f"expected a split name, got {raw['split']!r}")
        values["split"] = raw["split"]
    if "checkpoints" in raw:
        if not isinstance(raw["checkpoints"], bool):
            raise _err(
                path, "measure.checkpoints", f"expected true/false, got {raw['checkpoints']!r}"
            )
        values["checkpoints"] = raw["checkpoints"]
    return MeasureSpec(**values)


def _base_run(
    path: Path, value: Any, base: Path | None, overrides: dict[str, Any], runs_dir: Path
) -> RunSpec | None:
    """The ``base:`` block as the grid's first run (see the module docstring)."""
    if value is None:
        return None
    body = _mapping(path, "base", value)
    own = body.pop("base_config", None)
    seed = body.pop("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _err(path, "base.seed", f"expected an integer, got {seed!r}")
    if own is not None:
        config = _resolve(path, "base.base_config", own, preset="train")
    elif base is not None:
        config = base
    else:
        raise _err(path, "base", "no base_config: give one at the top level or in the block")
    merged = {**overrides, **_overrides(path, "base", body), "seed": seed}
    return RunSpec(
        name=BASE_RUN,
        method=BASE_RUN,
        ablation=None,
        seed=seed,
        base_config=config,
        overrides=merged,
        run_dir=runs_dir / BASE_RUN,
    )


def _top_level(path: Path, value: Any) -> dict[str, Any]:
    """The document as a mapping of known keys, with the required ones present."""
    raw = _mapping(path, "top level", value, TOP_LEVEL_KEYS)
    for key in ("output_dir", "methods", "seeds"):
        if key not in raw:
            raise _err(path, key, "missing (required)")
    return raw


def _methods(
    path: Path, value: Any, base: Path | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """The ``methods:`` block: each method's training overrides and its training YAML (its own
    ``base_config``, else the top-level one)."""
    methods_raw = _mapping(path, "methods", value)
    if not methods_raw:
        raise _err(path, "methods", "no methods given")
    methods: dict[str, dict[str, Any]] = {}
    method_configs: dict[str, Path] = {}
    for name, body in methods_raw.items():
        where = f"methods.{_name(path, 'methods', name)}"
        body = _mapping(path, where, body)
        own = body.pop("base_config", None)
        if own is not None:
            method_configs[name] = _resolve(path, f"{where}.base_config", own, preset="train")
        elif base is not None:
            method_configs[name] = base
        else:
            raise _err(path, where, "no base_config: give one at the top level or in the method")
        methods[name] = _overrides(path, where, body)
    return methods, method_configs


def _ablation_methods(
    path: Path, chosen: Any, ablations: Mapping[str, Any], methods: Mapping[str, Any]
) -> dict[str, tuple[str, ...]]:
    """The ``ablation_methods:`` block: for each ablation, the methods it applies to (a list for
    all ablations, a mapping per ablation, or by default every method)."""
    ablation_methods: dict[str, tuple[str, ...]] = {}
    for ablation in ablations:
        if chosen is None:
            names: Any = list(methods)
            where = "ablation_methods"
        elif isinstance(chosen, Mapping):
            names = chosen.get(ablation, list(methods))
            where = f"ablation_methods.{ablation}"
        else:
            names = chosen
            where = "ablation_methods"
        names = _str_list(path, where, names)
        missing = [n for n in names if n not in methods]
        if missing:
            raise _err(path, where, f"unknown method(s) {missing}; methods: {list(methods)}")
        ablation_methods[ablation] = names
    if isinstance(chosen, Mapping):
        stray = sorted(set(chosen) - set(ablations))
        if stray:
            raise _err(path, "ablation_methods", f"unknown ablation(s) {stray}")
    return ablation_methods


def _launcher(path: Path, raw: Mapping[str, Any]) -> tuple[str, Path | None, int | None]:
    """``launcher``, ``accelerate_config`` and ``num_processes`` (the last two need
    ``launcher: accelerate``)."""
    launcher = raw.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise _err(path, "launcher", f"{launcher!r} is not one of {', '.join(LAUNCHERS)}")
    accelerate_config = None
    if raw.get("accelerate_config") is not None:
        accelerate_config = _resolve(
            path, "accelerate_config", raw["accelerate_config"], preset="accelerate"
        )
    num_processes = _positive_int(path, "num_processes", raw.get("num_processes"))
    if launcher == "local" and (accelerate_config or num_processes):
        raise _err(path, "launcher", "accelerate_config / num_processes need launcher: accelerate")
    return launcher, accelerate_config, num_processes


def _env(path: Path, value: Any) -> dict[str, str]:
    """The ``env:`` block, values as the strings a process environment holds."""
    env = _mapping(path, "env", value)
    for key, item in env.items():
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise _err(path, f"env.{key}", f"expected a string or a number, got {item!r}")
        env[key] = str(item)
    return env


def _report(path: Path, value: Any) -> tuple[tuple[str, ...] | None, str | None]:
    """The ``report:`` block: the table's metrics (``None``: every metric) and the study."""
    report = _mapping(path, "report", value)
    unknown = sorted(set(report) - set(REPORT_KEYS))
    if unknown:
        raise _err(path, "report", f"unknown key(s) {unknown}; allowed: {list(REPORT_KEYS)}")
    report_metrics = (
        _str_list(path, "report.metrics", report["metrics"]) if "metrics" in report else None
    )
    study = report.get("study")
    if study is not None and study not in STUDIES:
        raise _err(path, "report.study", f"{study!r} is not one of {', '.join(STUDIES)}")
    return report_metrics, study


def _refuse_model_path_with_base(
    path: Path,
    overrides: Mapping[str, Any],
    methods: Mapping[str, Mapping[str, Any]],
    ablations: Mapping[str, Mapping[str, Any]],
) -> None:
    """With a ``base:`` stage the grid sets every run's ``model_name_or_path``: refuse the
    name ``base`` for a method and ``model_name_or_path`` in any override block."""
    if BASE_RUN in methods:
        raise _err(path, f"methods.{BASE_RUN}", "the name is taken by the base: stage")
    for where, body in (
        [("overrides", overrides)]
        + [(f"methods.{name}", body) for name, body in methods.items()]
        + [(f"ablations.{name}", body) for name, body in ablations.items()]
    ):
        if "model_name_or_path" in body:
            raise _err(
                path,
                f"{where}.model_name_or_path",
                "set by the grid to the base: stage's model; remove it",
            )


def parse_experiment(raw: Any, path: str | Path) -> ExperimentConfig:
    """Validate a loaded experiment mapping.

    The blocks are checked in a fixed order (so the first fault reported does not depend on the
    file's key order), each by its own helper.

    Args:
        raw: the YAML document.
        path: the file it came from (named in every error message; anchors relative paths).

    Raises:
        FishertuneError: naming the file and the field at fault.
    """
    path = Path(path)
    raw = _top_level(path, raw)
    base = (
        _resolve(path, "base_config", raw["base_config"], preset="train")
        if raw.get("base_config")
        else None
    )
    output_dir = _resolve(path, "output_dir", raw["output_dir"], must_exist=False)
    methods, method_configs = _methods(path, raw["methods"], base)
    seeds = _seeds(path, "seeds", raw["seeds"])
    ablations = {
        _name(path, "ablations", name): _overrides(path, f"ablations.{name}", body)
        for name, body in _mapping(path, "ablations", raw.get("ablations")).items()
    }
    ablation_methods = _ablation_methods(path, raw.get("ablation_methods"), ablations, methods)
    ablation_seeds = (
        _seeds(path, "ablation_seeds", raw["ablation_seeds"]) if "ablation_seeds" in raw else seeds
    )
    launcher, accelerate_config, num_processes = _launcher(path, raw)
    env = _env(path, raw.get("env"))
    report_metrics, study = _report(path, raw.get("report"))
    overrides = _overrides(path, "overrides", raw.get("overrides"))
    base_run = _base_run(path, raw.get("base"), base, overrides, output_dir / "runs")
    if base_run is not None:
        _refuse_model_path_with_base(path, overrides, methods, ablations)
    config = ExperimentConfig(
        path=path,
        base_config=base,
        output_dir=output_dir,
        methods=methods,
        method_configs=method_configs,
        seeds=seeds,
        overrides=overrides,
        ablations=ablations,
        ablation_methods=ablation_methods,
        ablation_seeds=ablation_seeds,
        evaluation=_evaluation(path, raw.get("evaluation")),
        launcher=launcher,
        accelerate_config=accelerate_config,
        num_processes=num_processes,
        env=env,
        report_metrics=report_metrics,
        slurm=_slurm(path, raw.get("slurm"), launcher=launcher, num_processes=num_processes),
        base_run=base_run,
        measure=_measure(path, raw.get("measure")),
        study=study,
    )
    if study == "equivalence" and (base_run is None or config.measure is None):
        raise _err(path, "report.study", "the equivalence study needs a base: and a measure: block")
    expand_grid(config)  # name collisions are a configuration error: find them now
    return config


def load_experiment(
    path: str | Path,
    *,
    output_dir: str | Path | None = None,
    seeds: Sequence[int] | None = None,
    overrides: Mapping[str, Any] | None = None,
    slurm: Mapping[str, Any] | None = None,
) -> ExperimentConfig:
    """Read and validate an experiment YAML file.

    Args:
        path: the YAML file, or a shipped grid's name (``tiny``, ``tiny-ablations``,
            ``equivalence``, ``paper``).
        output_dir: replaces the file's ``output_dir``.
        seeds: replace the file's ``seeds`` and ``ablation_seeds``.
        overrides: merged over the file's ``overrides`` (below methods and ablations), e.g.
            ``{"max_steps": 20}`` for a quick pass over the grid.
        slurm: merged over the file's ``slurm`` block (e.g. ``{"partition": "debug"}``).
    """
    import yaml

    from fishertune.presets import preset_names, preset_path

    path = Path(path)
    if not path.is_file():
        found = preset_path(str(path), "experiment")  # `--config tiny`: a file of that name wins
        if found is None:
            raise FishertuneError(
                f"{path}: experiment file not found, and no experiment preset of that name; "
                f"experiment presets: {', '.join(preset_names('experiment'))}"
            )
        path = found
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise FishertuneError(f"{path}: invalid YAML: {err}") from err
    if isinstance(raw, dict):
        if output_dir is not None:
            # Absolute, so that it is not looked up next to the experiment file.
            raw["output_dir"] = str(Path(output_dir).expanduser().absolute())
        if seeds is not None:
            raw["seeds"] = list(seeds)
            if "ablation_seeds" in raw:
                raw["ablation_seeds"] = list(seeds)
        if overrides and isinstance(raw.get("overrides") or {}, Mapping):
            raw["overrides"] = {**(raw.get("overrides") or {}), **overrides}
        if slurm and isinstance(raw.get("slurm") or {}, Mapping):
            raw["slurm"] = {**(raw.get("slurm") or {}), **slurm}
    return parse_experiment(raw, path)


def expand_grid(config: ExperimentConfig) -> list[RunSpec]:
    """All runs of an experiment: the ``base`` run if any, main runs (methods x seeds), then
    ablation runs.

    Overrides are merged base < ``overrides`` < method < ablation < seed; with a ``base:``
    stage every run but the base gets ``model_name_or_path`` = the base's saved model.

    Raises:
        FishertuneError: when two runs would share a name (e.g. method ``a-b`` and method ``a``
            with ablation ``b``).
    """
    runs: list[RunSpec] = [] if config.base_run is None else [config.base_run]
    variants: list[tuple[str, str | None, tuple[int, ...]]] = [
        (method, None, config.seeds) for method in config.methods
    ]
    for ablation, methods in config.ablation_methods.items():
        variants += [(method, ablation, config.ablation_seeds) for method in methods]
    for method, ablation, seeds in variants:
        for seed in seeds:
            overrides = {**config.overrides, **config.methods[method]}
            if ablation is not None:
                overrides.update(config.ablations[ablation])
            overrides["seed"] = seed
            if config.base_run is not None:
                overrides["model_name_or_path"] = str(config.base_run.model_dir)
            stem = method if ablation is None else f"{method}-{ablation}"
            name = f"{stem}-seed{seed}"
            runs.append(
                RunSpec(
                    name=name,
                    method=method,
                    ablation=ablation,
                    seed=seed,
                    base_config=config.method_configs[method],
                    overrides=overrides,
                    run_dir=config.runs_dir / name,
                )
            )
    seen: dict[str, RunSpec] = {}
    for run in runs:
        if run.name in seen:
            other = seen[run.name]
            raise _err(
                config.path,
                "methods/ablations",
                f"two runs are both named {run.name!r} "
                f"({other.method}+{other.ablation} and {run.method}+{run.ablation}); rename one",
            )
        seen[run.name] = run
    return runs
