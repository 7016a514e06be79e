"""Where records come from: a local ``.jsonl``, ``.json`` (through the cut-off JSON reader) or
``.parquet`` file read as a stream, a folder's ``<split>`` file, a ``dataset_info.json`` entry,
the built-in tasks, or a ``datasets.Dataset`` (a folder ``datasets`` can load, a hub name, a
dataset given in memory): :func:`resolve_source` names one as a :class:`Source`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fishertune.data.json_records import iter_json_array, iter_jsonl
from fishertune.data.options import DataOptions
from fishertune.errors import FishertuneError, first_line

__all__ = ["Source", "resolve_source"]

_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")


def _iter_dataset(dataset: Any, name: str) -> Iterator[tuple[str, Any]]:
    index = 0
    for batch in dataset.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield f"{name} row {index}", dict(zip(columns, values, strict=True))
            index += 1


def _local_file(path: Path, name: str, options: DataOptions) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    with path.open("rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":  # otherwise "byte 0x8b is not UTF-8", which hides the cause
        raise FishertuneError(
            f"{name}: the file is gzip-compressed; decompress it first (gunzip -k FILE)"
        )
    if suffix == ".jsonl":
        return iter_jsonl(path, name, options.keep_truncated)
    if suffix == ".json":
        return iter_json_array(path, name, options.keep_truncated, options.columns.values())
    if suffix == ".parquet":
        return _iter_parquet(path, name)
    raise FishertuneError(
        f"{name}: unsupported file type {suffix or '(none)'!r} "
        f"(expected one of {', '.join(_SUFFIXES)})"
    )


def _iter_parquet(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """A parquet file's rows, one record batch at a time: memory stays about one row group.
    (``datasets.load_dataset`` first copies the whole file into its Arrow cache, then maps it:
    its pages count in the resident memory as it is read, and a valid file without rows is
    refused.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Arrow's default pool (mimalloc) keeps the pages of freed batches, and pre-buffering reads
    # ahead: resident memory grew with the file (100 MB above the imports for a 72 MB file,
    # 30 MB with neither).
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    index = 0
    try:
        with pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False) as parquet:
            for batch in parquet.iter_batches(batch_size=1000):
                for record in batch.to_pylist():
                    yield f"{name} row {index}", record
                    index += 1
    except (OSError, pa.ArrowException) as err:
        raise FishertuneError(f"{name}: not a readable parquet file ({first_line(err)})") from err
    finally:
        pa.set_memory_pool(previous)


def _names_a_data_file(source: str) -> bool:
    return source.lower().endswith(_SUFFIXES) or source.startswith(("/", "./", "../", "~"))


_IN_MEMORY = "the dataset"  # the name of a datasets.Dataset given as the source


@dataclass
class Source:
    """Where records come from: a local file, or a ``datasets.Dataset`` (folder, hub)."""

    name: str
    path: Path | None = None
    dataset: Any = None
    entry: Any = None  # the dataset_info.json entry naming the file, whose options apply

    @classmethod
    def in_memory(cls, dataset: Any) -> Source:
        """A ``datasets.Dataset`` given as the source (no name of its own)."""
        return cls(_IN_MEMORY, dataset=dataset)

    def options(self, options: DataOptions) -> DataOptions:
        """``options`` under the source's ``dataset_info.json`` entry, if it has one."""
        return options if self.entry is None else options.under(self.entry)

    def slot(self) -> str:
        """What names the source whatever its content: its entries replace each other."""
        if self.path is not None:
            return str(self.path.resolve())
        if self.name == _IN_MEMORY:  # unnamed datasets: each its own, none prunes another's
            return f"{self.name}|{self.dataset._fingerprint}"
        return self.name

    def content(self) -> str:
        """The content's identity: a local file's sha256 (size and mtime survive ``cp -p``, an
        edit within a timestamp tick), else the ``datasets`` fingerprint."""
        if self.path is None:
            return str(self.dataset._fingerprint)
        digest = hashlib.sha256()
        with self.path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def records(self, options: DataOptions) -> Iterator[tuple[str, Any]]:
        """``(where, record)`` for each of the source's records, as a stream."""
        if self.path is not None:
            return _local_file(self.path, self.name, options)
        return _iter_dataset(self.dataset, self.name)


def resolve_source(source: str, split: str, *, contact_hub: bool = True) -> Source | None:
    """The records of ``source`` (file, folder's ``<split>`` file or ``datasets`` split, hub
    name, built-in tasks); None for a hub name when ``contact_hub`` is False."""
    from fishertune.data.builtin import BUILTIN_TINY_TASKS, check_builtin, tiny_tasks_dir
    from fishertune.data.dataset_info import find_entry

    if source == BUILTIN_TINY_TASKS or source.startswith("builtin:"):
        check_builtin(source, split)
        path = tiny_tasks_dir() / f"{split}.jsonl"
        return Source(str(path), path=path)
    entry = find_entry(source, split)
    if entry is not None:
        return Source(f"{entry.path} ({entry.name})", path=entry.path, entry=entry)
    path = Path(source).expanduser()
    if path.is_file():
        return Source(source, path=path)
    import datasets

    if path.is_dir():
        present = [path / f"{split}{s}" for s in _SUFFIXES if (path / f"{split}{s}").is_file()]
        if len(present) > 1:  # one would win in silence, and they may not hold the same rows
            names = " and ".join(p.name for p in present)
            raise FishertuneError(
                f"{path}: both {names} hold split {split!r}: remove or rename all but one, or "
                f"name the file to read (e.g. {present[0]})"
            )
        if present:
            return Source(str(present[0]), path=present[0])
        try:
            dataset = datasets.load_dataset(str(path), split=split)
        except Exception as err:  # datasets raises several types for "no such split / no data"
            present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise FishertuneError(
                f"{path}: no {split}.jsonl, {split}.json or {split}.parquet, and datasets cannot "
                f"load split {split!r} from it ({first_line(err)}); it holds: {present}"
            ) from err
        return Source(f"{path} (split {split})", dataset=dataset)
    if _names_a_data_file(source):
        raise FishertuneError(f"data file not found: {source}")
    if not contact_hub:
        return None
    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # offline, unknown name, unknown split, gated repo...
        raise FishertuneError(
            f"cannot load dataset {source!r} (split {split!r}): not a local file or folder, and "
            f"the hub could not provide it ({first_line(err)})"
        ) from err
    return Source(f"{source} (split {split})", dataset=dataset)
