"""The run folder: every file name fishertune reads or writes there, atomic JSON records, the
checkpoint rule, one read of a run's state and the experiment status file (the folder lock that
trainers and runners share is :mod:`fishertune.locks`).

Everything that looks into a run folder goes through this module (the trainer, the runner, the
SLURM jobs, ``--status``, the reports), so a file name or a completeness rule lives in one place.
It imports neither TRL nor transformers: a status table or a report reads runs without the
training stack.

A ``fishertune train`` output folder (``model/`` of an experiment run)::

    fishertune_run.json          the run record: settings and outcome (``status: completed``)
    trainer_state.json           transformers' state (``global_step``, ``log_history``)
    checkpoint-N/                a checkpoint; complete once ``fishertune_checkpoint.json`` is in
    train.log                    the run's log (its messages, warnings and logged steps)
    runs/                        tensorboard events (unless ``report_to`` says otherwise)
    evaluation-KEY.json          ``fishertune compare``'s evaluation on held-out files (+ .log)

An experiment run folder (``OUTPUT_DIR/runs/NAME/``)::

    fishertune_experiment.json   the run's settings (detects changed settings)
    model/                       the training's output folder (above)
    evaluation.json              ``fishertune evaluate``'s scores (``metrics``)
    curvature.json               the ``measure`` stage's record (``final``, ``trajectory``)
    metrics_*.json               further scores merged into reports (e.g. judge scores)
    answers/                     AlpacaEval / MT-Bench answer exports
    train.log, evaluate.log, measure.log

and beside ``runs/``: ``experiment_status.json`` (one entry per run, written under a lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# The records fishertune writes into a run folder, named here once for every reader and writer.
RUN_RECORD = "fishertune_run.json"  # a finished `fishertune train` run: settings and outcome
CHECKPOINT_RECORD = "fishertune_checkpoint.json"  # in checkpoint-N/: it is complete
TRAINER_STATE = "trainer_state.json"  # transformers' own: global_step, log_history
SPEC_FILE = "fishertune_experiment.json"  # an experiment run's settings
EVALUATION_FILE = "evaluation.json"  # the evaluate stage's product
HELD_OUT_EVALUATION = "evaluation-{key}.json"  # `fishertune compare`'s evaluation of a
# train run on named held-out files (key: their sha256), beside its model
COMPARE_FILES = ("compare.json", "compare.png")  # `fishertune compare --output`'s files
MEASURE_FILE = "curvature.json"  # the measure stage's product
TRAIN_LOG = "train.log"  # a train run's log; an experiment run's training output too
DATA_REPORT = "data_report.json"  # a train run's rows read, kept, dropped by reason per split
MODEL_SUBDIR = "model"  # an experiment run's `fishertune train --output_dir`
ANSWERS_SUBDIR = "answers"  # an experiment run's answer exports
STATUS_FILE = "experiment_status.json"  # beside runs/: one entry per run
RUNNER = "fishertune experiment"  # what a runner's lock says holds the folder
RECORD_RESERVE = ".fishertune_run.reserve"  # space kept free for the run record's last word
RESERVE_BYTES = 256 * 1024  # a run record is a few kB: room for it many times over


def write_json_atomic(
    path: str | os.PathLike, payload: Any, *, sort_keys: bool = False, allow_nan: bool = True
) -> Path:
    """Write ``payload`` as JSON to a temporary file beside ``path``, then rename it over
    ``path``: readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the record from the team
        with os.fdopen(fd, "w") as file:
            json.dump(payload, file, indent=2, sort_keys=sort_keys, allow_nan=allow_nan)
            file.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def reserve_space(path: str | os.PathLike, size: int = RESERVE_BYTES) -> Path:
    """Allocate ``size`` bytes at ``path`` (real blocks, not a sparse file) for
    :func:`write_json_reserved` to free when the disk is full."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:  # a file system without fallocate: write the bytes
        os.write(fd, bytes(size))
    finally:
        os.close(fd)
    return path


def write_json_reserved(
    path: str | os.PathLike, payload: Any, reserve: str | os.PathLike, **options: Any
) -> Path:
    """:func:`write_json_atomic`; when that fails for lack of space (a full disk or quota, a
    file-size limit), free ``reserve`` (:func:`reserve_space`) and write again, so a run's
    record can still say how the run ended. Raises the ``OSError`` when that fails too."""
    try:
        return write_json_atomic(path, payload, **options)
    except OSError:
        if not Path(reserve).is_file():
            raise
        Path(reserve).unlink()
        return write_json_atomic(path, payload, **options)


def read_json_record(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable (a record that is not
    there yet, or one written by an interrupted writer before records were atomic)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _record(path: Path) -> dict[str, Any] | None:
    record = read_json_record(path)
    return record if isinstance(record, dict) else None


# ----------------------------------------------------------------------------- checkpoints


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete ``checkpoint-N`` in a training output folder, by step.

    The one checkpoint rule: a checkpoint counts once its record (:data:`CHECKPOINT_RECORD`,
    written last by the trainer) is there; a folder without it is an interrupted save.
    """
    found = []
    for child in Path(output_dir).glob("checkpoint-*"):
        suffix = child.name.split("-", 1)[1]
        if suffix.isdigit() and (child / CHECKPOINT_RECORD).is_file():
            found.append((int(suffix), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The latest complete ``checkpoint-N`` (:func:`checkpoints`), or ``None``."""
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def training_done(model_dir: str | os.PathLike) -> bool:
    """Whether ``fishertune train`` finished in ``model_dir`` (``fishertune_run.json`` says so)."""
    record = _record(Path(model_dir) / RUN_RECORD)
    return record is not None and record.get("status") == "completed"


def final_step(model_dir: str | os.PathLike) -> int | None:
    """The ``global_step`` of a finished training: its run record's, else its trainer state's;
    ``None`` when neither says."""
    record = _record(Path(model_dir) / RUN_RECORD) or {}
    if isinstance(record.get("global_step"), int):
        return record["global_step"]
    state = _record(Path(model_dir) / TRAINER_STATE) or {}
    step = state.get("global_step")
    return step if isinstance(step, int) else None


def step_reached(model_dir: str | os.PathLike) -> int | None:
    """The training step a run has safely reached: its final step once finished, else its latest
    complete checkpoint's; ``None`` when it has neither."""
    if training_done(model_dir):
        step = final_step(model_dir)
        if step is not None:
            return step
    found = checkpoints(model_dir)
    return found[-1][0] if found else None


# ----------------------------------------------------------------------------- a run's state


class RunFolder:
    """One read of an experiment run folder: each record is read once, when first asked for.

    Make a new one after the folder changed (a stage ran, debris was cleared).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)

    @property
    def model_dir(self) -> Path:
        """The training's output folder."""
        return self.run_dir / MODEL_SUBDIR

    @functools.cached_property
    def spec(self) -> dict[str, Any] | None:
        """The stored settings (:data:`SPEC_FILE`)."""
        return _record(self.run_dir / SPEC_FILE)

    @functools.cached_property
    def run_record(self) -> dict[str, Any] | None:
        """The training's run record (:data:`RUN_RECORD`)."""
        return _record(self.model_dir / RUN_RECORD)

    @functools.cached_property
    def trainer_state(self) -> dict[str, Any] | None:
        """transformers' ``trainer_state.json`` of the training."""
        return _record(self.model_dir / TRAINER_STATE)

    @functools.cached_property
    def evaluation(self) -> dict[str, Any] | None:
        """``evaluation.json``."""
        return _record(self.run_dir / EVALUATION_FILE)

    @functools.cached_property
    def curvature(self) -> dict[str, Any] | None:
        """``curvature.json`` (the measure stage's record)."""
        return _record(self.run_dir / MEASURE_FILE)

    @functools.cached_property
    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints (:func:`checkpoints`)."""
        return [step for step, _ in checkpoints(self.model_dir)]

    @property
    def trained(self) -> bool:
        """The training finished (its run record says ``completed``)."""
        return self.run_record is not None and self.run_record.get("status") == "completed"

    @property
    def evaluated(self) -> bool:
        """A complete ``evaluation.json`` (it has its ``metrics``)."""
        return self.evaluation is not None and isinstance(self.evaluation.get("metrics"), dict)

    @property
    def measured(self) -> bool:
        """A complete ``curvature.json`` (it has its ``final`` entry)."""
        return self.curvature is not None and isinstance(self.curvature.get("final"), dict)

    @property
    def holds_work(self) -> bool:
        """A trained model or a complete checkpoint: something a cleanup would lose."""
        return self.trained or bool(self.checkpoint_steps)

    @property
    def step(self) -> int | None:
        """The training step safely reached (:func:`step_reached`)."""
        return step_reached(self.model_dir)

    def extra_metrics(self) -> list[Any]:
        """The records of the folder's ``metrics_*.json`` files, by file name."""
        return [read_json_record(path) for path in sorted(self.run_dir.glob("metrics_*.json"))]


# ----------------------------------------------------------------------------- status and lock


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[Any]:
    """An exclusive ``flock`` on ``path`` for the ``with`` block (blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_status(output_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The runs' entries of ``OUTPUT_DIR/experiment_status.json``, by run name."""
    previous = _record(Path(output_dir) / STATUS_FILE)
    if previous is not None and isinstance(previous.get("runs"), list):
        return {e["name"]: e for e in previous["runs"] if isinstance(e, dict) and "name" in e}
    return {}


def write_status(
    output_dir: str | os.PathLike,
    entries: Sequence[dict[str, Any]],
    *,
    experiment: str,
    order: Sequence[str],
    unless_same_job: bool = False,
) -> None:
    """Replace these runs' entries of ``experiment_status.json``; other runs keep theirs.

    Several writers share the file (the runner, and SLURM jobs each recording their own run), so
    the read-modify-write holds a lock on ``experiment_status.json.lock``. ``unless_same_job``
    keeps an entry that already speaks of the same job (a job that started before its
    submission was recorded). Entries are kept in ``order`` (run names; others last).
    """
    path = Path(output_dir) / STATUS_FILE
    with file_lock(path.with_name(STATUS_FILE + ".lock")):
        current = read_status(output_dir)
        for entry in entries:
            old = current.get(entry["name"], {})
            if unless_same_job and entry.get("job_id") and old.get("job_id") == entry["job_id"]:
                continue
            current[entry["name"]] = dict(entry)
        rank = {name: index for index, name in enumerate(order)}
        write_json_atomic(
            path,
            {
                "experiment": experiment,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "runs": sorted(current.values(), key=lambda e: rank.get(e["name"], len(rank))),
            },
        )


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    # os.umask only reads the mask by setting it: set it back at once, one thread at a time
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


RUNS_SUBDIR = "runs"  # a grid's run folders: OUTPUT_DIR/runs/NAME/
