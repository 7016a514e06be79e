"""Tokenized rows as a batch: a row's labels from its assistant mask, and right padding into
``input_ids``, ``attention_mask`` and ``labels`` tensors (offline evaluation, ``analyze``, the
demo)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.penalties import IGNORE_INDEX

__all__ = ["collate_tokenized", "row_labels"]


def row_labels(row: Mapping[str, Any]) -> list[int]:
    """A tokenized row's labels: its ``labels``, or its input ids on assistant tokens
    (``assistant_masks == 1``) and ``-100`` elsewhere."""
    if "labels" in row and row["labels"] is not None:
        return list(row["labels"])
    if "assistant_masks" not in row:
        raise FishertuneError(
            "tokenized examples need 'input_ids' and 'assistant_masks' (or 'labels'); got "
            f"fields {sorted(row)}"
        )
    return [
        token if keep else IGNORE_INDEX
        for token, keep in zip(row["input_ids"], row["assistant_masks"], strict=True)
    ]


def collate_tokenized(rows: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad tokenized rows into ``input_ids``, ``attention_mask`` and ``labels`` (B, L)
    tensors; ``labels`` are :func:`row_labels`, ``-100`` on padding."""
    import torch

    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(rows):
        ids = list(row["input_ids"])
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, : len(ids)] = 1
        labels[b, : len(ids)] = torch.tensor(row_labels(row), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
