"""The grid of an experiment: its runs (:class:`RunSpec`), the validated file
(:class:`ExperimentConfig`, read by :mod:`fishertune.experiments.experiment_file`) and
its expansion into runs (:func:`expand_grid`).

Runs are named ``{method}[-{ablation}]-seed{seed}``; each gets ``OUTPUT_DIR/runs/NAME/`` with the
trained model (``fishertune train --output_dir``) in its ``model/`` sub-folder. Training options
are merged with the precedence base YAML < ``overrides`` < method < ablation < seed (the grid's
seed always wins).

A ``base:`` block adds a first run named ``base`` (folder ``OUTPUT_DIR/runs/base``), trained with
base YAML < ``overrides`` < the block (its own ``base_config`` and ``seed``, default 0, allowed),
evaluated and measured like any run; every other run then starts from its saved model
(``model_name_or_path`` = ``OUTPUT_DIR/runs/base/model``, set by the grid, so no method may set it).
A ``measure:`` block adds a third stage to every run, ``fishertune analyze --record``
(:mod:`fishertune.analysis.record`): CE, ``Tr(F_X)``, ``Tr(H_X)`` of the final model (and, with
``checkpoints: true``, each saved checkpoint) into the run's ``curvature.json``.

Relative input paths are resolved against the current directory, then against the experiment
file's directory, then (``base_config``, ``accelerate_config``) as the name of a shipped preset
(``fishertune presets``), then against the experiment file's parent directories; a file always
wins over a preset of the same name. ``output_dir`` is relative to the current directory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishertune.experiments.blocks import SlurmSpec, StageFlags, evaluation_block
from fishertune.experiments.fields import field_error
from fishertune.experiments.measure_block import MeasureFlags
from fishertune.experiments.study import StudyData
from fishertune.files import MODEL_SUBDIR

__all__ = [
    "BASE_RUN",
    "MODEL_SUBDIR",
    "ExperimentConfig",
    "MeasureFlags",
    "RunSpec",
    "SlurmSpec",
    "expand_grid",
]

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
    """A validated experiment file (its fields: :mod:`fishertune.experiments.experiment_file`)."""

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
