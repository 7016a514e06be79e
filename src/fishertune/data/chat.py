"""Chat datasets: loading and validation, chat templates, assistant-only tokenization, subsets.

The data format is Tulu 3's: one conversation per row, ``messages`` a list of
``{"role": "system" | "user" | "assistant", "content": str}`` with at least one assistant turn, and
optionally a ``source`` naming the subset it comes from (used for stratified samples).

Assistant-only labels are computed from the chat template itself, for any template, without
``{% generation %}`` markers (most templates lack them): the conversation is rendered up to just
before and just after each assistant message, the characters in between are that message's span
(its content and end-of-turn token), and the tokens of the full rendering that cover a span are
marked. This is open-instruct's ``sft_tulu_tokenize_and_truncate`` done with character offsets
instead of token counts of the rendered prefixes, so it stays exact where a token would straddle a
turn boundary.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fishertune.data.builtin import BUILTIN_TINY_TASKS, tiny_tasks_dir
from fishertune.data.options import DataOptions
from fishertune.data.prepare import check_source, prepare_rows, record_drops
from fishertune.data.tokenizer import TULU_CHAT_TEMPLATE, ensure_chat_template
from fishertune.errors import FishertuneError

__all__ = [
    "ALLOWED_ROLES",
    "BUILTIN_TINY_TASKS",
    "TULU_CHAT_TEMPLATE",
    "assistant_spans",
    "check_conversations",
    "ensure_chat_template",
    "load_conversations",
    "stratified_subsample",
    "tiny_tasks_dir",
    "tokenize_conversation",
    "tokenize_dataset",
    "tokenize_row",
    "tokenize_text",
    "validate_messages",
]

logger = logging.getLogger(__name__)

ALLOWED_ROLES: tuple[str, ...] = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------------
# Validation


def validate_messages(row: Any, where: str) -> None:
    """Check that one row is a conversation in the Tulu 3 format.

    Args:
        row: the row (a mapping with a ``messages`` field).
        where: how to name the row in an error, e.g. ``"data.jsonl line 7"``.

    Raises:
        FishertuneError: one line naming ``where`` and the field at fault.
    """
    if not isinstance(row, Mapping):
        raise FishertuneError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" not in row or row["messages"] is None:
        raise FishertuneError(f"{where}: missing field 'messages'")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise FishertuneError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"
        )
    has_assistant = False
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise FishertuneError(
                f"{where}: messages[{i}] must be an object with 'role' and 'content'"
            )
        role, content = message["role"], message["content"]
        if role not in ALLOWED_ROLES:
            raise FishertuneError(
                f"{where}: messages[{i}] has unknown role {role!r} "
                f"(allowed: {', '.join(ALLOWED_ROLES)})"
            )
        if not isinstance(content, str):
            raise FishertuneError(
                f"{where}: messages[{i}].content must be a string, got {type(content).__name__}"
            )
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        raise FishertuneError(f"{where}: 'messages' has no assistant turn")


# --------------------------------------------------------------------------------------------
# Loading


def load_conversations(
    source: str,
    split: str = "train",
    options: DataOptions | None = None,
    *,
    reports: list[dict[str, Any]] | None = None,
) -> Any:
    """Load rows through the one reader (:mod:`fishertune.data.prepare`) as a ``datasets.Dataset``.

    Args:
        source: one of

            * ``builtin:tiny-tasks``: the offline tasks (generated once into a cache, see
              ``tiny_tasks_dir``), split ``train``, ``validation`` or ``test``;
            * a local ``.jsonl``, ``.json`` (an array, read as a stream; one object;
              ``{field: [rows]}``; JSON Lines) or ``.parquet`` file: the whole file, whatever
              ``split`` says;
            * a local folder: ``<split>.jsonl`` / ``.json`` / ``.parquet`` in it, or else whatever
              ``datasets.load_dataset(folder, split=split)`` finds;
            * otherwise a dataset on the Hugging Face hub, e.g.
              ``allenai/tulu-3-sft-olmo-2-mixture-0225``.

            Rows may be ``messages``, ShareGPT, Alpaca, prompt/completion or text rows (detected
            from the fields, or ``options.data_format``).
        split: split name.
        options: formats, column and role mappings, the bad-row policy (default: detect, drop
            and count).
        reports: if given, the reader's report (rows read, kept, dropped by reason) is appended.

    Returns:
        Chat rows: ``messages`` (canonical roles, alternating); text and string prompt/completion
        rows: ``prompt`` and ``completion`` (``prompt`` empty for text). Other fields are kept.

    Raises:
        FishertuneError: missing file, malformed JSON (with the line number), a file cut off
            inside its last record, no usable row, a hub dataset that cannot be loaded, or with
            ``on_bad_rows="error"`` the first bad row (file, row and field).
    """
    prepared = prepare_rows(source, split, options)
    if reports is not None:
        reports.append(prepared.report)
    return prepared.load()


def check_conversations(
    source: str, split: str = "train", options: DataOptions | None = None
) -> None:
    """Check a data source as :func:`load_conversations` reads it: a local file (or a folder's
    ``<split>`` file) is read through the reader and the policy (the result is cached, so the
    load that follows reads nothing again); a built-in name and split are checked; a hub name is
    not contacted.

    Raises:
        FishertuneError: as :func:`load_conversations`.
    """
    check_source(source, split, options)


# --------------------------------------------------------------------------------------------
# Assistant-only tokenization (the chat templates are fishertune.data.tokenizer's)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation
    )


def assistant_spans(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]]
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the characters each assistant message adds.

    For the ``i``-th message (an assistant one) the span starts where the rendering of
    ``messages[:i]`` with the generation prompt ends (so the assistant header is not in it) and
    ends where the rendering of ``messages[:i+1]`` ends (so the end-of-turn token is in it).

    Returns:
        ``(text, spans)``: the full rendering and one ``(start, end)`` character range per
        assistant message, in order.

    Raises:
        FishertuneError: the template renders a prefix of the conversation as text that is not a
            prefix of the full rendering, so assistant turns cannot be located.
    """
    text = _render(tokenizer, messages, generation=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = None
        for generation in (True, False):
            # Some templates add more to the generation prompt than to a finished turn (a
            # thinking tag): fall back to the prefix without it, labelling the header too.
            try:
                prefix = _render(tokenizer, messages[:i], generation) if i else ""
            except Exception:  # a template may refuse an empty or system-only conversation
                prefix = ""
            if text.startswith(prefix):
                start = len(prefix)
                break
        end_text = _render(tokenizer, messages[: i + 1], generation=False)
        if start is None or not text.startswith(end_text):
            raise FishertuneError(
                f"the chat template renders the conversation up to message {i} differently from "
                "the full conversation, so assistant tokens cannot be located by rendering "
                "prefixes; use a template that renders earlier turns the same way"
            )
        spans.append((start, max(start, len(end_text))))
    return text, spans


def _mask_from_offsets(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    mask = [0] * len(offsets)
    k = 0
    for j, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k == len(spans):
            break
        lo, hi = spans[k]
        # A token belongs to the span if their character ranges overlap; a zero-width token
        # (some tokenizers give special tokens empty offsets) if it sits inside the span.
        if max(s, lo) < min(e, hi) or (s == e and lo <= s < hi):
            mask[j] = 1
    return mask


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    max_length: int | None,
    *,
    use_offsets: bool | None = None,
) -> dict[str, list[int]]:
    """Tokenize a conversation with its chat template and mark the assistant tokens.

    Args:
        tokenizer: a ``transformers`` tokenizer with a chat template (see ``ensure_chat_template``).
        messages: the conversation (``[{"role", "content"}, ...]``).
        max_length: keep the first ``max_length`` tokens (None: no truncation).
        use_offsets: locate tokens by character offsets (fast tokenizers; default when
            available) or, if False, by token counts of the rendered prefixes as open-instruct
            does (any tokenizer; assumes tokenizing a prefix gives a prefix of the tokens).

    Returns:
        ``input_ids`` (list of L ints) and ``assistant_masks`` (L ints, 1 on the tokens of
        assistant messages including their end-of-turn token, 0 elsewhere).
    """
    text, spans = assistant_spans(tokenizer, messages)
    if use_offsets is None:
        use_offsets = bool(getattr(tokenizer, "is_fast", False))
    # add_special_tokens=False: the template already holds the special tokens it wants (BOS);
    # apply_chat_template(tokenize=True) tokenizes the same way.
    if use_offsets:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        mask = _mask_from_offsets(enc["offset_mapping"], spans)
    else:
        input_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        mask = [0] * len(input_ids)
        for start, end in spans:
            lo = len(tokenizer(text[:start], add_special_tokens=False)["input_ids"])
            hi = len(tokenizer(text[:end], add_special_tokens=False)["input_ids"])
            for j in range(lo, min(hi, len(mask))):
                mask[j] = 1
    if max_length is not None:
        input_ids, mask = input_ids[:max_length], mask[:max_length]
    return {"input_ids": input_ids, "assistant_masks": mask}


def tokenize_text(
    tokenizer: Any, prompt: str, completion: str, max_length: int | None
) -> dict[str, list[int]]:
    """Tokenize a plain language-modelling row: ``prompt + completion`` and the EOS token.

    The tokenizer's own special tokens are added (a BOS where it adds one), then EOS if it did
    not end on it. ``assistant_masks`` is 1 on the tokens of ``completion`` and the EOS (on
    every token when ``prompt`` is empty: a text row scores every token), 0 on the prompt's.

    Returns:
        ``input_ids`` and ``assistant_masks`` (L ints each), truncated to ``max_length``.
    """
    text = prompt + completion
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=fast)
    input_ids = list(enc["input_ids"])
    if not prompt:
        mask = [1] * len(input_ids)
    elif fast:
        mask = [int(end > len(prompt)) for _, end in enc["offset_mapping"]]
    else:  # token count of the prompt alone (assumes it tokenizes to a prefix)
        boundary = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        mask = [int(j >= boundary) for j in range(len(input_ids))]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
        mask.append(1)
    if max_length is not None:
        input_ids, mask = input_ids[:max_length], mask[:max_length]
    return {"input_ids": input_ids, "assistant_masks": mask}


def tokenize_row(row: Mapping[str, Any], tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """One reader row tokenized as training does (:func:`tokenize_conversation` for ``messages``,
    :func:`tokenize_text` for ``prompt``/``completion``), cut to ``max_length``; ``full_length``
    is the token count before the cut."""
    if "messages" in row:
        out = tokenize_conversation(tokenizer, row["messages"], None)
    else:
        out = tokenize_text(tokenizer, row["prompt"], row["completion"], None)
    out["full_length"] = len(out["input_ids"])
    if max_length is not None:
        out["input_ids"] = out["input_ids"][:max_length]
        out["assistant_masks"] = out["assistant_masks"][:max_length]
    return out


def tokenize_dataset(
    dataset: Any,
    tokenizer: Any,
    max_length: int,
    num_proc: int | None = None,
    *,
    drop_too_long: bool = False,
    report: dict[str, Any] | None = None,
) -> Any:
    """Tokenize every row of a dataset for training: chat rows (``messages``) assistant-only,
    plain LM rows (``prompt``, ``completion``) on the completion (every token for text).

    The result can be given to TRL's ``SFTTrainer`` as a pre-tokenized dataset: it builds
    ``labels`` from ``assistant_masks`` (``-100`` where the mask is 0).

    Args:
        dataset: a ``datasets.Dataset`` from :func:`load_conversations` (``messages``, or
            ``prompt`` and ``completion``; optionally ``source``).
        tokenizer: a tokenizer with a chat template (for chat rows).
        max_length: truncation length (the start of each row is kept).
        num_proc: worker processes for ``Dataset.map``.
        drop_too_long: drop rows longer than ``max_length`` tokens instead of truncating them.
        report: a reader's report: the rows dropped here are added to its ``dropped`` counts
            and ``rows_kept``.

    Returns:
        A ``datasets.Dataset`` with ``input_ids``, ``assistant_masks`` and ``source`` (if
        present). Rows left with no scored token after truncation are dropped, with a logged
        warning that counts them (reason ``no_label_after_truncation``).

    Raises:
        FishertuneError: every row was dropped (``max_length`` too small).
    """
    if max_length is None or max_length < 1:
        raise FishertuneError(f"max_length must be a positive integer, got {max_length}")
    keep = [c for c in ("source",) if c in dataset.column_names]
    tokenized = dataset.map(
        tokenize_row,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=[c for c in dataset.column_names if c not in keep],
        num_proc=num_proc,
        desc="Tokenizing",
    )
    total = len(tokenized)
    dropped: dict[str, int] = {}
    if drop_too_long:
        before = len(tokenized)
        tokenized = tokenized.filter(
            lambda n: n <= max_length, input_columns="full_length", num_proc=num_proc
        )
        dropped["too_long"] = before - len(tokenized)
    before = len(tokenized)
    tokenized = tokenized.filter(
        lambda mask: any(mask), input_columns="assistant_masks", num_proc=num_proc
    )
    dropped["no_label_after_truncation"] = before - len(tokenized)
    tokenized = tokenized.remove_columns("full_length")
    record_drops(dropped, total, len(tokenized), max_length, report)
    return tokenized


# --------------------------------------------------------------------------------------------
# Stratified subsets


def _strata(values: Iterable[Any]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for index, value in enumerate(values):
        groups.setdefault(value, []).append(index)
    return groups


def stratified_subsample(dataset: Any, fraction: float, seed: int, key: str = "source") -> Any:
    """Sample a fraction of each stratum (rows sharing ``key``), like the paper's 1% / 10% sets.

    Each stratum of ``n`` rows keeps ``max(1, floor(fraction * n + 0.5))`` of them, drawn without
    replacement by ``random.Random(seed)`` over the strata in sorted order; the kept rows stay in
    their original order. Without a ``key`` column the whole dataset is one stratum.

    Args:
        dataset: a ``datasets.Dataset``.
        fraction: in (0, 1].
        seed: seed of the draw (same seed, same rows).
        key: column to stratify by.

    Returns:
        ``dataset.select(indices)``.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise FishertuneError(f"fraction must be in (0, 1], got {fraction}")
    if key in dataset.column_names:
        groups = _strata(dataset[key])
    else:
        logger.warning("no %r column to stratify by: sampling the dataset as one stratum", key)
        groups = {None: list(range(len(dataset)))}
    rng = random.Random(seed)
    chosen: list[int] = []
    for value in sorted(groups, key=lambda v: (v is None, str(v))):
        indices = groups[value]
        k = min(len(indices), max(1, math.floor(fraction * len(indices) + 0.5)))
        chosen.extend(rng.sample(indices, k))
    return dataset.select(sorted(chosen))
