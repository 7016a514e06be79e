"""Offline scorer on the built-in verifiable tasks (or any dataset in the same format).

Two measurements, both without network access or a judge model:

* **Validation loss** on the ``validation`` split, over assistant tokens only (the tokens the model
  was trained on, each turn's end-of-turn token included)::

      val_loss   = - (1 / N) * sum_{i, t : m_{i,t} = 1} log p(x_{i,t} | x_{i,<t})
      perplexity = exp(val_loss)

  where ``m`` is the assistant mask of ``fishertune.data.tokenize_dataset`` and ``N`` the number of
  masked tokens in the whole split (a token-weighted mean, not a mean of per-row means).
  ``test_loss`` is the same on the ``test`` split (model selection on validation, the result
  reported on test).
* **Generation** on the ``test`` split (skipped with ``max_new_tokens=0``: losses only): greedy
  decoding of a reply to every conversation up to its last assistant turn, through the
  tokenizer's chat template, scored by ``fishertune.data.instructions.check_response``:

  - ``exact_match``: fraction of test rows whose stripped reply equals the reference answer;
  - ``ifeval_strict`` / ``ifeval_loose``: IFEval's prompt-level strict and loose accuracy over the
    rows that carry formatting instructions (``check.instructions``), every instruction followed;
  - ``reply_length``: the replies' mean length in tokens, and ``distinct_2``: distinct word
    bigrams over all word bigrams of the replies (Li et al. 2016), the two things NEFTune is
    known to change in generated answers (:func:`answer_statistics`).

Example::

    from fishertune.evaluation.offline import evaluate_offline
    scores = evaluate_offline(model, tokenizer, limit=100)
    # {"val_loss": 1.93, "perplexity": 6.9, "exact_match": 0.41, ..., "n_test": 100}
"""

from __future__ import annotations

import math
from typing import Any

from fishertune.data.options import DataOptions
from fishertune.errors import FishertuneError

__all__ = [
    "METRICS",
    "METRIC_DESCRIPTIONS",
    "answer_statistics",
    "evaluate_offline",
    "limited",
    "validation_loss",
]

# Metric name -> higher is better (what report tables use to mark the best method).
METRICS: dict[str, bool] = {
    "val_loss": False,
    "test_loss": False,
    "perplexity": False,
    "exact_match": True,
    "ifeval_strict": True,
    "ifeval_loose": True,
    "reply_length": True,  # NEFTune's reported gain: longer answers, which judges prefer
    "distinct_2": True,
}
METRIC_DESCRIPTIONS: dict[str, str] = {
    "val_loss": "mean cross-entropy (nats) over assistant tokens of the validation split",
    "test_loss": "mean cross-entropy (nats) over assistant tokens of the test split",
    "perplexity": "exp(val_loss)",
    "exact_match": "fraction of test replies (greedy) equal to the reference answer",
    "ifeval_strict": "IFEval prompt-level strict accuracy on test rows with instructions",
    "ifeval_loose": "IFEval prompt-level loose accuracy on test rows with instructions",
    "reply_length": "mean length in tokens of the greedy test replies",
    "distinct_2": "distinct word bigrams / all word bigrams of the greedy test replies",
}


def answer_statistics(replies: list[str], count_tokens: Any) -> dict[str, float]:
    """``reply_length``: mean of ``count_tokens(reply)``; ``distinct_2``: distinct whitespace-word
    bigrams over all bigrams, pooled over the replies (NaN when no reply has two words): a
    model that repeats itself or answers every prompt alike scores low."""
    bigrams = [
        pair for reply in replies for pair in zip(reply.split(), reply.split()[1:], strict=False)
    ]
    return {
        "reply_length": sum(count_tokens(r) for r in replies) / len(replies)
        if replies
        else float("nan"),
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else float("nan"),
    }


def limited(dataset: Any, limit: int | float | None) -> Any:
    """The first ``limit`` rows (an int), or that fraction of the rows (a float below 1)."""
    if limit is None:
        return dataset
    if limit <= 0:
        raise FishertuneError(f"limit must be positive, got {limit}")
    n = math.ceil(limit * len(dataset)) if limit < 1 else int(limit)
    return dataset.select(range(min(n, len(dataset))))


def validation_loss(model: Any, tokenized: Any, *, batch_size: int = 16, pad_id: int = 0) -> float:
    """Token-weighted mean cross-entropy over the assistant tokens of a tokenized dataset.

    Args:
        model: a causal LM returning ``logits`` of shape (B, L, V).
        tokenized: rows with ``input_ids`` and ``assistant_masks`` (``tokenize_dataset``).
        batch_size: rows per forward pass (right-padded with ``pad_id``, masked out).
        pad_id: padding token id.

    Returns:
        ``-(1/N) sum log p(x_t | x_<t)`` over the N positions with assistant mask 1 (position 0,
        which has no context, is never scored).
    """
    import torch

    from fishertune.data.collate import collate_tokenized
    from fishertune.penalties import IGNORE_INDEX

    device = next(model.parameters()).device
    total, count = 0.0, 0
    rows = list(tokenized)
    for start in range(0, len(rows), batch_size):
        batch = collate_tokenized(rows[start : start + batch_size], pad_id)
        ids = batch["input_ids"]
        with torch.no_grad():
            logits = model(
                input_ids=ids.to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.float()  # (B, L, V)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, L-1, V): predicts x_1 .. x_{L-1}
        target = ids[:, 1:].to(device)  # (B, L-1)
        token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, L-1)
        scored = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device)
        total -= float(token_logp[scored].sum())
        count += int(scored.sum())
    if count == 0:
        raise FishertuneError("the validation split has no assistant token to score")
    return total / count


def evaluate_offline(
    model: Any,
    tokenizer: Any,
    *,
    dataset: str = "builtin:tiny-tasks",
    options: DataOptions | None = None,
    limit: int | float | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_length: int = 512,
    splits: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Score a model on the offline tasks (see the module docstring for the metrics).

    Args:
        model: a ``transformers`` causal LM (any device; left in the mode it came in).
        tokenizer: its tokenizer; the Tulu 3 template is installed if it has none.
        dataset: ``builtin:tiny-tasks`` or a local file/folder/hub name accepted by
            ``fishertune.data.load_conversations`` with ``validation`` and ``test`` splits
            (rows without a ``check`` field are scored by exact match only), in any format the
            reader knows (chat rows only: the test split's replies are generated).
        options: the reader's formats, mappings and bad-row policy.
        limit: rows of each split to use: an int (the first ``limit``) or a fraction below 1.
        max_new_tokens: generation budget per test reply; 0 generates nothing (the generation
            metrics are left out).
        batch_size: rows per forward pass / ``generate`` call.
        max_length: truncation length of the validation conversations.
        splits: the ``validation`` and ``test`` rows, already read and limited (what
            ``fishertune evaluate`` passes, :mod:`fishertune.evaluation.heldout`); ``dataset``
            and ``limit`` are then not used.

    Returns:
        ``val_loss``, ``test_loss``, ``perplexity``, ``exact_match``, ``ifeval_strict``,
        ``ifeval_loose`` (NaN when no test row has instructions) and ``n_test`` (number of test
        rows).
    """
    from fishertune.data.chat import ensure_chat_template, load_conversations, tokenize_dataset
    from fishertune.evaluation.export import generate_replies

    ensure_chat_template(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def rows_of(split: str) -> Any:
        if splits is not None:
            return splits[split]
        return limited(load_conversations(dataset, split, options), limit)

    was_training = model.training
    model.eval()
    try:
        validation = rows_of("validation")
        tokenized = tokenize_dataset(validation, tokenizer, max_length)
        val_loss = validation_loss(
            model, tokenized, batch_size=batch_size, pad_id=tokenizer.pad_token_id
        )

        test = rows_of("test")
        if "messages" not in test.column_names:
            raise FishertuneError(
                f"{dataset} (split test): offline evaluation generates replies to conversations; "
                "these are plain text rows"
            )
        test_loss = validation_loss(
            model,
            tokenize_dataset(test, tokenizer, max_length),
            batch_size=batch_size,
            pad_id=tokenizer.pad_token_id,
        )
        rows = [test[i] for i in range(len(test))]
        replies = None
        if max_new_tokens > 0:
            replies = generate_replies(
                model,
                tokenizer,
                [_prompt(row["messages"]) for row in rows],
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
    finally:
        model.train(was_training)
    losses = {"val_loss": val_loss, "test_loss": test_loss, "perplexity": math.exp(val_loss)}
    if replies is None:
        return {**losses, "n_test": float(len(rows))}
    return {**losses, **_reply_metrics(rows, replies, tokenizer), "n_test": float(len(rows))}


def _prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation up to its last assistant turn: what the model is asked to answer."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def _reply_metrics(rows: list[Any], replies: list[str], tokenizer: Any) -> dict[str, float]:
    """The generation metrics of the test replies: exact match, IFEval's strict and loose
    accuracy (over the rows with instructions; NaN when none has) and the replies' lengths."""
    from fishertune.data.instructions import check_response

    verdicts = [check_response(row, reply) for row, reply in zip(rows, replies, strict=True)]
    with_rules = [v for v in verdicts if "strict" in v]

    def mean(values: list[bool]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return {
        "exact_match": mean([v["exact_match"] for v in verdicts]),
        "ifeval_strict": mean([v["strict"] for v in with_rules]),
        "ifeval_loose": mean([v["loose"] for v in with_rules]),
        **answer_statistics(
            replies, lambda r: len(tokenizer(r, add_special_tokens=False)["input_ids"])
        ),
    }
