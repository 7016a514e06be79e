"""The rows ``fishertune analyze`` measures: conversations tokenized (a seeded sample of a large
set), rows with a scored token drawn in a seeded order, and the padding id."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fishertune.data.collate import row_labels
from fishertune.errors import FishertuneError
from fishertune.penalties import IGNORE_INDEX

__all__ = ["SAMPLE_CAP", "measured_rows", "pad_token_id", "scored_rows", "tokenized_rows"]

SAMPLE_CAP = 2000  # conversations tokenized at most (a seeded random sample of larger sets)


def _has_scored_token(row: Mapping[str, Any]) -> bool:
    # Position t predicts token t + 1: a label on the first token is never scored.
    return any(label != IGNORE_INDEX for label in row_labels(row)[1:])


def scored_rows(dataset: Any, seed: int, count: int) -> list[Mapping[str, Any]]:
    """``count`` rows in an order shuffled by ``seed``, skipping rows with no scored token."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: list[Mapping[str, Any]] = []
    for i in order:
        if len(chosen) == count:
            break
        row = dataset[i]
        if _has_scored_token(row):
            chosen.append(row)
    if not chosen:
        raise FishertuneError(
            "no example has an assistant token after its first token (check the chat template's "
            "assistant mask and --max_length)"
        )
    return chosen


def tokenized_rows(
    dataset: Any, tokenizer: Any, max_length: int | None, seed: int, cap: int
) -> Any:
    """``dataset`` itself when it holds token ids; otherwise tokenize its conversations.

    A large set of conversations is first cut to a seeded random sample of ``cap`` of them: the
    measurement uses a few batches, and the median length is estimated well from a sample, so
    tokenizing a whole SFT mixture (866k conversations for Tulu 3) would be wasted.
    """
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        columns = list(dataset[0]) if len(dataset) else []
    if "input_ids" in columns:
        return dataset
    if "messages" not in columns and "completion" not in columns:
        raise FishertuneError(
            "the data set has neither 'input_ids' nor 'messages' nor 'prompt'/'completion' "
            f"(fields: {sorted(columns)}); read it with fishertune.data.load_conversations"
        )
    from fishertune.data.chat import ensure_chat_template, tokenize_dataset

    if len(dataset) > cap and hasattr(dataset, "select"):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        dataset = dataset.select(sorted(order[:cap].tolist()))
    ensure_chat_template(tokenizer)
    return tokenize_dataset(dataset, tokenizer, max_length or 1024)


def measured_rows(
    dataset: Any,
    tokenizer: Any,
    *,
    max_length: int | None,
    seed: int,
    batches: int,
    batch_size: int,
) -> Any:
    """The rows :func:`fishertune.analysis.measure.analyze` draws its batches from:
    ``dataset`` itself when it holds token ids, else its conversations tokenized, a seeded sample
    of at most ``max(SAMPLE_CAP, 4 * batches * batch_size)`` of them (:func:`tokenized_rows`).
    Given these rows, ``analyze`` measures what it would have measured on ``dataset``: several
    models are measured on one tokenization."""
    cap = max(SAMPLE_CAP, 4 * batches * batch_size)
    return tokenized_rows(dataset, tokenizer, max_length, seed, cap)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0."""
    # Padding never reaches the loss (attention mask, -100 labels); any valid id will do.
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0
