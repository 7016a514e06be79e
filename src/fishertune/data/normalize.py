"""Format detection and normalization: a source record as a canonical row, or a drop reason.

Chat formats (``messages``, ``sharegpt``, ``alpaca``, ``prompt_completion`` with message lists)
become ``{"messages": [{"role", "content"}, ...]}`` with roles ``system`` (first turn only),
``user`` and ``assistant`` alternating; ``text`` and ``prompt_completion`` with strings become
``{"prompt": str, "completion": str}`` (``prompt`` is ``""`` for text). Other fields of the
record are kept as they are (``source``, ``id``, ...).

ShareGPT conversations that start with the assistant follow FastChat's Vicuna rule
(``fastchat/train/train.py``, ``preprocess``: "Skip the first one if it is not from human"): the
leading assistant turn is dropped and the rest kept; the row is dropped only if nothing usable
remains. Roles that do not alternate are a drop reason (FastChat asserts on them).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from fishertune.data.options import DataOptions
from fishertune.errors import FishertuneError

__all__ = [
    "BadRowError",
    "check_unicode",
    "detect_format",
    "normalize_record",
    "tools_warning",
    "unused_parts",
    "unused_warnings",
]


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


class BadRowError(Exception):
    """A row that cannot be used: ``reason`` (a key of DROP_REASONS) and the field at fault."""

    def __init__(self, reason: str, field_name: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.field_name, self.message = reason, field_name, message


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(value: Any, where: str = "") -> None:
    """Refuse a lone UTF-16 surrogate anywhere in a record: JSON's ``\\ud83d`` escape decodes
    to one (scraped chat dumps cut emoji in half), and no UTF-8 file or tokenizer can take it."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found:
            raise BadRowError(
                "invalid_text",
                where or "row",
                f"a lone surrogate \\u{ord(found.group()):04x} (an escape without its pair)",
            )
    elif isinstance(value, Mapping):
        for key, item in value.items():
            # the field's name goes into a message: printable even if the key is the bad text
            shown = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
            here = f"{where}.{shown}" if where else shown
            check_unicode(key, here)
            check_unicode(item, here)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_unicode(item, f"{where}[{i}]")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BadRowError("bad_field", where, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRowError("empty_turn", where, "empty")
    return value


def _turns(
    turns: Any, where: str, options: DataOptions, *, role_key: str, content_key: str
) -> list[dict[str, str]]:
    """Turns as canonical ``{"role", "content"}`` dicts; ``role_key``/``content_key`` tried
    first, ShareGPT's ``from``/``value`` (or ``role``/``content``) when they are absent."""
    if turns is None or (isinstance(turns, list) and not turns):
        raise BadRowError("no_turns", where, "no turns")
    if not isinstance(turns, list):
        raise BadRowError(
            "bad_field", where, f"expected a list of turns, got {type(turns).__name__}"
        )
    roles = options.role_map()
    out = []
    for i, turn in enumerate(turns):
        here = f"{where}[{i}]"
        if not isinstance(turn, Mapping):
            raise BadRowError("bad_field", here, f"expected an object, got {type(turn).__name__}")
        rk = next((k for k in (role_key, "role", "from") if k in turn), role_key)
        ck = next((k for k in (content_key, "content", "value") if k in turn), content_key)
        if rk not in turn or ck not in turn:
            raise BadRowError(
                "bad_field", here, f"expected fields {role_key!r} and {content_key!r}"
            )
        name = turn[rk]
        if not isinstance(name, str) or name not in roles:
            raise BadRowError(
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
            raise BadRowError(
                "not_alternating",
                f"{where}[{i + start}]",
                f"role {message['role']!r} where {expected!r} was expected",
            )
    if not any(m["role"] == "assistant" for m in body):
        raise BadRowError("no_assistant_turn", where, "no assistant turn")
    return messages


def _get(record: Mapping[str, Any], name: str, *, required: bool = True) -> Any:
    if name not in record or record[name] is None:
        if required:
            raise BadRowError("bad_field", name, "missing")
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
        BadRowError: the row cannot be used (reason, field, message).
    """
    if not isinstance(record, Mapping):
        raise BadRowError("bad_field", "row", f"expected an object, got {type(record).__name__}")
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
            raise BadRowError("bad_field", history, "expected a list of [user, assistant] pairs")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise BadRowError(
                    "bad_field", f"{history}[{i}]", "expected a [user, assistant] pair"
                )
            messages.append({"role": "user", "content": _text(pair[0], f"{history}[{i}][0]")})
            messages.append({"role": "assistant", "content": _text(pair[1], f"{history}[{i}][1]")})
        user = _text(_get(record, instruction), instruction)
        extra = _get(record, inp, required=False)
        if extra is not None and not isinstance(extra, str):
            raise BadRowError("bad_field", inp, f"expected a string, got {type(extra).__name__}")
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
                raise BadRowError(
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


def unused_parts(record: Mapping[str, Any], fmt: str, options: DataOptions) -> set[str]:
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


def unused_warnings(counts: Mapping[str, int], kept: int) -> list[str]:
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


def tools_warning(rows_with_tools: int, kept: int) -> list[str]:
    """The chat template is not given the rows' tool descriptions: tool calls are learned
    without the tools they call."""
    if not rows_with_tools:
        return []
    return [
        f"{rows_with_tools} of {kept} rows have tool descriptions (field 'tools'), which are not "
        "rendered by the chat template"
    ]
