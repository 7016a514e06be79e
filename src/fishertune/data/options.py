"""How rows are read: the data formats, default column and role names, the drop reasons, and
:class:`DataOptions` (the same options on every entry point, and their command-line form)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fishertune.errors import FishertuneError

__all__ = [
    "DATA_FORMATS",
    "DEFAULT_COLUMNS",
    "DEFAULT_ROLES",
    "DROP_REASONS",
    "HELP",
    "LLAMA_FACTORY_COLUMNS",
    "DataOptions",
    "add_data_arguments",
]

DATA_FORMATS: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")

# Source role name -> canonical role. Covers the common ShareGPT dumps (Vicuna's, ShareGPT V3,
# LLaMA-Factory's and axolotl's defaults); extended or overridden by DataOptions.roles.
DEFAULT_ROLES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}

# Every reason a row can be dropped for, with what it means (the report and README list them).
DROP_REASONS: dict[str, str] = {
    "bad_field": "a field is missing or has the wrong type",
    "no_turns": "the conversation has no turns",
    "empty_turn": "a turn (or the text) is empty or only whitespace",
    "unknown_role": "a turn's role maps to none of system, user, assistant",
    "not_alternating": "user and assistant turns do not alternate (or a system turn is not first)",
    "no_assistant_turn": "no assistant turn (after dropping a leading one)",
    "invalid_text": "a string holds a lone surrogate escape (\\ud83d without its pair): not text",
    "too_long": "longer than max_length tokens (only with drop_too_long)",
    "no_label_after_truncation": "no scored token left after truncation to max_length",
}

# Default column (field) names; DataOptions.columns overrides any of them.
DEFAULT_COLUMNS: dict[str, str] = {
    "messages": "messages",  # messages format: the turn list
    "conversations": "conversations",  # sharegpt format: the turn list
    "role": "role",  # key of a turn's role ("from" in ShareGPT, tried when "role" is absent)
    "content": "content",  # key of a turn's text ("value" in ShareGPT, likewise)
    "instruction": "instruction",  # alpaca
    "input": "input",
    "output": "output",
    "system": "system",  # alpaca, and a system prompt beside a turn list (LLaMA-Factory's)
    "history": "history",
    "tools": "tools",  # tool descriptions beside a turn list: kept as the row's "tools"
    "prompt": "prompt",  # prompt_completion
    "completion": "completion",
    "text": "text",  # text
}

# LLaMA-Factory's Alpaca column keys (its dataset_info "columns"), accepted as data_columns keys
LLAMA_FACTORY_COLUMNS: dict[str, str] = {"query": "input", "response": "output"}


def _parse_pairs(value: Any, what: str) -> dict[str, str]:
    """``"a=b,c=d"`` (or a mapping) as a dict of strings."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    pairs = {}
    for item in str(value).split(","):
        key, sep, val = item.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise FishertuneError(f"{what}: expected NAME=VALUE,... got {item.strip()!r}")
        pairs[key.strip()] = val.strip()
    return pairs


@dataclass(frozen=True)
class DataOptions:
    """How rows are read (the same options on every entry point).

    Attributes:
        data_format: ``auto`` (detect from the fields) or one of :data:`DATA_FORMATS`.
        columns: overrides of :data:`DEFAULT_COLUMNS`, e.g. ``{"conversations": "turns",
            "role": "speaker"}`` (LLaMA-Factory's ``dataset_info`` ``columns``/``tags``).
        roles: source role -> ``system`` / ``user`` / ``assistant``, merged over
            :data:`DEFAULT_ROLES`.
        on_bad_rows: ``drop`` (count by reason) or ``error`` (the first one is an error).
        keep_truncated: a ``.json`` or ``.jsonl`` file cut off inside its last record keeps
            its complete records instead of being an error.
    """

    data_format: str = "auto"
    columns: Mapping[str, str] = field(default_factory=dict)
    roles: Mapping[str, str] = field(default_factory=dict)
    on_bad_rows: str = "drop"
    keep_truncated: bool = False

    def __post_init__(self) -> None:
        if self.data_format not in ("auto", *DATA_FORMATS):
            raise FishertuneError(
                f"data_format must be auto or one of {', '.join(DATA_FORMATS)}, "
                f"got {self.data_format!r}"
            )
        if self.on_bad_rows not in ("drop", "error"):
            raise FishertuneError(f"on_bad_rows must be drop or error, got {self.on_bad_rows!r}")
        columns = _parse_pairs(self.columns, "data_columns")
        if set(LLAMA_FACTORY_COLUMNS) & set(columns):
            # beside query/response, prompt is LLaMA-Factory's (the instruction column), not the
            # prompt of prompt/completion rows
            if "prompt" in columns:
                columns.setdefault("instruction", columns.pop("prompt"))
            for theirs, ours in LLAMA_FACTORY_COLUMNS.items():
                if theirs in columns:
                    columns.setdefault(ours, columns.pop(theirs))
        unknown = sorted(set(columns) - set(DEFAULT_COLUMNS))
        if unknown:
            keys = ", ".join([*DEFAULT_COLUMNS, *LLAMA_FACTORY_COLUMNS])
            raise FishertuneError(f"data_columns: unknown key {unknown[0]!r} (keys: {keys})")
        roles = _parse_pairs(self.roles, "data_roles")
        for name, role in roles.items():
            if role not in ("system", "user", "assistant"):
                raise FishertuneError(
                    f"data_roles: {name}={role}: a role maps to system, user or assistant"
                )
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "roles", roles)

    @classmethod
    def from_args(cls, args: Any) -> DataOptions:
        """From an object with ``data_format``, ``data_columns``, ``data_roles``,
        ``on_bad_rows``, ``keep_truncated_records`` attributes (CLI namespaces); absent ones
        take the defaults."""
        return cls(
            data_format=getattr(args, "data_format", None) or "auto",
            columns=getattr(args, "data_columns", None) or {},
            roles=getattr(args, "data_roles", None) or {},
            on_bad_rows=getattr(args, "on_bad_rows", None) or "drop",
            keep_truncated=bool(getattr(args, "keep_truncated_records", False)),
        )

    def under(self, entry: Any) -> DataOptions:
        """These options over a ``dataset_info.json`` entry's (:mod:`.dataset_info`): the
        entry's format and mappings, with what these options set explicitly winning."""
        return DataOptions(
            data_format=entry.data_format if self.data_format == "auto" else self.data_format,
            columns={**entry.columns, **self.columns},
            roles={**entry.roles, **self.roles},
            on_bad_rows=self.on_bad_rows,
            keep_truncated=self.keep_truncated,
        )

    def column(self, key: str) -> str:
        return self.columns.get(key, DEFAULT_COLUMNS[key])

    def role_map(self) -> dict[str, str]:
        return {**DEFAULT_ROLES, **self.roles}

    def key(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, sort_keys=True)


def add_data_arguments(add: Any) -> None:
    """The data options of :class:`DataOptions` as ``argparse`` arguments (``add`` is a parser's
    or group's ``add_argument``); ``fishertune train`` has the same as dataclass fields."""
    add("--data_format", default="auto", choices=("auto", *DATA_FORMATS), help=HELP["data_format"])
    add("--data_columns", default=None, help=HELP["data_columns"])
    add("--data_roles", default=None, help=HELP["data_roles"])
    add("--on_bad_rows", default="drop", choices=("drop", "error"), help=HELP["on_bad_rows"])
    add(
        "--keep_truncated_records",
        action="store_true",
        help=HELP["keep_truncated_records"],
    )


HELP: dict[str, str] = {
    "data_format": "Data format: auto (detected from the fields), " + ", ".join(DATA_FORMATS) + ".",
    "data_columns": "Field names, e.g. conversations=turns,role=speaker,content=text "
    f"(keys: {', '.join(DEFAULT_COLUMNS)}; LLaMA-Factory's prompt,query,response for Alpaca).",
    "data_roles": "Role names, e.g. bot=assistant,person=user (merged over the defaults: "
    + ", ".join(f"{k}={v}" for k, v in DEFAULT_ROLES.items())
    + ").",
    "on_bad_rows": "drop: drop unusable rows and count them by reason (default); error: the "
    "first one is an error naming file, row and field.",
    "keep_truncated_records": "A .json or .jsonl file cut off inside its last record keeps its "
    "complete records (default: an error).",
}
