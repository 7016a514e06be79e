"""Running one run of a grid: its stages in order, what is done skipped, an interrupted training
resumed. Both launchers (the local queue and the SLURM job) run a run through :func:`run_run`.

A stage is done when its product is complete (:class:`fishertune.files.RunFolder`): a finished
training, a complete ``evaluation.json``, a complete ``curvature.json``. A run whose stored
evaluation or ``measure:`` settings differ from the grid's is evaluated or measured again; one
whose training settings differ is cleared first when its folder holds no work (the debris of a
failed attempt; :func:`fishertune.experiments.checks.check_stored_specs` has refused those that
do). The training command continues from the latest complete checkpoint (``--resume``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.experiments.commands import evaluate_command, measure_command, train_command
from fishertune.experiments.grid import ExperimentConfig, RunSpec, expand_grid
from fishertune.experiments.measure_block import MEASURE_ALIASES, MEASURE_PROGRAM, measure_options
from fishertune.experiments.processes import Launcher
from fishertune.experiments.study import find_study
from fishertune.files import (
    ANSWERS_SUBDIR,
    EVALUATION_FILE,
    MEASURE_FILE,
    MODEL_SUBDIR,
    RUN_RECORD,
    SPEC_FILE,
    RunFolder,
    write_json_atomic,
    write_status,
)

__all__ = [
    "STAGE_BLOCKS",
    "RunResult",
    "canonical_block",
    "changed_training",
    "pending_stages",
    "prepare_grid_data",
    "prepare_run",
    "run_run",
    "run_stages",
    "same_settings",
    "stale_block",
    "stored_settings",
    "update_status",
]

STAGE_BLOCKS = ("evaluation", "measure")

# What run folders stored for an option left unset while the evaluation: block was the
# dataclass EvaluationSpec (blocks.py, up to commit 101eb0e): every field was written, unset ones
# with these defaults. Frozen here so that such records still compare equal to the current
# entries, which hold only the options a file sets: an 8B evaluation is GPU hours, not worth
# redoing for a change of how its settings are written. (EvaluationSpec's other fields
# defaulted to None, which is dropped anyway.)
_STORED_DEFAULTS: dict[str, dict[str, Any]] = {
    "evaluation": {"tasks": ["offline"], "include_path": [], "extra_args": []},
}
# A measure: entry without "program" (measure_block.MEASURE_PROGRAM) was written while the stage was
# its own program (fishertune/experiments/curvature.py, up to commit 4dc7e15; the dataclass
# MeasureSpec before it): these were that program's defaults for an option left unset (its
# dataclass form wrote them out), and the settings it measured with and had no option for.
# Frozen here: such an entry means these, whatever analyze's defaults are.
_OLD_MEASURE_DEFAULTS: dict[str, Any] = {
    "batches": 2,
    "batch_size": 8,
    "probes": 4,
    "max_length": 128,
    "split": "validation",
    "checkpoints": True,
    "seed": 0,
    "dtype": "float32",
    "attn_implementation": "eager",
}
# options whose string value is a comma list (``--tasks mmlu,ifeval``, ``--split a,b``)
_COMMA_LISTS = ("tasks", "split")


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


def update_status(
    config: ExperimentConfig, results: Sequence[RunResult], *, unless_same_job: bool = False
) -> None:
    """Record these runs' results in ``experiment_status.json``, in the grid's order
    (:func:`fishertune.files.write_status`)."""
    write_status(
        config.output_dir,
        [asdict(result) for result in results],
        experiment=str(config.path),
        order=[run.name for run in expand_grid(config)],
        unless_same_job=unless_same_job,
    )


def stored_settings(config: ExperimentConfig, run: RunSpec) -> dict[str, Any]:
    """What ``fishertune_experiment.json`` stores: the run's identity, training overrides and
    evaluation (and ``measure:``) settings, through JSON and back so that they compare as
    stored."""
    settings = {**run.to_json(), "evaluation": config.evaluation.stored}
    if config.measure is not None:
        settings["measure"] = config.measure.stored
    return json.loads(json.dumps(settings))


def _canonical_value(key: str, value: Any) -> Any:
    """A list as a tuple of its items (a comma list's string split), a one-item list as that
    item: ``[offline]``, ``offline`` and ``"offline"`` are one setting."""
    if isinstance(value, str) and key in _COMMA_LISTS:
        value = [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple)):
        items = tuple(_canonical_value("", item) for item in value)
        return items[0] if len(items) == 1 else items
    if isinstance(value, dict):
        return {k: _canonical_value(k, v) for k, v in value.items()}
    return value


def _measure_flags(entry: dict[str, Any]) -> dict[str, Any]:
    """A stored ``measure`` entry's analyze flags: an entry of the former program (no
    ``program``) under analyze's names (``dataset`` -> ``data``), its defaults filled in."""
    flags = {k: v for k, v in entry.items() if k not in ("program", "seeds") and v is not None}
    if entry.get("program") == MEASURE_PROGRAM:
        return flags
    return {**_OLD_MEASURE_DEFAULTS, **{MEASURE_ALIASES.get(k, k): v for k, v in flags.items()}}


def _canonical_measure(entry: dict[str, Any]) -> dict[str, Any]:
    """A ``measure`` entry as what its measurement records (:func:`measure_options`:
    every option analyze measured with, defaults included, but those the record does not
    depend on) and its ``seeds``; an entry analyze's parser refuses stays as it is."""
    options = measure_options(_measure_flags(entry))
    if options is None:
        return {"unreadable": entry}
    return {**options, "seeds": entry.get("seeds")}


def canonical_block(block: str, entry: Any) -> dict[str, Any] | None:
    """A stored ``evaluation`` or ``measure`` entry in the form two entries compare in: absent,
    None and empty values dropped, values equal to the old stored defaults dropped (a
    ``measure`` entry: every option resolved, :func:`_canonical_measure`), lists normalized
    (:func:`_canonical_value`). ``None`` (no block) stays ``None``."""
    if not isinstance(entry, dict):
        return None
    if block == "measure":
        entry = _canonical_measure(entry)
    defaults = {
        key: _canonical_value(key, value) for key, value in _STORED_DEFAULTS.get(block, {}).items()
    }
    canonical = {}
    for key, value in entry.items():
        value = _canonical_value(key, value)
        if value is None or value in ("", (), {}) or (key in defaults and defaults[key] == value):
            continue
        canonical[key] = value
    return canonical


def stale_block(stored: Any, current: dict[str, Any], block: str) -> bool:
    """Whether a stored settings record's ``block`` (``evaluation`` or ``measure``) differs
    from ``current``'s in canonical form (:func:`canonical_block`); no record: not stale."""
    if not isinstance(stored, dict):
        return False
    return canonical_block(block, stored.get(block)) != canonical_block(block, current.get(block))


def same_settings(stored: Any, current: dict[str, Any]) -> bool:
    """Whether a stored settings record describes the run ``current`` describes: the same
    identity and training, and the same stage blocks in canonical form."""
    if not isinstance(stored, dict):
        return False
    # the preset by content where both record its hash: its path changes with the install
    # (a new virtual environment, another checkout) while the training it names does not
    by_hash = "base_config_sha256" in stored and "base_config_sha256" in current
    ignored = {*STAGE_BLOCKS, "base_config"} if by_hash else set(STAGE_BLOCKS)
    rest = [{k: v for k, v in s.items() if k not in ignored} for s in (stored, current)]
    return rest[0] == rest[1] and not any(stale_block(stored, current, b) for b in STAGE_BLOCKS)


def changed_training(stored: Any, current: dict[str, Any]) -> bool:
    """Whether a stored settings record names another training than ``current``."""
    if not isinstance(stored, dict):
        return False
    # the preset by content (records written before the hash existed: by path)
    preset = "base_config_sha256" if "base_config_sha256" in stored else "base_config"
    return any(stored.get(key) != current[key] for key in (preset, "overrides"))


def _measured_run(config: ExperimentConfig, settings: dict[str, Any]) -> bool:
    """Whether the run described by ``settings`` gets a ``measure`` stage (``measure.seeds``)."""
    from fishertune.experiments.grid import BASE_RUN

    spec = config.measure
    return spec is not None and spec.measures(
        int(settings["seed"]), base=settings["name"] == BASE_RUN
    )


def _pending(config: ExperimentConfig, folder: RunFolder, settings: dict[str, Any]) -> list[str]:
    """The stages still to do: ``train``, ``evaluate``, ``measure``, in order."""
    stored = folder.spec
    stages = [] if folder.trained else ["train"]
    if stages or not folder.evaluated or stale_block(stored, settings, "evaluation"):
        stages.append("evaluate")
    if _measured_run(config, settings):
        stale = stale_block(stored, settings, "measure")
        if stages[:1] == ["train"] or not folder.measured or stale:
            stages.append("measure")
    return stages


def pending_stages(
    config: ExperimentConfig, run: RunSpec, **train_options: Any
) -> list[tuple[str, list[str]]]:
    """The stages of a run still to do, with their commands (``train_options`` go to
    :func:`~fishertune.experiments.commands.train_command`)."""
    commands: dict[str, Callable[[], list[str]]] = {
        "train": lambda: train_command(config, run, **train_options),
        "evaluate": lambda: evaluate_command(config, run),
        "measure": lambda: measure_command(config, run),
    }
    names = _pending(config, RunFolder(run.run_dir), stored_settings(config, run))
    return [(stage, commands[stage]()) for stage in names]


def prepare_grid_data(
    config: ExperimentConfig, log: Callable[[str], None] = print, *, dry_run: bool = False
) -> bool:
    """Write the study's data (the ``study_data:`` block), under the launcher's
    :class:`~fishertune.locks.RunnerLock`, through its
    :meth:`~fishertune.experiments.study.Study.prepare_data` (nothing when it exists with the
    same settings); with ``dry_run`` only say whether it would be.

    Returns:
        Whether data was written (the runs' data checks are then worth redoing).

    Raises:
        FishertuneError: the study refuses its data folder (other settings, other files).
    """
    if config.study is None or config.study_data is None:
        return False
    study = find_study(config.path, "study", config.study)
    return study.prepare_data(config, log, dry_run=dry_run)


def prepare_run(config: ExperimentConfig, run: RunSpec) -> None:
    """Make a run's folder ready for its stages: clear the debris of an attempt with other
    settings (a folder :func:`~fishertune.experiments.checks.check_stored_specs` let through),
    drop an ``evaluation.json`` / ``curvature.json`` that the pending stages will replace, and
    write the run's settings file."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(run.run_dir)
    settings = stored_settings(config, run)
    if changed_training(folder.spec, settings):
        if folder.holds_work:  # checked before, but never delete work on a race
            raise FishertuneError(f"{run.run_dir} holds a run trained with other settings")
        shutil.rmtree(run.model_dir, ignore_errors=True)
        shutil.rmtree(run.run_dir / ANSWERS_SUBDIR, ignore_errors=True)
        stages = {"train", "evaluate", "measure"}
    else:
        stages = set(_pending(config, folder, settings))
    # A new training or new evaluation settings make the old scores meaningless; removing them
    # first also means a failed evaluation can never leave old numbers in the report.
    if stages & {"train", "evaluate"}:
        (run.run_dir / EVALUATION_FILE).unlink(missing_ok=True)
    if stages & {"train", "measure"}:
        (run.run_dir / MEASURE_FILE).unlink(missing_ok=True)
    write_json_atomic(run.run_dir / SPEC_FILE, settings)


_PRODUCTS = {
    "train": (lambda folder: folder.trained, f"{MODEL_SUBDIR}/{RUN_RECORD}"),
    "evaluate": (lambda folder: folder.evaluated, EVALUATION_FILE),
    "measure": (lambda folder: folder.measured, MEASURE_FILE),
}


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
    (``model/fishertune_run.json``, ``evaluation.json``, ``curvature.json``) complete; the
    product is checked only for the main log (``log_tag`` empty): another node of a multi-node
    run finishes before the main one has written it. Stage ``s`` logs to ``s{log_tag}.log`` in
    the run folder. ``fields`` go into the result (``launcher``, ``job_id``, ``slurm_log``).
    """
    start = time.time() if start is None else start
    for stage, command in stages:
        log_path = run.run_dir / f"{stage}{log_tag}.log"
        code = launch(command, log_path, {**config.env, **(env or {})})
        done, product = _PRODUCTS[stage]
        message = None
        if code != 0:
            message = f"{stage} exited with status {code}"
        elif not log_tag and not done(RunFolder(run.run_dir)):
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


def run_run(
    config: ExperimentConfig,
    run: RunSpec,
    launch: Launcher,
    *,
    train_options: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    node: int = 0,
    on_start: Callable[[], None] | None = None,
    start: float | None = None,
    **fields: Any,
) -> RunResult:
    """Run one run: prepare its folder, then its pending stages in order.

    Args:
        config: the experiment.
        run: the run.
        launch: runs one stage's command.
        train_options: given to :func:`~fishertune.experiments.commands.train_command`
            (processes, rendezvous, port).
        env: added to each stage's environment.
        node: this node of a multi-node run; only node 0 prepares the folder, checks the
            products and evaluates, the others take part in the training (logs
            ``train.node{N}.log``).
        on_start: called once the folder is prepared (node 0), before the first stage.
        start: when this attempt began (default: now).
        fields: go into the result (``launcher``, ``job_id``, ``slurm_log``).
    """
    start = time.time() if start is None else start
    if node == 0:
        prepare_run(config, run)
    stages = pending_stages(config, run, **(train_options or {}))
    if node > 0:  # the other nodes only take part in the training
        stages = [(stage, command) for stage, command in stages if stage == "train"]
    elif on_start is not None:
        on_start()
    tag = f".node{node}" if node > 0 else ""
    return run_stages(config, run, stages, launch, env=env, start=start, log_tag=tag, **fields)
