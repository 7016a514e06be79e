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
    evaluation: {tasks: [offline]}          # `fishertune evaluate`'s flags, by name
    launcher: local                         # or accelerate (+ accelerate_config, num_processes)
    env: {OMP_NUM_THREADS: "1"}             # optional: environment of every launched command
    report: {metrics: [offline/val_loss]}   # optional: table columns; default every metric;
                                            # study: NAME and the study's options
                                            # (fishertune.experiments.study)
    base:                                   # optional: a model trained once, which every
      max_steps: 500                        #   run fine-tunes (training overrides)
    measure: {batches: 2, probes: 4}        # optional: Tr(F_X), Tr(H_X) of every run (the
                                            # measure program's flags, and seeds:)
    study_data: {out: data}                 # optional: the study's data, made before any run
                                            # (relative to output_dir); other blocks' strings
                                            # name the folder as {study_data}, e.g.
                                            # dataset_name: "{study_data}/chat"
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.experiments.blocks import (
    MeasureFlags,
    SlurmSpec,
    StageFlags,
    env_block,
    evaluation_block,
    launcher_block,
    measure_block,
    report_block,
    slurm_block,
)
from fishertune.experiments.fields import (
    checked_name,
    field_error,
    mapping,
    overrides_block,
    resolve_path,
    seed_list,
    str_list,
)
from fishertune.experiments.study import StudyData, study_blocks
from fishertune.files import MODEL_SUBDIR

__all__ = [
    "BASE_RUN",
    "MODEL_SUBDIR",
    "ExperimentConfig",
    "MeasureFlags",
    "RunSpec",
    "SlurmSpec",
    "expand_grid",
    "load_experiment",
    "parse_experiment",
]

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
    "study_data",
)
BASE_RUN = "base"


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
    evaluation: StageFlags = field(default_factory=lambda: evaluation_block(Path(), None))
    launcher: str = "local"
    accelerate_config: Path | None = None
    num_processes: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    report_metrics: tuple[str, ...] | None = None
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    base_run: RunSpec | None = None
    measure: MeasureFlags | None = None
    study: str | None = None
    study_data: StudyData | None = None
    report_options: dict[str, Any] | None = None

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


def _base_run(
    path: Path, value: Any, base: Path | None, overrides: dict[str, Any], runs_dir: Path
) -> RunSpec | None:
    """The ``base:`` block as the grid's first run (see the module docstring)."""
    if value is None:
        return None
    body = mapping(path, "base", value)
    own = body.pop("base_config", None)
    seed = body.pop("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise field_error(path, "base.seed", f"expected an integer, got {seed!r}")
    if own is not None:
        config = resolve_path(path, "base.base_config", own, preset="train")
    elif base is not None:
        config = base
    else:
        raise field_error(path, "base", "no base_config: give one at the top level or in the block")
    merged = {**overrides, **overrides_block(path, "base", body), "seed": seed}
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
    raw = mapping(path, "top level", value, TOP_LEVEL_KEYS)
    for key in ("output_dir", "methods", "seeds"):
        if key not in raw:
            raise field_error(path, key, "missing (required)")
    return raw


STUDY_DATA = "{study_data}"


def _fill_study_data(path: Path, raw: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """``raw`` with ``{study_data}`` in the strings of the run blocks replaced by the study data
    folder: its place follows ``output_dir``, which the file cannot spell for ``--output_dir``."""

    def fill(value: Any, where: str) -> Any:
        if isinstance(value, str) and STUDY_DATA in value:
            if out is None:
                raise field_error(
                    path, where, f"{value!r} names {STUDY_DATA}, but the file has no study_data:"
                )
            return value.replace(STUDY_DATA, str(out))
        if isinstance(value, dict):
            return {k: fill(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    blocks = ("overrides", "base", "methods", "ablations", "evaluation", "measure")
    return {key: fill(value, key) if key in blocks else value for key, value in raw.items()}


def _methods(
    path: Path, value: Any, base: Path | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """The ``methods:`` block: each method's training overrides and its training YAML (its own
    ``base_config``, else the top-level one)."""
    methods_raw = mapping(path, "methods", value)
    if not methods_raw:
        raise field_error(path, "methods", "no methods given")
    methods: dict[str, dict[str, Any]] = {}
    method_configs: dict[str, Path] = {}
    for name, body in methods_raw.items():
        where = f"methods.{checked_name(path, 'methods', name)}"
        body = mapping(path, where, body)
        own = body.pop("base_config", None)
        if own is not None:
            method_configs[name] = resolve_path(path, f"{where}.base_config", own, preset="train")
        elif base is not None:
            method_configs[name] = base
        else:
            raise field_error(
                path, where, "no base_config: give one at the top level or in the method"
            )
        methods[name] = overrides_block(path, where, body)
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
        names = str_list(path, where, names)
        missing = [n for n in names if n not in methods]
        if missing:
            raise field_error(path, where, f"unknown method(s) {missing}; methods: {list(methods)}")
        ablation_methods[ablation] = names
    if isinstance(chosen, Mapping):
        stray = sorted(set(chosen) - set(ablations))
        if stray:
            raise field_error(path, "ablation_methods", f"unknown ablation(s) {stray}")
    return ablation_methods


def _refuse_model_path_with_base(
    path: Path,
    overrides: Mapping[str, Any],
    methods: Mapping[str, Mapping[str, Any]],
    ablations: Mapping[str, Mapping[str, Any]],
) -> None:
    """With a ``base:`` stage the grid sets every run's ``model_name_or_path``: refuse the
    name ``base`` for a method and ``model_name_or_path`` in any override block."""
    if BASE_RUN in methods:
        raise field_error(path, f"methods.{BASE_RUN}", "the name is taken by the base: stage")
    for where, body in (
        [("overrides", overrides)]
        + [(f"methods.{name}", body) for name, body in methods.items()]
        + [(f"ablations.{name}", body) for name, body in ablations.items()]
    ):
        if "model_name_or_path" in body:
            raise field_error(
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
        resolve_path(path, "base_config", raw["base_config"], preset="train")
        if raw.get("base_config")
        else None
    )
    output_dir = resolve_path(path, "output_dir", raw["output_dir"], must_exist=False)
    study, blocks = study_blocks(path, raw, output_dir)
    raw = _fill_study_data(path, raw, None if blocks.data is None else blocks.data.out)
    methods, method_configs = _methods(path, raw["methods"], base)
    seeds = seed_list(path, "seeds", raw["seeds"])
    ablations = {
        checked_name(path, "ablations", name): overrides_block(path, f"ablations.{name}", body)
        for name, body in mapping(path, "ablations", raw.get("ablations")).items()
    }
    ablation_methods = _ablation_methods(path, raw.get("ablation_methods"), ablations, methods)
    ablation_seeds = (
        seed_list(path, "ablation_seeds", raw["ablation_seeds"])
        if "ablation_seeds" in raw
        else seeds
    )
    launcher, accelerate_config, num_processes = launcher_block(path, raw)
    env = env_block(path, raw.get("env"))
    report_metrics = report_block(path, raw.get("report"))
    overrides = overrides_block(path, "overrides", raw.get("overrides"))
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
        evaluation=evaluation_block(path, raw.get("evaluation")),
        launcher=launcher,
        accelerate_config=accelerate_config,
        num_processes=num_processes,
        env=env,
        report_metrics=report_metrics,
        slurm=slurm_block(path, raw.get("slurm"), launcher=launcher, num_processes=num_processes),
        base_run=base_run,
        measure=measure_block(path, raw.get("measure")),
        study=study,
        study_data=blocks.data,
        report_options=blocks.report,
    )
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
            raise field_error(
                config.path,
                "methods/ablations",
                f"two runs are both named {run.name!r} "
                f"({other.method}+{other.ablation} and {run.method}+{run.ablation}); rename one",
            )
        seen[run.name] = run
    return runs
