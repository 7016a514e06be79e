"""The rows ``fishertune evaluate`` scores offline: each split's source and rows, the one line
that says so, and the check that they are not the rows the model was trained on.

A split comes from its own file (``--validation_file``, ``--test_file``) or from ``--dataset``
(default ``builtin:tiny-tasks``, the generated tasks): a file there is read whole whatever the
split, a folder gives its ``<split>`` file. The model folder's run record
(:data:`fishertune.files.RUN_RECORD`, in the folder or, for a checkpoint or a merged model, in
the one above) names the training data: a split read from the same file (by path or by
content), or the same folder, built-in or hub split, is refused unless allowed.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fishertune.data.options import DataOptions
from fishertune.errors import FishertuneError
from fishertune.files import RUN_RECORD, read_json_record

__all__ = [
    "EVALUATE_HINT",
    "SPLITS",
    "HeldOut",
    "describe",
    "file_sha256",
    "load_held_out",
    "training_settings",
    "training_splits",
]

SPLITS = ("validation", "test")
_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class HeldOut:
    """One split's rows: ``option`` is the command-line option that named its ``source``."""

    split: str
    option: str
    source: str
    rows: Any  # datasets.Dataset, after --limit (None until read)
    file: Path | None  # the local file read (a file, or a folder's <split> file)

    @property
    def label(self) -> str:
        if self.source.startswith("builtin:"):
            return f"{self.source} (the built-in generated tasks, split {self.split})"
        if self.file is not None and self.file == Path(self.source).expanduser():
            return f"{self.source} (the whole file)"
        if self.file is not None:
            return str(self.file)
        return f"{self.source} (split {self.split})"


def _local_file(source: str, split: str) -> Path | None:
    from fishertune.data.dataset_info import find_entry

    if source.startswith("builtin:"):
        return None
    entry = find_entry(source, split)
    if entry is not None:
        return entry.path
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for suffix in _SUFFIXES:
            if (path / f"{split}{suffix}").is_file():
                return path / f"{split}{suffix}"
    return None


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (kept while its size and mtime stay the same)."""
    stat = path.stat()
    return _sha256_of(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.cache  # validation and test are often one file; size and mtime key a changed one anew
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def training_settings(model_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The run folder and its recorded settings, for a run's output folder, one of its
    checkpoints or its merged model; ``None`` for a model that ``fishertune train`` did not
    write."""
    for folder in (model_dir, model_dir.parent):
        record = read_json_record(folder / RUN_RECORD)
        if isinstance(record, dict) and isinstance(record.get("settings"), dict):
            return folder, record["settings"]
    return None


def _trained_on(held: HeldOut, settings: dict[str, Any]) -> str | None:
    """Why ``held``'s rows are the training rows, or ``None`` when they are not."""
    source = settings.get("dataset_name")
    if not isinstance(source, str) or not source:
        return None
    split = settings.get("dataset_train_split") or "train"
    if held.file is not None:
        trained = _local_file(source, split)
        if trained is not None and trained.resolve() == held.file.resolve():
            return f"the same file as its dataset_name {source}"
        fingerprint = settings.get("data_sha256")
        # a single training file's fingerprint is its sha256 (a folder's covers all its files)
        single = trained is None or trained == Path(source).expanduser()
        if single and isinstance(fingerprint, str) and fingerprint == file_sha256(held.file):
            return f"the same contents as its dataset_name {source}"
        if trained is not None and not single and file_sha256(trained) == file_sha256(held.file):
            return f"the same contents as its training file {trained}"
        return None
    if held.source.rstrip("/") == source.rstrip("/") and held.split == split:
        return f"its dataset_name {source}, split {split}"
    return None


EVALUATE_HINT = (
    "give held-out data (--validation_file, --test_file, or --dataset with validation and test "
    "files) or --allow_training_data to score them anyway"
)


def training_splits(
    sources: dict[str, tuple[str, str]],
    model_dir: Path,
    *,
    allow_training_data: bool,
    hint: str = EVALUATE_HINT,
) -> tuple[dict[str, HeldOut], list[str]]:
    """Each split's :class:`HeldOut` (rows not read yet) and the splits that are training rows
    of the run in ``model_dir``; reads no rows, so a refusal comes before any data is read.

    Raises:
        FishertuneError: a split's rows are the training rows and ``allow_training_data`` is
            false (one line naming the option, then ``hint``).
    """
    splits = {
        split: HeldOut(split, option, source, None, _local_file(source, split))
        for split, (option, source) in sources.items()
    }
    trained = []
    found = training_settings(model_dir)
    if found is not None:
        run_dir, settings = found
        for held in splits.values():
            reason = _trained_on(held, settings)
            if reason is None:
                continue
            if not allow_training_data:
                raise FishertuneError(
                    f"{held.option} {held.source}: the {held.split} rows would be rows "
                    f"{run_dir} was trained on ({reason}); {hint}"
                )
            trained.append(held.split)
    return splits, trained


def load_held_out(
    sources: dict[str, tuple[str, str]],
    options: DataOptions,
    limit: int | float | None,
    model_dir: Path,
    *,
    allow_training_data: bool,
) -> tuple[dict[str, HeldOut], list[str]]:
    """Each split's rows (``sources``: split -> (option, source)), read and limited, and the
    splits that are training rows (only with ``allow_training_data``; refused otherwise).

    Raises:
        FishertuneError: a split's rows are the training rows of the run in ``model_dir``, and
            ``allow_training_data`` is false (one line naming the option); the reader's errors.
    """
    from fishertune.data.chat import load_conversations
    from fishertune.evaluation.offline import limited

    splits, trained = training_splits(sources, model_dir, allow_training_data=allow_training_data)
    for held in splits.values():
        held.rows = limited(load_conversations(held.source, held.split, options), limit)
    return splits, trained


def describe(splits: dict[str, HeldOut], trained: list[str]) -> str:
    """One line: what each split scores, and the rows the model was trained on."""
    validation, test = splits["validation"], splits["test"]
    if validation.file is not None and validation.file == test.file:
        parts = [f"validation and test: the same {len(test.rows)} rows of {test.label}"]
    else:
        parts = [f"{held.split}: {len(held.rows)} rows of {held.label}" for held in splits.values()]
    line = "offline scores " + "; ".join(parts)
    if trained:
        line += f" (the {' and '.join(trained)} rows are training rows: --allow_training_data)"
    return line
