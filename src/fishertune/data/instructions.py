"""IFEval-style instructions of the offline tasks: their ids, a checker per id, and the verdicts
on a response to a generated example (:func:`check_response`).

Instruction ids and their checks follow IFEval (``lm_eval.tasks.ifeval``): the rules are
re-implemented here because lm-eval's checkers import nltk data and ``langdetect``, which cannot be
fetched offline; the language test of the case rules is dropped (every answer is English or a
number). ``check_response`` gives IFEval's strict and loose verdicts. The examples that carry
these instructions are made by :mod:`fishertune.data.tasks`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from fishertune.errors import FishertuneError

__all__ = [
    "INSTRUCTION_CHECKERS",
    "check_response",
    "loose_variants",
    "reference_answer",
]

# IFEval instruction ids used here.
LOWERCASE = "change_case:english_lowercase"
CAPITAL = "change_case:english_capital"
QUOTATION = "startend:quotation"
END = "startend:end_checker"
KEYWORD = "keywords:existence"
NO_COMMA = "punctuation:no_comma"
BULLETS = "detectable_format:number_bullet_lists"
JSON_FORMAT = "detectable_format:json_format"
TITLE_FORMAT = "detectable_format:title"
POSTSCRIPT_ID = "detectable_content:postscript"


# --------------------------------------------------------------------------------------------
# Rule checkers (IFEval semantics, see the module docstring)


def _check_lowercase(value: str, kwargs: Mapping[str, Any]) -> bool:
    return value.islower()


def _check_capital(value: str, kwargs: Mapping[str, Any]) -> bool:
    return value.isupper()


def _check_quotation(value: str, kwargs: Mapping[str, Any]) -> bool:
    value = value.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def _check_end(value: str, kwargs: Mapping[str, Any]) -> bool:
    value = value.strip().strip('"').lower()
    return value.endswith(str(kwargs["end_phrase"]).strip().lower())


def _check_keywords(value: str, kwargs: Mapping[str, Any]) -> bool:
    return all(re.search(k, value, flags=re.IGNORECASE) for k in kwargs["keywords"])


def _check_no_comma(value: str, kwargs: Mapping[str, Any]) -> bool:
    return "," not in value


def _check_bullets(value: str, kwargs: Mapping[str, Any]) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", value, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", value, flags=re.MULTILINE)
    return len(stars) + len(dashes) == int(kwargs["num_bullets"])


def _check_json(value: str, kwargs: Mapping[str, Any]) -> bool:
    value = (
        value.strip()
        .removeprefix("```json")
        .removeprefix("```Json")
        .removeprefix("```JSON")
        .removeprefix("```")
        .removesuffix("```")
        .strip()
    )
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _check_title(value: str, kwargs: Mapping[str, Any]) -> bool:
    titles = re.findall(r"<<[^\n]+>>", value)
    return any(t.lstrip("<").rstrip(">").strip() for t in titles)


def _check_postscript(value: str, kwargs: Mapping[str, Any]) -> bool:
    marker = str(kwargs.get("postscript_marker") or "P.S.")
    if marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, value.lower(), flags=re.MULTILINE))


INSTRUCTION_CHECKERS: dict[str, Callable[[str, Mapping[str, Any]], bool]] = {
    LOWERCASE: _check_lowercase,
    CAPITAL: _check_capital,
    QUOTATION: _check_quotation,
    END: _check_end,
    KEYWORD: _check_keywords,
    NO_COMMA: _check_no_comma,
    BULLETS: _check_bullets,
    JSON_FORMAT: _check_json,
    TITLE_FORMAT: _check_title,
    POSTSCRIPT_ID: _check_postscript,
}


def loose_variants(response: str) -> list[str]:
    """The eight variants of a response that IFEval's loose accuracy tries.

    The response itself, without its first line, without its last line, without both, and each of
    these with every ``*`` removed (markdown emphasis); as in ``lm_eval.tasks.ifeval.utils``.
    """
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    variants = [response, remove_first, remove_last, remove_both]
    starless = [v.replace("*", "") for v in variants]
    # lm-eval's order: response, starless response, then the line-stripped ones and their starless.
    return [variants[0], starless[0], *variants[1:], *starless[1:]]


def _follows(instruction: Mapping[str, Any], response: str) -> bool:
    name = instruction["id"]
    if name not in INSTRUCTION_CHECKERS:
        known = ", ".join(sorted(INSTRUCTION_CHECKERS))
        raise FishertuneError(f"unknown instruction id {name!r} in 'check' (known: {known})")
    # Arrow fills the keys an instruction does not use with None; drop them as lm-eval does.
    kwargs = {k: v for k, v in (instruction.get("kwargs") or {}).items() if v is not None}
    return INSTRUCTION_CHECKERS[name](response, kwargs)


def reference_answer(example: Mapping[str, Any]) -> str:
    """The reference answer of an example: the content of its last assistant message."""
    for message in reversed(example["messages"]):
        if message["role"] == "assistant":
            return message["content"]
    raise FishertuneError("example has no assistant message to take the reference answer from")


def check_response(example: Mapping[str, Any], response: str) -> dict[str, bool]:
    """Score one response to the final user turn of an example.

    Args:
        example: a generated example (``messages`` and, optionally, ``check``).
        response: the model's reply to ``messages`` up to the last assistant turn.

    Returns:
        ``exact_match``: the stripped response equals the stripped reference answer. For examples
        with instructions (``check.instructions`` non-empty) also ``strict`` (every instruction
        followed by the non-empty response) and ``loose`` (every instruction followed by at least
        one of the IFEval loose variants of the response, see ``loose_variants``).
    """
    result = {"exact_match": response.strip() == reference_answer(example).strip()}
    instructions = list((example.get("check") or {}).get("instructions") or [])
    if instructions:
        result["strict"] = bool(response.strip()) and all(
            _follows(inst, response) for inst in instructions
        )
        variants = [v for v in loose_variants(response) if v.strip()]
        result["loose"] = all(any(_follows(inst, v) for v in variants) for inst in instructions)
    return result
