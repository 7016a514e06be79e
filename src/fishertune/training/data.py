"""Conversational datasets given to ``FisherSFTTrainer`` tokenized as ``fishertune train`` does."""

from __future__ import annotations

import logging
from typing import Any

from fishertune.data.formats import DataOptions
from fishertune.errors import FishertuneError
from fishertune.training.config import FisherSFTConfig

__all__ = [
    "labels_of",
    "lazy_plan",
    "screen",
    "token_bound",
    "tokenize_conversations",
    "tokenize_lazily",
    "with_labels",
]

logger = logging.getLogger(__name__)


def tokenize_conversations(arguments: dict[str, Any], config: FisherSFTConfig) -> None:
    """Tokenize conversational datasets among ``arguments`` (``SFTTrainer.__init__``'s, bound)
    for assistant-only training, as ``fishertune train`` does, in place.

    A ``datasets.Dataset`` with no ``input_ids`` whose fields name a format the reader knows
    (``messages``, ShareGPT ``conversations``, Alpaca, prompt/completion, ``text``: see
    :mod:`fishertune.data.formats`) is read through it (mappings detected, bad rows dropped and
    counted, the summary logged) and goes through :func:`fishertune.data.chat.tokenize_dataset`
    (``input_ids`` and ``assistant_masks``, from which TRL builds the labels): the loss then
    covers assistant tokens and each turn's end-of-turn token, whatever the chat template (every
    token of a text row). The tokenizer (``processing_class``, or the
    model's when not given) gets a chat template and a pad token as the CLI's does.
    """
    from datasets import Dataset

    from fishertune.data.chat import tokenize_dataset
    from fishertune.data.formats import detect_format, prepare_rows
    from fishertune.data.tokenizer import load_chat_tokenizer

    def conversational(dataset: Any) -> bool:
        if not isinstance(dataset, Dataset) or "input_ids" in dataset.column_names:
            return False
        try:
            detect_format(dataset.column_names, DataOptions())
        except FishertuneError:
            return False
        return True

    def tokenized(dataset: Any) -> Any:
        return tokenize_dataset(prepare_rows(dataset).load(), tokenizer, max_length)

    train, evaluation = arguments.get("train_dataset"), arguments.get("eval_dataset")
    eval_sets = evaluation if isinstance(evaluation, dict) else {"": evaluation}
    if not conversational(train) and not any(map(conversational, eval_sets.values())):
        return
    from fishertune.modeling import set_chat_template_file

    tokenizer = arguments.get("processing_class")
    if tokenizer is None:
        model = arguments.get("model")
        name = model if isinstance(model, str) else model.config._name_or_path
        tokenizer = arguments["processing_class"] = load_chat_tokenizer(name)
    else:
        from fishertune.data.chat import ensure_chat_template

        ensure_chat_template(tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if config.chat_template_path is not None:  # TRL sets it later: the data needs it now
        set_chat_template_file(tokenizer, config.chat_template_path)
    # TRL's max_length None means no truncation
    max_length = config.max_length or 2**31 - 1
    if conversational(train):
        arguments["train_dataset"] = tokenized(train)
    done = {key: tokenized(ds) if conversational(ds) else ds for key, ds in eval_sets.items()}
    if evaluation is not None:
        arguments["eval_dataset"] = done if isinstance(evaluation, dict) else done[""]


# --------------------------------------------------------------------------------------------
# Lazy tokenization of the train split
#
# The trainer's sampler permutes the indices of the whole train split, so a short run needs
# every row's place (which rows survive tokenization) but only the sampled rows' tokens. A
# screen decides for each row whether it keeps a scored token within ``max_length`` tokens
# without tokenizing it where a bound proves it does; the rows it cannot prove are tokenized in
# full, exactly as ``tokenize_dataset`` would. The kept rows are then tokenized on first access.


def _prefix_render(tokenizer: Any, messages: list[Any]) -> str:
    """The rendering :func:`fishertune.data.chat.assistant_spans` tries first as the text before
    an assistant turn (the generation prompt), or ``""`` where the template refuses it."""
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # as assistant_spans: a template may refuse a system-only conversation
        return ""


def token_bound(tokenizer: Any, text: str) -> int:
    """An upper bound on the number of tokens a fast tokenizer makes of the characters of
    ``text`` inside any longer text (no special tokens added by the post-processor).

    Every token covers at least one byte of its piece after normalization and pre-tokenization
    (one character of a byte-level piece), so ``n <= sum(bytes(piece))``; each section between
    added tokens may gain a prefix (a space, ``▁``) of at most 4 bytes, hence
    ``bound = sum(bytes(piece)) + 4 * (1 + occurrences of added tokens in text)``.
    """
    backend = tokenizer.backend_tokenizer
    normalized = backend.normalizer.normalize_str(text) if backend.normalizer else text
    pre = backend.pre_tokenizer
    pieces = [p for p, _ in pre.pre_tokenize_str(normalized)] if pre else [normalized]
    byte_level = pre is not None and "ByteLevel" in repr(pre)
    size = sum(len(p) if byte_level else len(p.encode("utf-8")) for p in pieces)
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.content]
    return size + 4 * (1 + sum(text.count(t) for t in added))


def _scored_char(text: str, start: int, end: int) -> int | None:
    """The first ASCII letter or digit in ``text[start:end]``: a character no normalizer removes,
    so a token covers it."""
    return next((k for k in range(start, end) if text[k].isascii() and text[k].isalnum()), None)


def _added_end(tokenizer: Any, text: str, before: int) -> int:
    """Where the last occurrence of an added (special) token that ends by ``before`` ends; 0
    where none does."""
    ends = (text.rfind(t.content, 0, before) for t in tokenizer.added_tokens_decoder.values())
    found = [
        e + len(t.content)
        for e, t in zip(ends, tokenizer.added_tokens_decoder.values(), strict=True)
        if e >= 0 and t.content
    ]
    return max(found, default=0)


def screen(row: Any, tokenizer: Any, max_length: int) -> bool | None:
    """Whether the row, tokenized as :func:`fishertune.data.chat.tokenize_dataset` does, keeps a
    scored token among its first ``max_length`` tokens: True or False where that is proven
    without tokenizing the whole row, None where it is not.

    A chat row: ``c``, the first ASCII letter or digit of its first assistant span, is covered by
    a scored token, and no token before the span is scored. Cut the rendering at ``b``, the end
    of the last added token before the span: a fast tokenizer splits text at added tokens and
    tokenizes the pieces apart, so the ``n_b`` tokens of ``text[:b]`` are the first tokens of the
    whole row. Then ``n_b - 1 >= max_length`` drops the row (only the added token itself could
    reach into the span, through ``rstrip``), and ``n_b + token_bound(text[b:c]) <=
    max_length - 1`` keeps it (the token covering ``c`` has at most that index); a row whose
    rendering up to ``c`` alone is bounded so is kept without tokenizing anything. A text row
    is scored from the first character of its completion (its first token for an empty prompt).
    """
    from fishertune.data import chat

    if "messages" not in row:
        prompt, completion = row["prompt"], row["completion"]
        if not prompt:
            return True if tokenizer.eos_token_id is not None else None  # every token scored
        c = _scored_char(prompt + completion, len(prompt), len(prompt) + len(completion))
        if c is None:
            return None
        specials = tokenizer.num_special_tokens_to_add(pair=False)
        bound = token_bound(tokenizer, (prompt + completion)[:c]) + specials
        return True if bound <= max_length - 1 else None
    messages = list(row["messages"])
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        return None
    try:
        text, spans = chat.assistant_spans(tokenizer, messages[: first + 1])
    except FishertuneError:
        return None  # tokenizing the row in full raises it, as before
    # The full conversation's first span starts where this one does when its generation
    # prompt fits inside this rendering (both then fall back alike where it is no prefix).
    if len(_prefix_render(tokenizer, messages[:first])) > len(text):
        return None
    c = _scored_char(text, *spans[0])
    if c is None:
        return None
    if token_bound(tokenizer, text[:c]) <= max_length - 1:
        return True
    b = _added_end(tokenizer, text, spans[0][0])
    if b == 0:
        return None
    n_b = len(tokenizer(text[:b], add_special_tokens=False)["input_ids"])
    if n_b - 1 >= max_length:
        return False
    if n_b + token_bound(tokenizer, text[b:c]) <= max_length - 1:
        return True
    return None


def _tokenize_row(row: Any, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` and ``assistant_masks`` of one row, cut at ``max_length``, as
    :func:`fishertune.data.chat.tokenize_dataset` computes them."""
    from fishertune.data import chat

    if "messages" in row:
        return chat.tokenize_conversation(tokenizer, row["messages"], max_length)
    return chat.tokenize_text(tokenizer, row["prompt"], row["completion"], max_length)


def _screen_row(row: Any, tokenizer: Any, max_length: int) -> dict[str, Any]:
    decided = screen(row, tokenizer, max_length)
    if decided is not None:
        return {"input_ids": [], "assistant_masks": [], "tokenized": False, "keep": decided}
    out = _tokenize_row(row, tokenizer, max_length)
    return {**out, "tokenized": True, "keep": any(out["assistant_masks"])}


def labels_of(input_ids: list[int], mask: list[int] | None) -> list[int]:
    """TRL's labels of a pre-tokenized row: the token where the assistant mask is 1 (every
    token without a mask), ``-100`` elsewhere."""
    from fishertune.penalties import IGNORE_INDEX

    if mask is None:
        return list(input_ids)
    return [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask, strict=True)]


def with_labels(dataset: Any, assistant_only: bool) -> Any:
    """A tokenized dataset made trainer-ready as TRL's preparation makes it: ``labels`` from
    ``assistant_masks`` (every token when not ``assistant_only``), the mask removed. Rows are
    already cut at ``max_length`` and hold a scored token, so TRL's truncation and filter after
    it change nothing."""

    def build(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "labels": labels_of(
                row["input_ids"], row["assistant_masks"] if assistant_only else None
            )
        }

    return dataset.map(build, remove_columns="assistant_masks", desc="Building labels")


def lazy_plan(script_args: Any, training_args: Any, tokenizer: Any, rows: int) -> str | None:
    """Why the train split must be tokenized in full (None: it can be tokenized lazily)."""
    if getattr(script_args, "drop_too_long", False):
        return "drop_too_long needs every row's length"
    if getattr(training_args, "packing", False) or getattr(training_args, "padding_free", False):
        return "packing needs every row's tokens"
    if getattr(training_args, "shuffle_dataset", False):
        return "shuffle_dataset shuffles the tokenized rows"
    if getattr(training_args, "train_sampling_strategy", "random") != "random":
        strategy = training_args.train_sampling_strategy
        return f"train_sampling_strategy={strategy} needs every row's length"
    if (
        not getattr(tokenizer, "is_fast", False)
        or getattr(tokenizer, "backend_tokenizer", None) is None
    ):
        return "the tokenizer is not a fast one (no bound on its token counts)"
    steps = training_args.max_steps
    world = max(1, int(getattr(training_args, "world_size", 1) or 1))
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    if steps is None or steps <= 0 or steps * batch * world >= rows:
        return "the run reads every row"
    return None


def tokenize_lazily(
    dataset: Any,
    tokenizer: Any,
    max_length: int,
    *,
    assistant_only: bool = True,
    report: dict[str, Any] | None = None,
) -> Any:
    """The train split as ``tokenize_dataset`` keeps it (same rows, same order, same report),
    trainer-ready (``input_ids``, ``labels``), with each row tokenized on its first access.

    A screen (``Dataset.map``, cached like the full tokenization) finds the kept rows: a row
    :func:`screen` decides is kept or dropped untokenized, any other is tokenized in full and
    kept if a token is scored. The result is a ``datasets.Dataset`` of the kept rows whose one
    stored column, ``input_ids``, holds the row's position (the column the trainer keeps),
    turned into its tokens by a transform that tokenizes once per process and remembers the
    row. Give it to the trainer with ``dataset_kwargs={"skip_prepare_dataset": True}``.

    Raises:
        FishertuneError: every row was dropped (``max_length`` too small).
    """
    import datasets

    from fishertune.data.prepare import record_drops

    if max_length is None or max_length < 1:
        raise FishertuneError(f"max_length must be a positive integer, got {max_length}")
    screened = dataset.map(
        _screen_row,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        desc="Screening row lengths",
    )
    total = len(screened)
    kept = screened.filter(lambda keep: keep, input_columns="keep", desc="Keeping scored rows")
    dropped = {"no_label_after_truncation": total - len(kept)}
    record_drops(dropped, total, len(kept), max_length, report)
    logger.info(
        "train split: %d rows kept, %d tokenized to place them; the others are tokenized when read",
        len(kept),
        sum(kept["tokenized"]),
    )
    memo: dict[int, dict[str, list[int]]] = {}

    def row_tokens(position: int) -> dict[str, list[int]]:
        if position not in memo:
            row = kept[position]
            out = row if row["tokenized"] else _tokenize_row(row, tokenizer, max_length)
            if not any(out["assistant_masks"]):
                # the screen's token bound failed for this tokenizer: never train on a row
                # the full tokenization would have dropped
                raise FishertuneError(
                    f"train row {position}: no answer token within max_length={max_length}, "
                    "though the length screen kept it (a tokenizer the screen's bound does not "
                    "hold for); rerun with --drop_too_long true, which tokenizes every row first"
                )
            mask = out["assistant_masks"] if assistant_only else None
            memo[position] = {
                "input_ids": list(out["input_ids"]),
                "labels": labels_of(out["input_ids"], mask),
            }
        return memo[position]

    def transform(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [row_tokens(p) for p in batch["input_ids"]]
        return {key: [r[key] for r in rows] for key in ("input_ids", "labels")}

    positions = datasets.Dataset.from_dict({"input_ids": list(range(len(kept)))})
    positions.set_transform(transform)
    positions.tokenized_rows = memo  # which rows were read: for inspection
    return positions
