"""LLaMA-Factory's ``dataset_info.json``: one entry read as a file plus the reader's options.

``--dataset_name DIR`` (a folder holding ``dataset_info.json``) or ``--dataset_name DIR:ENTRY``
names an entry; its ``file_name`` (relative to ``DIR``) is read through the one reader
(:mod:`fishertune.data.prepare`) with the options its ``formatting``, ``columns`` and ``tags``
describe, translated to fishertune's names:

* ``alpaca`` (the default): ``prompt``/``query``/``response``/``system``/``history`` columns ->
  ``instruction``/``input``/``output``/``system``/``history``;
* ``sharegpt``: ``messages``/``system``/``tools`` columns -> ``conversations``/``system``/
  ``tools``; ``role_tag``/``content_tag`` -> the turn's role and content keys; ``user_tag``,
  ``assistant_tag``, ``system_tag`` -> roles, with LLaMA-Factory's defaults (``from``, ``value``,
  ``human``, ``gpt``, ``system``); ``function_tag`` (default ``function_call``) is scored as an
  assistant turn and ``observation_tag`` (default ``observation``) is an unscored user turn, the
  positions and scoring LLaMA-Factory gives them.

Anything fishertune cannot honour (hub entries, preference or multimodal columns, an unknown
key) is refused in one line naming the file, the entry and the key, never ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError

__all__ = ["DATASET_INFO", "Entry", "find_entry"]

DATASET_INFO = "dataset_info.json"

# LLaMA-Factory's column keys per formatting -> fishertune's DEFAULT_COLUMNS keys
_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
    },
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
}
# documented by LLaMA-Factory, not trainable by text SFT: refused with the reason
_UNSUPPORTED_COLUMNS: dict[str, str] = {
    "chosen": "preference data",
    "rejected": "preference data",
    "kto_tag": "KTO data",
    "images": "multimodal data",
    "videos": "multimodal data",
    "audios": "multimodal data",
}
# tag -> (LLaMA-Factory's default, the canonical role its turns get); role_tag and content_tag
# name keys, the others name role values
_TAGS: dict[str, tuple[str, str | None]] = {
    "role_tag": ("from", None),
    "content_tag": ("value", None),
    "user_tag": ("human", "user"),
    "assistant_tag": ("gpt", "assistant"),
    "observation_tag": ("observation", "user"),
    "function_tag": ("function_call", "assistant"),
    "system_tag": ("system", "system"),
}
_ENTRY_KEYS = ("file_name", "formatting", "columns", "tags", "ranking")
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "script_url", "cloud_file_name")


@dataclass(frozen=True)
class Entry:
    """One entry: its ``name`` (``DIR:ENTRY``, for messages), ``path`` (the data file) and the
    options it implies (``data_format``, ``columns``, ``roles`` for :class:`DataOptions`)."""

    name: str
    path: Path
    info: Path
    data_format: str
    columns: dict[str, str]
    roles: dict[str, str]


def find_entry(source: str, split: str = "train") -> Entry | None:
    """The entry ``source`` names, or None when it names no ``dataset_info.json``.

    ``DIR:ENTRY`` names one entry; ``DIR`` the entry called ``split`` or the only one.

    Raises:
        FishertuneError: an unknown entry, several entries and none named ``split``, or an
            entry fishertune cannot read (one line naming the key).
    """
    folder, entry_name = Path(source).expanduser(), None
    if not (folder / DATASET_INFO).is_file():
        head, sep, tail = source.rpartition(":")
        if not sep or not head or not tail:
            return None
        folder, entry_name = Path(head).expanduser(), tail
        if not folder.is_dir():
            return None
        if not (folder / DATASET_INFO).is_file():
            raise FishertuneError(f"{source}: {folder} holds no {DATASET_INFO} to name entries of")
    info = folder / DATASET_INFO
    try:
        entries = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise FishertuneError(f"{info}: unreadable ({str(err).splitlines()[0]})") from None
    if not isinstance(entries, Mapping) or not entries:
        raise FishertuneError(f"{info}: expected an object of dataset entries")
    if entry_name is None:
        if split in entries:
            entry_name = split
        elif len(entries) == 1:
            entry_name = next(iter(entries))
        else:
            raise FishertuneError(
                f"{info}: {len(entries)} entries and none named {split!r}: name one as "
                f"{folder}:ENTRY (entries: {', '.join(entries)})"
            )
    if entry_name not in entries:
        raise FishertuneError(f"{info}: no entry {entry_name!r} (entries: {', '.join(entries)})")
    return _entry(info, entry_name, entries[entry_name])


def _entry(info: Path, name: str, spec: Any) -> Entry:
    where = f"{info} entry {name!r}"
    if not isinstance(spec, Mapping):
        raise FishertuneError(f"{where}: expected an object, got {type(spec).__name__}")
    for key in spec:
        if key in _HUB_KEYS:
            raise FishertuneError(
                f"{where}: key {key!r}: fishertune reads local file_name entries; pass a hub "
                "dataset's name as --dataset_name instead"
            )
        if key not in _ENTRY_KEYS:
            raise FishertuneError(
                f"{where}: unknown key {key!r} (fishertune reads: {', '.join(_ENTRY_KEYS)})"
            )
    if spec.get("ranking"):
        raise FishertuneError(f"{where}: key 'ranking': preference data, which SFT cannot train on")
    file_name = spec.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise FishertuneError(f"{where}: key 'file_name' is required (the data file)")
    path = (info.parent / file_name).expanduser()
    if not path.is_file():
        raise FishertuneError(f"{where}: key 'file_name': no such file {path}")
    formatting = spec.get("formatting", "alpaca")
    if formatting not in _COLUMNS:
        raise FishertuneError(
            f"{where}: key 'formatting': {formatting!r} (fishertune reads alpaca or sharegpt)"
        )
    columns = _mapping(spec, "columns", where)
    tags = _mapping(spec, "tags", where)
    ours: dict[str, str] = {}
    for key, column in columns.items():
        if key in _UNSUPPORTED_COLUMNS:
            raise FishertuneError(
                f"{where}: columns key {key!r}: {_UNSUPPORTED_COLUMNS[key]}, which fishertune "
                "does not train on"
            )
        if key not in _COLUMNS[formatting]:
            raise FishertuneError(
                f"{where}: unknown columns key {key!r} for {formatting} "
                f"(keys: {', '.join(_COLUMNS[formatting])})"
            )
        ours[_COLUMNS[formatting][key]] = column
    roles: dict[str, str] = {}
    if tags and formatting != "sharegpt":
        raise FishertuneError(f"{where}: key 'tags': tags apply to the sharegpt formatting only")
    if formatting == "sharegpt":
        for key in tags:
            if key not in _TAGS:
                raise FishertuneError(
                    f"{where}: unknown tags key {key!r} (keys: {', '.join(_TAGS)})"
                )
        value = {key: tags.get(key, default) for key, (default, _) in _TAGS.items()}
        ours["role"], ours["content"] = value["role_tag"], value["content_tag"]
        roles = {value[key]: role for key, (_, role) in _TAGS.items() if role is not None}
    return Entry(
        name=f"{info.parent}:{name}",
        path=path,
        info=info,
        data_format=formatting,
        columns=ours,
        roles=roles,
    )


def _mapping(spec: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise FishertuneError(f"{where}: key {key!r}: expected an object of names")
    return dict(value)
