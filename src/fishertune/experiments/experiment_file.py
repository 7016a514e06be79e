"""Experiment files: reading and validating the YAML of a methods x ablations x seeds grid (its
runs: :mod:`fishertune.experiments.grid`).

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
    measure: {split: validation, probes: 4} # optional: Tr(F_X), Tr(H_X) of every run
                                            # (fishertune analyze's flags, and seeds:)
    study_data: {out: data}                 # optional: the study's data, made before any run
                                            # (relative to output_dir); other blocks' strings
                                            # name the folder as {study_data}, e.g.
                                            # dataset_name: "{study_data}/chat"
    slurm:                                  # optional: resources of `--launcher slurm` jobs
      partition: gpu
      nodes: 1
      gpus_per_node: 8
      time: "48:00:00"                      # quoted: YAML reads 48:00:00 as a number

Relative input paths are resolved against the current directory, then against the experiment
file's directory, then (``base_config``, ``accelerate_config``) as the name of a shipped preset
(``fishertune presets``), then against the experiment file's parent directories; a file always
wins over a preset of the same name. ``output_dir`` is relative to the current directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.experiments.blocks import (
    env_block,
    evaluation_block,
    launcher_block,
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
from fishertune.experiments.grid import BASE_RUN, ExperimentConfig, RunSpec, expand_grid
from fishertune.experiments.measure_block import measure_block
from fishertune.experiments.study import study_blocks

__all__ = ["load_experiment", "parse_experiment"]

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


def _base_run(
    path: Path, value: Any, base: Path | None, overrides: dict[str, Any], runs_dir: Path
) -> RunSpec | None:
    """The ``base:`` block as the grid's first run (see :mod:`fishertune.experiments.grid`)."""
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
