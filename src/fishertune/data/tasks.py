"""Offline generator of small, verifiable instruction-following conversations.

Each example is a conversation in the Tulu 3 format with a rule the final answer can be checked
against, so a tiny model trained for a minute on a CPU can be scored without a judge model::

    {"messages": [{"role": "user", "content": "What is 3 + 4? Answer in JSON format."},
                  {"role": "assistant", "content": "{\\"answer\\": 7}"}],
     "source": "format",
     "check": {"instructions": [{"id": "detectable_format:json_format", ...}]}}

Families (the ``source`` of an example):

* ``arithmetic``: addition, subtraction, multiplication of small integers; the answer is a number.
* ``string``: reverse, sort, count, upper-case, pick or list words; short deterministic answers.
* ``format``: an ``arithmetic`` or ``string`` question plus one or two IFEval-style formatting
  instructions (lowercase, capitals, quotes, end phrase, keyword, no commas, bullet points, JSON,
  title, postscript); the answer applies them to the plain answer.
* ``multi_turn``: two user turns, the second building on the first answer (add to it, reverse it,
  count it, put it in quotes...).

The instructions' ids and their checks are :mod:`fishertune.data.instructions`.

Everything is drawn from a ``random.Random`` seeded per split, so the same arguments always give
the same files. Splits are generated test first, then validation, then train, and an example whose
user turns already appeared in an earlier split is drawn again: no prompt is shared across splits,
and the evaluation splits do not change when the training split grows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fishertune.data.instructions import (
    BULLETS,
    CAPITAL,
    END,
    JSON_FORMAT,
    KEYWORD,
    LOWERCASE,
    NO_COMMA,
    POSTSCRIPT_ID,
    QUOTATION,
    TITLE_FORMAT,
)
from fishertune.errors import FishertuneError

__all__ = [
    "FAMILIES",
    "SPLITS",
    "TASKS_VERSION",
    "generate_examples",
    "generate_splits",
    "write_tiny_tasks",
]

# Bump whenever the generated text changes: the cache of ``builtin:tiny-tasks`` is keyed by it,
# and the shipped tokenizer was trained on this text.
TASKS_VERSION = "1"

FAMILIES: tuple[str, ...] = ("arithmetic", "string", "format", "multi_turn")
FAMILY_WEIGHTS: tuple[float, ...] = (0.25, 0.25, 0.35, 0.15)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Generation order: evaluation splits first, so they stay fixed when the training split grows.
_SPLIT_ORDER: tuple[str, ...] = ("test", "validation", "train")

# Short common words (3-6 letters, no keyword below is a substring of any of them or of their
# reversals), so that every answer is a handful of tokens with the tiny tokenizer.
WORDS: tuple[str, ...] = (
    "apple", "bird", "blue", "boat", "book", "bread", "cake", "camp", "cat", "chair",
    "cloud", "coat", "corn", "cow", "cup", "desk", "dog", "door", "duck", "egg",
    "farm", "fish", "flag", "frog", "game", "gift", "girl", "goat", "gold", "grape",
    "green", "hand", "hat", "hill", "horse", "house", "ink", "jam", "kite", "lake",
    "lamp", "leaf", "lemon", "lion", "map", "milk", "moon", "mouse", "nest", "night",
    "nose", "oak", "owl", "page", "park", "pear", "pen", "pig", "plum", "pond",
    "rain", "red", "ring", "river", "road", "rock", "rose", "salt", "sand", "ship",
    "shoe", "sky", "snow", "sock", "star", "stone", "sun", "table", "tea", "tiger",
    "toy", "train", "tree", "wall", "whale", "wind", "wolf", "wood", "yard", "zebra",
)  # fmt: skip
KEYWORDS: tuple[str, ...] = ("result", "indeed", "solved", "output", "simple")
END_PHRASES: tuple[str, ...] = ("That is all.", "Hope this helps.", "Any other questions?")
SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a concise assistant.",
    "Answer briefly.",
)
TITLE = "answer"
POSTSCRIPT = "P.S. Done."

# Every instruction carries every keyword argument (None when unused) so that the rows of a JSONL
# file share one Arrow schema when ``datasets`` loads them.
_KWARG_KEYS: tuple[str, ...] = ("end_phrase", "keywords", "num_bullets", "postscript_marker")


# --------------------------------------------------------------------------------------------
# Base questions


@dataclass(frozen=True)
class _Base:
    """A question with a plain answer: a number, a text, or a list of words."""

    prompt: str
    answer: int | str | tuple[str, ...]

    @property
    def kind(self) -> str:
        if isinstance(self.answer, int):
            return "number"
        return "list" if isinstance(self.answer, tuple) else "text"

    def render(self) -> str:
        if isinstance(self.answer, tuple):
            return ", ".join(self.answer)
        return str(self.answer)


_ARITHMETIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("What is {a} + {b}?", "Add {a} and {b}.", "What is {a} plus {b}?"),
    "sub": ("What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?"),
    "mul": ("What is {a} * {b}?", "Multiply {a} by {b}.", "What is {a} times {b}?"),
}


def _arithmetic(rng: random.Random) -> _Base:
    op = rng.choice(("add", "sub", "mul"))
    if op == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        value = a + b
    elif op == "sub":
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        value = a - b
    else:
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        value = a * b
    return _Base(rng.choice(_ARITHMETIC_TEMPLATES[op]).format(a=a, b=b), value)


def _phrase(rng: random.Random, n: int) -> tuple[str, ...]:
    return tuple(rng.sample(WORDS, n))


def _string(rng: random.Random, *, allow_case_change: bool = True) -> _Base:
    ops = [
        "reverse", "sort_letters", "sort_words", "count_letters", "count_char",
        "first_word", "last_word", "repeat", "list_words",
    ]  # fmt: skip
    if allow_case_change:
        ops.append("upper")
    op = rng.choice(ops)
    word = rng.choice(WORDS)
    if op == "reverse":
        return _Base(f"Reverse the letters of the word '{word}'.", word[::-1])
    if op == "sort_letters":
        return _Base(f"Sort the letters of '{word}' in alphabetical order.", "".join(sorted(word)))
    if op == "sort_words":
        words = _phrase(rng, rng.randint(3, 4))
        return _Base(f"Sort these words alphabetically: {', '.join(words)}.", tuple(sorted(words)))
    if op == "count_letters":
        return _Base(f"How many letters are in the word '{word}'?", len(word))
    if op == "count_char":
        # Mostly a letter of the word, sometimes one it lacks (answer 0).
        pool = word if rng.random() < 0.8 else "abcdefghijklmnopqrstuvwxyz"
        letter = rng.choice(pool)
        return _Base(
            f"How many times does the letter '{letter}' appear in '{word}'?", word.count(letter)
        )
    if op in ("first_word", "last_word"):
        words = _phrase(rng, rng.randint(3, 4))
        which = "first" if op == "first_word" else "last"
        answer = words[0] if which == "first" else words[-1]
        return _Base(f"What is the {which} word of '{' '.join(words)}'?", answer)
    if op == "repeat":
        n = rng.randint(2, 4)
        return _Base(f"Repeat the word '{word}' {n} times.", (word,) * n)
    if op == "list_words":
        words = _phrase(rng, rng.randint(2, 4))
        return _Base(f"List the words in '{' '.join(words)}'.", words)
    phrase = " ".join(_phrase(rng, rng.randint(1, 2)))
    return _Base(f"Write '{phrase}' in capital letters.", phrase.upper())


# --------------------------------------------------------------------------------------------
# Instructions: (id, prompt text, kwargs) and how the answer changes to follow them


def _instruction(name: str, **kwargs: Any) -> dict[str, Any]:
    return {"id": name, "kwargs": {key: kwargs.get(key) for key in _KWARG_KEYS}}


_INSTRUCTION_TEXT: dict[str, str] = {
    LOWERCASE: "Answer in all lowercase letters.",
    CAPITAL: "Answer in all capital letters.",
    QUOTATION: "Wrap your entire response in double quotation marks.",
    END: "End your response with this exact phrase: {end_phrase}",
    KEYWORD: "Include the keyword '{keyword}' in your response.",
    NO_COMMA: "Do not use any commas in your response.",
    BULLETS: "Answer with exactly {num_bullets} bullet points using '* '.",
    JSON_FORMAT: "Answer in JSON format.",
    TITLE_FORMAT: "Include a title wrapped in double angular brackets, such as <<title>>.",
    POSTSCRIPT_ID: "Add a postscript starting with P.S. at the end.",
}
_CASE = (LOWERCASE, CAPITAL)


def _instruction_prompt(inst: Mapping[str, Any]) -> str:
    kwargs = inst["kwargs"]
    keyword = (kwargs.get("keywords") or [""])[0]
    return _INSTRUCTION_TEXT[inst["id"]].format(
        end_phrase=kwargs.get("end_phrase"), keyword=keyword, num_bullets=kwargs.get("num_bullets")
    )


def _apply(base: _Base, instructions: Sequence[Mapping[str, Any]]) -> str:
    """The answer to ``base`` following ``instructions``, applied in a fixed compatible order."""
    ids = {inst["id"]: inst["kwargs"] for inst in instructions}
    if JSON_FORMAT in ids:
        value = list(base.answer) if isinstance(base.answer, tuple) else base.answer
        return json.dumps({"answer": value})
    if isinstance(base.answer, tuple) and BULLETS in ids:
        text = "\n".join(f"* {item}" for item in base.answer)
    elif isinstance(base.answer, tuple) and NO_COMMA in ids:
        text = " ".join(base.answer)
    else:
        text = base.render()
    if KEYWORD in ids:
        text = f"{ids[KEYWORD]['keywords'][0].capitalize()}: {text}"
    if TITLE_FORMAT in ids:
        text = f"<<{TITLE}>>\n{text}"
    if POSTSCRIPT_ID in ids:
        text = f"{text}\n{POSTSCRIPT}"
    if END in ids:
        text = f"{text} {ids[END]['end_phrase']}"
    if LOWERCASE in ids:
        text = text.lower()
    if CAPITAL in ids:
        text = text.upper()
    if QUOTATION in ids:
        text = f'"{text}"'
    return text


def _pick_instruction(rng: random.Random, base: _Base) -> dict[str, Any]:
    names = [QUOTATION, END, KEYWORD, JSON_FORMAT, TITLE_FORMAT, POSTSCRIPT_ID]
    if base.kind != "number":
        names += [LOWERCASE, CAPITAL]
    if base.kind == "list":
        # Weighted up: only list answers can show these two.
        names += [NO_COMMA, BULLETS, NO_COMMA, BULLETS]
    name = rng.choice(names)
    if name == END:
        return _instruction(END, end_phrase=rng.choice(END_PHRASES))
    if name == KEYWORD:
        return _instruction(KEYWORD, keywords=[rng.choice(KEYWORDS)])
    if name == BULLETS:
        assert isinstance(base.answer, tuple)
        return _instruction(BULLETS, num_bullets=len(base.answer))
    if name == POSTSCRIPT_ID:
        return _instruction(POSTSCRIPT_ID, postscript_marker="P.S.")
    return _instruction(name)


def _format(rng: random.Random) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    base = _arithmetic(rng) if rng.random() < 0.3 else _string(rng, allow_case_change=False)
    instructions = [_pick_instruction(rng, base)]
    first = instructions[0]["id"]
    if first not in (*_CASE, JSON_FORMAT) and rng.random() < 0.3:
        case = _instruction(rng.choice(_CASE))
        # A case rule only makes sense when the answer has letters to change.
        if any(c.isalpha() for c in _apply(base, instructions)):
            instructions.append(case)
    prompt = " ".join([base.prompt, *(_instruction_prompt(i) for i in instructions)])
    return [prompt], [_apply(base, instructions)], instructions


def _multi_turn(rng: random.Random) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    base = _arithmetic(rng) if rng.random() < 0.5 else _string(rng)
    first = base.render()
    instructions: list[dict[str, Any]] = []
    if isinstance(base.answer, int):
        value = base.answer
        op = rng.choice(("add", "mul", "sub", "parity", "quote"))
        if op == "add":
            k = rng.randint(1, 10)
            follow, answer = f"Now add {k} to that.", str(value + k)
        elif op == "mul":
            k = rng.randint(2, 5)
            follow, answer = f"Now multiply that by {k}.", str(value * k)
        elif op == "sub" and value > 0:
            k = rng.randint(1, value)
            follow, answer = f"Now subtract {k} from that.", str(value - k)
        elif op == "parity":
            follow, answer = "Is that number even or odd?", "even" if value % 2 == 0 else "odd"
        else:
            instructions = [_instruction(QUOTATION)]
            follow, answer = "Now wrap that answer in double quotation marks.", f'"{value}"'
    elif isinstance(base.answer, tuple):
        items = base.answer
        op = rng.choice(("count", "last", "bullets", "no_comma"))
        if op == "count":
            follow, answer = "How many items is that?", str(len(items))
        elif op == "last":
            follow, answer = "Which one comes last?", items[-1]
        elif op == "bullets":
            instructions = [_instruction(BULLETS, num_bullets=len(items))]
            follow = f"Now give them as exactly {len(items)} bullet points using '* '."
            answer = "\n".join(f"* {item}" for item in items)
        else:
            instructions = [_instruction(NO_COMMA)]
            follow, answer = "Now write them again without any commas.", " ".join(items)
    else:
        text = base.answer
        op = rng.choice(("upper", "reverse", "length", "quote"))
        if op == "upper" and text != text.upper():
            instructions = [_instruction(CAPITAL)]
            follow, answer = "Now write it in all capital letters.", text.upper()
        elif op == "reverse":
            follow, answer = "Now reverse it.", text[::-1]
        elif op == "length":
            follow, answer = "How many characters does it have?", str(len(text))
        else:
            instructions = [_instruction(QUOTATION)]
            follow, answer = "Now wrap it in double quotation marks.", f'"{text}"'
    return [base.prompt, follow], [first, answer], instructions


def _single(rng: random.Random, family: str) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    base = _arithmetic(rng) if family == "arithmetic" else _string(rng)
    return [base.prompt], [base.render()], []


_GENERATORS: dict[str, Callable[[random.Random], tuple[list[str], list[str], list[Any]]]] = {
    "arithmetic": lambda rng: _single(rng, "arithmetic"),
    "string": lambda rng: _single(rng, "string"),
    "format": _format,
    "multi_turn": _multi_turn,
}


def _example(rng: random.Random) -> dict[str, Any]:
    family = rng.choices(FAMILIES, weights=FAMILY_WEIGHTS)[0]
    users, answers, instructions = _GENERATORS[family](rng)
    messages: list[dict[str, str]] = []
    if rng.random() < 0.1:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for user, answer in zip(users, answers, strict=True):
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "source": family, "check": {"instructions": instructions}}


def _prompt_key(example: Mapping[str, Any]) -> tuple[str, ...]:
    # The user turns identify a prompt; a system prompt alone does not make a new one.
    return tuple(m["content"] for m in example["messages"] if m["role"] == "user")


def generate_examples(
    n: int, *, seed: int, split: str = "train", exclude: set[tuple[str, ...]] | None = None
) -> list[dict[str, Any]]:
    """Draw ``n`` distinct examples for one split.

    Args:
        n: number of examples.
        seed: base seed; each split draws from its own stream ``Random(f"{seed}:{split}")``.
        split: split name (selects the stream).
        exclude: prompt keys (tuples of user turns) to avoid; the keys drawn here are added to it.

    Returns:
        A list of example dicts (``messages``, ``source``, ``check``).
    """
    if n < 0:
        raise FishertuneError(f"number of examples must be >= 0, got {n}")
    rng = random.Random(f"{seed}:{split}")
    seen = exclude if exclude is not None else set()
    examples: list[dict[str, Any]] = []
    misses = 0
    while len(examples) < n:
        example = _example(rng)
        key = _prompt_key(example)
        if key in seen:
            misses += 1
            if misses > 1000 + 10 * n:
                raise FishertuneError(
                    f"cannot draw {n} distinct prompts for split {split!r}: the task space is "
                    f"exhausted after {len(examples)}; ask for fewer examples"
                )
            continue
        seen.add(key)
        examples.append(example)
    return examples


def generate_splits(
    *, train: int = 2000, validation: int = 200, test: int = 200, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Generate the three splits with no prompt shared between (or within) them."""
    sizes = {"train": train, "validation": validation, "test": test}
    seen: set[tuple[str, ...]] = set()
    out = {split: generate_examples(sizes[split], seed=seed, split=split, exclude=seen)
           for split in _SPLIT_ORDER}  # fmt: skip
    return {split: out[split] for split in SPLITS}


def write_tiny_tasks(
    out_dir: str | Path, *, train: int = 2000, validation: int = 200, test: int = 200, seed: int = 0
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` under ``out_dir``.

    Returns:
        Split name -> path of the written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, examples in generate_splits(
        train=train, validation=validation, test=test, seed=seed
    ).items():
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for example in examples:
                f.write(json.dumps(example, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths
