"""Lazy tokenization of the train split: the same kept rows in the same order as full
tokenization, untouched rows never tokenized, the screen cached across runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from fishertune.data import chat
from fishertune.data.chat import load_conversations, tokenize_dataset
from fishertune.data.tokenizer import load_tiny_tokenizer
from fishertune.training.data import labels_of, lazy_plan, tokenize_lazily, with_labels


@pytest.fixture(autouse=True)
def _caches(tmp_path, monkeypatch) -> Iterator[None]:
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "ft"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    yield


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def _write_rows(path, n: int = 40) -> str:
    """Chat rows whose first prompt grows with the row: at small max_length the later ones keep
    no assistant token, so some are dropped between kept ones."""
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(f"word{j} 7" for j in range((i * 7) % 23 + 1))
            row = {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": f"answer {i} " * (i % 5 + 1)},
                    {"role": "user", "content": "more?"},
                    {"role": "assistant", "content": "yes " * (i % 3 + 1)},
                ],
                "source": f"s{i % 3}",
            }
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.parametrize("max_length", [24, 48, 96, 4096])
@pytest.mark.parametrize("assistant_only", [True, False])
def test_lazy_rows_equal_full_tokenization(tmp_path, tok, max_length, assistant_only) -> None:
    rows = load_conversations(_write_rows(tmp_path / "d.jsonl"))
    eager_report: dict = {}
    lazy_report: dict = {}
    try:
        eager = tokenize_dataset(rows, tok, max_length, report=eager_report)
    except Exception as err:  # every row dropped: the lazy path refuses it alike
        with pytest.raises(type(err)):
            tokenize_lazily(rows, tok, max_length, report=lazy_report)
        return
    lazy = tokenize_lazily(rows, tok, max_length, assistant_only=assistant_only, report=lazy_report)
    assert eager_report == lazy_report
    assert len(lazy) == len(eager)
    if max_length == 24:
        assert eager_report["dropped"]["no_label_after_truncation"] > 0
    for i in range(len(eager)):
        row = eager[i]
        mask = row["assistant_masks"] if assistant_only else None
        assert lazy[i] == {
            "input_ids": row["input_ids"],
            "labels": labels_of(row["input_ids"], mask),
        }
    # a batch read (the trainer's __getitems__) gives the same rows
    picked = [5, 0, len(eager) - 1]
    batch = lazy.__getitems__(picked)
    assert [b["input_ids"] for b in batch] == [eager[i]["input_ids"] for i in picked]


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = chat.tokenize_conversation

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(chat, "tokenize_conversation", counted)
    return calls


def test_untouched_rows_are_not_tokenized(tmp_path, tok, monkeypatch) -> None:
    rows = load_conversations(_write_rows(tmp_path / "d.jsonl"))
    calls = _counting(monkeypatch)
    lazy = tokenize_lazily(rows, tok, 4096)  # every row proven kept by the bound
    assert calls == [] and len(lazy) == len(rows)
    first = lazy[7]
    lazy[[3, 7]]
    assert len(calls) == 2 and sorted(lazy.tokenized_rows) == [3, 7]
    assert lazy[7] == first and len(calls) == 2  # remembered
    assert (
        first["input_ids"]
        == chat.tokenize_conversation(tok, rows[7]["messages"], 4096)["input_ids"]
    )


def test_screen_is_cached_across_runs(tmp_path, tok, monkeypatch) -> None:
    path = _write_rows(tmp_path / "d.jsonl")
    spans: list[int] = []
    real = chat.assistant_spans

    def counted(*args, **kwargs):
        spans.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(chat, "assistant_spans", counted)
    first = tokenize_lazily(load_conversations(path), tok, 48)
    assert spans  # the first run screens every row
    spans.clear()
    second = tokenize_lazily(load_conversations(path), tok, 48)
    assert spans == []  # the second one reads the screen from the datasets cache
    assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]


def _args(**over):
    script = SimpleNamespace(drop_too_long=over.pop("drop_too_long", False))
    training = SimpleNamespace(
        packing=False,
        padding_free=False,
        shuffle_dataset=False,
        train_sampling_strategy="random",
        max_steps=5,
        world_size=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    for key, value in over.items():
        setattr(training, key, value)
    return script, training


def test_lazy_plan_falls_back_to_full_tokenization(tok) -> None:
    assert lazy_plan(*_args(), tok, 1000) is None
    assert "drop_too_long" in lazy_plan(*_args(drop_too_long=True), tok, 1000)
    assert "every row" in lazy_plan(*_args(), tok, 40)  # 5 * 4 * 2 = 40 rows read
    assert "every row" in lazy_plan(*_args(max_steps=-1), tok, 1000)
    assert "every row" in lazy_plan(*_args(world_size=25), tok, 1000)
    assert "packing" in lazy_plan(*_args(packing=True), tok, 1000)
    assert "shuffle" in lazy_plan(*_args(shuffle_dataset=True), tok, 1000)
    assert "group_by_length" in lazy_plan(
        *_args(train_sampling_strategy="group_by_length"), tok, 1000
    )


def test_evaluation_split_gets_trl_labels(tmp_path, tok) -> None:
    rows = load_conversations(_write_rows(tmp_path / "d.jsonl", n=6))
    tokenized = tokenize_dataset(rows, tok, 4096)
    for assistant_only in (True, False):
        ready = with_labels(tokenized, assistant_only)
        assert "assistant_masks" not in ready.column_names
        for i in range(len(ready)):
            ids, mask = tokenized[i]["input_ids"], tokenized[i]["assistant_masks"]
            want = [
                t if (m or not assistant_only) else -100 for t, m in zip(ids, mask, strict=True)
            ]
            assert ready[i]["labels"] == want


def test_a_row_the_screen_wrongly_kept_stops_the_run_in_one_line(tmp_path, tok, monkeypatch):
    """Were the screen's token bound to fail for some tokenizer, a kept row without an answer
    token must not be trained on silently: reading it raises, naming the row and the way out."""
    from fishertune.errors import FishertuneError
    from fishertune.training import data as training_data

    rows = load_conversations(_write_rows(tmp_path / "d.jsonl"))
    monkeypatch.setattr(training_data, "screen", lambda row, tokenizer, max_length: True)
    lazy = tokenize_lazily(rows, tok, 24)
    assert len(lazy) == len(rows)  # the faulty screen kept every row
    unscored = [
        i
        for i, row in enumerate(rows)
        if not any(chat.tokenize_conversation(tok, row["messages"], 24)["assistant_masks"])
    ]
    assert unscored and len(tokenize_dataset(rows, tok, 24)) == len(rows) - len(unscored)
    dropped = unscored[0]
    with pytest.raises(FishertuneError, match=rf"train row {dropped}: no answer token .* "
                       "--drop_too_long true"):  # fmt: skip
        lazy[dropped]
