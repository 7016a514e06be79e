"""Preparation: a source's rows through the bad-row policy into a cached JSON Lines file.

Every data entry point (``fishertune train``, ``evaluate``, ``analyze``, ``data prepare``,
experiment grids, :func:`fishertune.data.load_conversations`) reads its rows through
:func:`prepare_rows`, which

1. reads the source's records (:mod:`fishertune.data.readers`): a local ``.jsonl`` line by
   line, a local ``.json`` (an array, ``{field: [rows]}`` or JSON Lines) as a stream (bounded
   memory; a file cut off inside its last record is reported, see
   :class:`fishertune.data.json_records.JsonRecords`), a ``.parquet`` file, a folder or a hub
   dataset through ``datasets``;
2. detects the format from the first record's fields (or takes ``data_format``) and logs it;
3. turns each record into a canonical row or a drop reason
   (:func:`fishertune.data.normalize.normalize_record`);
4. applies the bad-row policy: ``on_bad_rows="drop"`` (default) drops the rows that cannot be
   used and counts them by reason; ``"error"`` stops at the first one with one line naming the
   file, row and field;
5. writes the kept rows as JSON Lines, with a report (rows read, kept, dropped by reason, the
   first example of each reason), into a cache folder keyed by the source's path and content
   (a sha256 of the file, or the ``datasets`` fingerprint) and the options, so a second read
   of the same data (validation before training, then the run) costs only the hash.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fishertune.data.normalize import (
    BadRowError,
    check_unicode,
    detect_format,
    normalize_record,
    tools_warning,
    unused_parts,
    unused_warnings,
)
from fishertune.data.options import DataOptions
from fishertune.data.readers import Source, resolve_source
from fishertune.errors import FishertuneError

__all__ = [
    "READER_VERSION",
    "PreparedRows",
    "check_source",
    "prepare_rows",
    "record_drops",
    "write_rows",
]

logger = logging.getLogger(__name__)

# Bump when the canonical rows written for the same input change: the cache is keyed by it.
READER_VERSION = "2"


@dataclass
class PreparedRows:
    """Rows read through the policy: ``path`` (canonical JSON Lines) and ``report``
    (``source``, ``format``, ``rows_read``, ``rows_kept``, ``dropped`` by reason,
    ``examples``: the first row of each reason, one line each)."""

    path: Path
    report: dict[str, Any]

    @property
    def chat(self) -> bool:
        return self.report["kind"] == "chat"

    def summary(self) -> str:
        """One line: source, format, rows read and kept, dropped by reason."""
        r = self.report
        line = f"{r['source']}: {r['format']}, {r['rows_read']} rows read, {r['rows_kept']} kept"
        if r["dropped"]:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["dropped"].items()))
            line += f", {sum(r['dropped'].values())} dropped ({reasons})"
        if r.get("leading_assistant_trimmed"):
            line += f"; {r['leading_assistant_trimmed']} kept rows lost a leading assistant turn"
        if r.get("truncated"):
            line += "; the file is cut off (its complete records kept)"
        return line

    def load(self) -> Any:
        """The kept rows as a ``datasets.Dataset``."""
        import datasets

        return datasets.Dataset.from_json(str(self.path))


def _cache_root() -> Path:
    return Path(os.environ.get("FISHERTUNE_CACHE") or "~/.cache/fishertune").expanduser()


def write_rows(
    source: Source, options: DataOptions, out: Path, *, progress: bool = False
) -> dict[str, Any]:
    """Read ``source`` through the policy into ``out`` (JSON Lines); return the report.

    Raises:
        FishertuneError: a malformed file, an undetectable format, every row dropped, or with
            ``on_bad_rows="error"`` the first bad row (file, row, field).
    """
    options = source.options(options)
    counts: Counter[str] = Counter()
    notes: Counter[str] = Counter()  # changes made to kept rows, and what they hold
    unused: Counter[str] = Counter()  # what kept rows carry that SFT does not use
    examples: dict[str, str] = {}
    fmt = None
    kind = None
    read = kept = 0
    records = source.records(options)
    truncated = False
    with out.open("w", encoding="utf-8") as f:
        for where, record in records:
            read += 1
            if fmt is None:
                keys = record.keys() if isinstance(record, Mapping) else ()
                try:
                    fmt = detect_format(keys, options)
                except FishertuneError as err:
                    raise FishertuneError(f"{where}: {err}") from None
                how = "given" if options.data_format != "auto" else "detected from the fields"
                logger.info("%s: format %s (%s)", source.name, fmt, how)
            row_notes: Counter[str] = Counter()
            try:
                check_unicode(record)
                row = normalize_record(record, fmt, options, row_notes)
            except BadRowError as bad:
                message = f"{where}: field {bad.field_name!r}: {bad.message} ({bad.reason})"
                if options.on_bad_rows == "error":
                    raise FishertuneError(
                        f"{message} (on_bad_rows=error; default: drop and count)"
                    ) from None
                counts[bad.reason] += 1
                examples.setdefault(bad.reason, message)
                continue
            unused.update(unused_parts(record, fmt, options))
            row_kind = "chat" if "messages" in row else "lm"
            kind = kind or row_kind
            if row_kind != kind:
                raise FishertuneError(f"{where}: a {row_kind} row among {kind} rows")
            f.write(json.dumps(row, ensure_ascii=False, default=str))
            f.write("\n")
            kept += 1
            notes.update(row_notes)
            if row.get("tools"):
                notes["rows_with_tools"] += 1
            if progress and read % 20000 == 0:
                logger.info("%s: %d rows read, %d kept", source.name, read, kept)
    truncated = bool(getattr(records, "truncated", False))
    if read == 0:
        raise FishertuneError(f"{source.name}: no conversations: {_nothing(source.path)}")
    if kept == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        first = next(iter(examples.values()))
        raise FishertuneError(f"{source.name}: all {read} rows dropped ({reasons}); first: {first}")
    return {
        "source": source.name,
        "format": fmt,
        "kind": kind,
        "rows_read": read,
        "rows_kept": kept,
        "dropped": dict(sorted(counts.items())),
        "leading_assistant_trimmed": notes["leading_assistant_trimmed"],
        "rows_with_tools": notes["rows_with_tools"],
        "examples": examples,
        "truncated": truncated,
        "warnings": unused_warnings(unused, kept) + tools_warning(notes["rows_with_tools"], kept),
        "options": json.loads(options.key()),
    }


def _nothing(path: Path | None) -> str:
    if path is None or path.suffix.lower() == ".parquet":
        return "0 rows"
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).strip()
    if head.startswith(b"["):
        return "the list is empty"
    if head.startswith(b"{"):
        return "its list of rows is empty"
    return "the file holds only blank lines"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


_WRITER = ".writer"  # in a write's temporary folder: flocked by the writer while it lives
_ORPHAN_S = 60  # a temporary folder with no writer file yet is a write's first instant


def _write_entry(source: Source, options: DataOptions, root: Path, target: Path) -> dict:
    """Write ``source``'s rows and report into a temporary ``root/.rows-*`` folder, locked by
    this process until it is renamed to ``target``: a killed write leaves a folder that the
    next read removes (:func:`_remove_stale_writes`), never a partial entry."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".rows-", dir=root))
    try:
        with (tmp / _WRITER).open("w") as writer:
            fcntl.flock(writer, fcntl.LOCK_EX)
            report = write_rows(source, options, tmp / "rows.jsonl")
            (tmp / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
            (tmp / _WRITER).unlink()
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(tmp, target)
            except OSError:  # another process wrote the same rows first
                if not (target / "report.json").is_file():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _remove_stale_writes(root: Path) -> None:
    """Remove the temporary folders of writes whose process died (its lock went with it)."""
    for tmp in root.glob(".rows-*"):
        try:
            with (tmp / _WRITER).open("r") as writer:
                try:
                    fcntl.flock(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live write
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            # no writer file: a write in its first instant, or one killed then; or gone
            with contextlib.suppress(FileNotFoundError):
                if time.time() - tmp.stat().st_mtime > _ORPHAN_S:
                    shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # not ours to read: leave it
            continue


def _prune(slot: Path, keep: Path) -> None:
    """Remove the entries of an earlier content of the same source and options."""
    for entry in slot.iterdir():
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)


def prepare_rows(
    source: str | Any, split: str = "train", options: DataOptions | None = None
) -> PreparedRows:
    """Read ``source`` (its ``split``) through the one reader and the bad-row policy.

    Args:
        source: a name (file, folder, hub dataset, ``builtin:...``) or a ``datasets.Dataset``.
        split: the split of a folder or hub dataset.
        options: formats, mappings, policy.

    The result is cached under ``$FISHERTUNE_CACHE/rows/<source>/<content>`` (default
    ``~/.cache/fishertune``): the source's path (or dataset name) and the options, then its
    content's sha256 (or ``datasets`` fingerprint), so an edit that keeps size and mtime is
    seen; a second call reads nothing again, hashing aside. An entry for another content of the
    same source is removed. The one-line summary is logged.

    Returns:
        :class:`PreparedRows`.

    Raises:
        FishertuneError: see :func:`write_rows`.
    """
    options = options or DataOptions()
    if isinstance(source, str):
        resolved = resolve_source(source, split)
        assert resolved is not None
    else:
        resolved = Source.in_memory(source)
    options = resolved.options(options)
    root = _cache_root() / "rows"
    slot = root / _short_hash(f"{READER_VERSION}|{resolved.slot()}|{options.key()}")
    target = slot / _short_hash(resolved.content())
    rows, report_file = target / "rows.jsonl", target / "report.json"
    _remove_stale_writes(root)
    if report_file.is_file() and rows.is_file():
        report = json.loads(report_file.read_text())
        report["source"] = resolved.name
    else:
        report = _write_entry(resolved, options, root, target)
    _prune(slot, keep=target)
    prepared = PreparedRows(rows, report)
    logger.info("%s", prepared.summary())
    for warning in report.get("warnings", ()):
        logger.warning("%s: %s", resolved.name, warning)
    return prepared


def check_source(source: str, split: str = "train", options: DataOptions | None = None) -> None:
    """Read a local source through the policy (so its errors come before a run starts); a hub
    name is not contacted."""
    options = options or DataOptions()
    if resolve_source(source, split, contact_hub=False) is not None:
        prepare_rows(source, split, options)


def record_drops(
    dropped: dict[str, int],
    total: int,
    kept: int,
    max_length: int,
    report: dict[str, Any] | None,
) -> None:
    """The rows a tokenization at ``max_length`` dropped, by reason: refused in one line when no
    row is left, else one warning with the counts, and added to the data ``report``
    (``dropped`` by reason, ``rows_kept``).

    Raises:
        FishertuneError: every one of ``total`` rows was dropped.
    """
    dropped = {k: v for k, v in dropped.items() if v}
    if total and not kept:
        raise FishertuneError(
            f"all {total} rows were dropped at max_length={max_length} "
            f"({', '.join(f'{k} {v}' for k, v in dropped.items())}); raise max_length"
        )
    if dropped:
        logger.warning(
            "dropped %d of %d rows at max_length=%d (%s)",
            sum(dropped.values()),
            total,
            max_length,
            ", ".join(f"{k} {v}" for k, v in dropped.items()),
        )
    if report is not None:
        counts = report.setdefault("dropped", {})
        for reason, n in dropped.items():
            counts[reason] = counts.get(reason, 0) + n
        report["rows_kept"] = kept
