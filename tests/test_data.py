"""Data layer: loading and validation, assistant-only tokenization, subsets, the task generator,
the shipped tokenizer."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest

from fishertune.data import (
    build_tiny_tokenizer,
    check_response,
    ensure_chat_template,
    generate_splits,
    load_conversations,
    load_tiny_tokenizer,
    reference_answer,
    stratified_subsample,
    tokenize_conversation,
    tokenize_dataset,
)
from fishertune.data.chat import check_conversations
from fishertune.data.instructions import INSTRUCTION_CHECKERS, loose_variants
from fishertune.data.options import DataOptions
from fishertune.data.tokenizer import tiny_tokenizer_dir
from fishertune.errors import FishertuneError

EOS = "</s>"


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # The built-in tasks are generated into $FISHERTUNE_CACHE: keep tests off the user's cache.
    old = os.environ.get("FISHERTUNE_CACHE")
    os.environ["FISHERTUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("FISHERTUNE_CACHE", None)
    else:
        os.environ["FISHERTUNE_CACHE"] = old


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def splits():
    return generate_splits(train=600, validation=100, test=100, seed=0)


def conv(*turns: tuple[str, str], source: str | None = None) -> dict:
    row: dict = {"messages": [{"role": r, "content": c} for r, c in turns]}
    if source is not None:
        row["source"] = source
    return row


MULTI = conv(
    ("system", "Answer briefly."),
    ("user", "What is 12 + 7?"),
    ("assistant", "19"),
    ("user", "Now reverse the word 'lemon'."),
    ("assistant", "nomel"),
    ("user", "List the words in 'cat dog'."),
    ("assistant", "cat, dog"),
)["messages"]


def masked_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = 0
    for token, m in zip(ids, mask, strict=True):
        if m and not previous:
            runs.append([])
        if m:
            runs[-1].append(token)
        previous = m
    return runs


# --------------------------------------------------------------------------------------------
# Assistant-only labels


@pytest.mark.parametrize("use_offsets", [True, False])
def test_labels_cover_exactly_the_assistant_content_and_eos(tok, use_offsets) -> None:
    out = tokenize_conversation(tok, MULTI, None, use_offsets=use_offsets)
    ids, mask = out["input_ids"], out["assistant_masks"]
    # Each run of labelled tokens decodes to one assistant message plus its end-of-turn token.
    runs = [tok.decode(run, skip_special_tokens=False) for run in masked_runs(ids, mask)]
    assistant = [m["content"] for m in MULTI if m["role"] == "assistant"]
    assert runs == [a + EOS for a in assistant]
    # The full sequence is the chat template's own tokenization, and the unlabelled tokens are
    # exactly the rest of the rendering.
    rendered = tok.apply_chat_template(MULTI, tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False) == rendered
    rest = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    expected_rest = rendered
    for a in assistant:
        expected_rest = expected_rest.replace(a + EOS, "", 1)
    assert rest == expected_rest
    # Agrees with transformers' mask from the template's {% generation %} markers.
    ref = tok.apply_chat_template(MULTI, return_assistant_tokens_mask=True, return_dict=True)
    assert ref["input_ids"] == ids and list(ref["assistant_masks"]) == mask


def test_tulu_template_installed_and_labels_include_eos(tok) -> None:
    plain = load_tiny_tokenizer()
    plain.chat_template = None
    ensure_chat_template(plain)
    assert plain.chat_template.startswith("{{ bos_token }}")
    out = tokenize_conversation(plain, MULTI, None)
    runs = [plain.decode(r) for r in masked_runs(out["input_ids"], out["assistant_masks"])]
    assert runs == ["19" + EOS, "nomel" + EOS, "cat, dog" + EOS]
    text = plain.apply_chat_template(MULTI, tokenize=False)
    assert text.startswith("<s><|system|>\nAnswer briefly.\n<|user|>\n")
    assert text.endswith("<|assistant|>\ncat, dog</s>")
    # A tokenizer that has a template keeps it.
    before = tok.chat_template
    assert ensure_chat_template(tok).chat_template == before


def test_tokenize_dataset_multi_turn_and_truncation(tok, caplog) -> None:
    long_answer = " ".join(["apple"] * 40)
    rows = [
        conv(("user", "Say it."), ("assistant", "19"), source="a"),
        conv(("user", " ".join(["tree"] * 30)), ("assistant", long_answer), source="b"),
        {"messages": MULTI, "source": "c"},
    ]
    ds = datasets.Dataset.from_list(rows)
    full = tokenize_dataset(ds, tok, 10_000)
    assert full.column_names == ["source", "input_ids", "assistant_masks"]
    assert len(masked_runs(full[2]["input_ids"], full[2]["assistant_masks"])) == 3
    prompt = tok.apply_chat_template(
        rows[1]["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    prompt_len = len(tok(prompt)["input_ids"])
    max_length = prompt_len + 3  # row 1 keeps 3 labelled tokens, the others are shorter
    short_len = len(full[0]["input_ids"])
    assert short_len < max_length
    with caplog.at_level(logging.WARNING):
        cut = tokenize_dataset(ds, tok, max_length)
    assert len(cut) == 3
    assert [len(r) for r in cut["input_ids"]] == [
        min(len(r), max_length) for r in full["input_ids"]
    ]
    for a, b in zip(cut, full, strict=True):
        assert a["input_ids"] == b["input_ids"][:max_length]
        assert a["assistant_masks"] == b["assistant_masks"][:max_length]
    assert sum(cut[1]["assistant_masks"]) == 3
    # Truncating inside the prompt of row 1 drops it (with a warning counting it).
    with caplog.at_level(logging.WARNING):
        dropped = tokenize_dataset(ds, tok, prompt_len)
    assert dropped["source"] == ["a", "c"]
    assert "dropped 1 of 3" in caplog.text


def test_every_label_truncated_away_is_an_error(tok) -> None:
    ds = datasets.Dataset.from_list([conv(("user", "hi there"), ("assistant", "ok"))] * 3)
    pattern = r"all 3 rows were dropped at max_length=4 \(no_label_after_truncation 3\)"
    with pytest.raises(FishertuneError, match=pattern):
        tokenize_dataset(ds, tok, 4)
    with pytest.raises(FishertuneError, match="max_length"):
        tokenize_dataset(ds, tok, 0)


# --------------------------------------------------------------------------------------------
# Stratified subsets


def test_stratified_subsample_proportions_and_seed() -> None:
    sizes = {"flan": 400, "math": 120, "code": 37, "tiny": 3}
    rows = [{"id": i, "source": s} for s, n in sizes.items() for i in range(n)]
    ds = datasets.Dataset.from_list(rows)
    for fraction in (0.01, 0.1, 0.5):
        sub = stratified_subsample(ds, fraction, seed=3)
        counts = Counter(sub["source"])
        # round-half-up of fraction * n, at least one per stratum
        expected = {s: max(1, int(fraction * n + 0.5)) for s, n in sizes.items()}
        assert counts == expected
    a = stratified_subsample(ds, 0.1, seed=3)
    b = stratified_subsample(ds, 0.1, seed=3)
    c = stratified_subsample(ds, 0.1, seed=4)
    key = lambda d: list(zip(d["source"], d["id"], strict=True))  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)
    assert len(set(key(a))) == len(a)  # without replacement
    assert len(stratified_subsample(ds, 1.0, seed=0)) == len(ds)
    no_key = stratified_subsample(ds.remove_columns("source"), 0.25, seed=0)
    assert len(no_key) == 140
    with pytest.raises(FishertuneError, match="fraction"):
        stratified_subsample(ds, 0.0, seed=0)
    with pytest.raises(FishertuneError, match="fraction"):
        stratified_subsample(ds, 1.5, seed=0)


# --------------------------------------------------------------------------------------------
# Generator and checkers


def prompts(examples) -> set[tuple[str, ...]]:
    return {tuple(m["content"] for m in e["messages"] if m["role"] == "user") for e in examples}


def test_generator_is_deterministic_and_splits_disjoint(splits) -> None:
    again = generate_splits(train=600, validation=100, test=100, seed=0)
    assert again == splits
    other = generate_splits(train=600, validation=100, test=100, seed=1)
    assert other["test"] != splits["test"]
    keys = {name: prompts(rows) for name, rows in splits.items()}
    assert [len(keys[s]) for s in ("train", "validation", "test")] == [600, 100, 100]
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    # Evaluation splits do not move when the training split grows.
    bigger = generate_splits(train=900, validation=100, test=100, seed=0)
    assert bigger["test"] == splits["test"] and bigger["validation"] == splits["validation"]
    families = Counter(e["source"] for e in splits["train"])
    assert set(families) == {"arithmetic", "string", "format", "multi_turn"}
    assert any(len(e["messages"]) >= 4 for e in splits["train"])  # multi-turn present


def test_reference_answers_pass_their_own_checks(splits) -> None:
    rows = [e for rows in splits.values() for e in rows]
    with_rules = 0
    for example in rows:
        verdict = check_response(example, reference_answer(example))
        assert verdict["exact_match"], example
        if example["check"]["instructions"]:
            with_rules += 1
            assert verdict["strict"] and verdict["loose"], example
    used = {i["id"] for e in rows for i in e["check"]["instructions"]}
    assert used == set(INSTRUCTION_CHECKERS)  # every rule is exercised
    assert with_rules > 100


def _inst(name: str, **kwargs) -> dict:
    return {"id": f"{name}", "kwargs": kwargs}


# (instruction, kwargs, responses that follow it, responses that do not)
CHECKER_CASES = [
    ("change_case:english_lowercase", {}, ["nomel", "cat, dog"], ["Nomel", "CAT"]),
    ("change_case:english_capital", {}, ["LEMON", "CAT, DOG 3"], ["Lemon", "cat"]),
    ("startend:quotation", {}, ['"19"', '  "a b"  '], ["19", '"19', '"']),
    (
        "startend:end_checker",
        {"end_phrase": "That is all."},
        ["19 That is all.", '"19 that is all."'],
        ["That is all. 19", "19 That is all"],
    ),
    ("keywords:existence", {"keywords": ["indeed"]}, ["Indeed: 19"], ["19", "inde ed"]),
    ("punctuation:no_comma", {}, ["cat dog"], ["cat, dog"]),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        ["* cat\n* dog", "- cat\n- dog"],
        ["* cat", "* cat\n* dog\n* owl", "cat, dog"],
    ),
    ("detectable_format:json_format", {}, ['{"answer": 7}', '```json\n{"a": 1}\n```'], ["7 }"]),
    ("detectable_format:title", {}, ["<<answer>>\n7"], ["<<>>\n7", "answer 7", "<answer>"]),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        ["7\nP.S. Done.", "7\np.s. ok"],
        ["7", "7 PS done"],
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "good", "bad"), CHECKER_CASES)
def test_each_checker_on_hand_written_responses(name, kwargs, good, bad) -> None:
    check = INSTRUCTION_CHECKERS[name]
    for response in good:
        assert check(response, kwargs), (name, response)
    for response in bad:
        assert not check(response, kwargs), (name, response)


def test_check_response_strict_loose_and_exact() -> None:
    example = {
        "messages": [
            {"role": "user", "content": "Sort: dog, cat. Answer in all lowercase letters."},
            {"role": "assistant", "content": "cat, dog"},
        ],
        "check": {"instructions": [_inst("change_case:english_lowercase")]},
    }
    assert check_response(example, " cat, dog ") == {
        "exact_match": True,
        "strict": True,
        "loose": True,
    }
    # A first line in capitals fails strict; loose drops the first line and passes.
    assert check_response(example, "Sure!\ncat, dog") == {
        "exact_match": False,
        "strict": False,
        "loose": True,
    }
    assert check_response(example, "") == {"exact_match": False, "strict": False, "loose": False}
    assert len(loose_variants("a\n*b*\nc")) == 8
    plain = {"messages": example["messages"]}
    assert check_response(plain, "cat, dog") == {"exact_match": True}
    bad = {**example, "check": {"instructions": [_inst("no:such")]}}
    with pytest.raises(FishertuneError, match="unknown instruction id 'no:such'"):
        check_response(bad, "x")


# --------------------------------------------------------------------------------------------
# Tokenizer


def test_tiny_tokenizer_round_trips_generated_text(tok, splits) -> None:
    assert len(tok) == 1024
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"]) == [3, 4, 5]
    total_tokens = total_chars = 0
    for example in splits["train"][:300] + splits["test"]:
        for message in example["messages"]:
            ids = tok(message["content"])["input_ids"]
            assert tok.decode(ids) == message["content"]
            total_tokens += len(ids)
            total_chars += len(message["content"])
        text = tok.apply_chat_template(example["messages"], tokenize=False)
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=False) == text
    assert total_chars / total_tokens > 2.0  # BPE merges learned: not one token per character
    # Byte-level: text outside the training corpus survives too; digits are one token each.
    for text in ("naïve café 😀", "12345"):
        assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok("12345")["input_ids"]) == 5


def test_tokenizer_rebuild_is_byte_identical(tmp_path) -> None:
    build_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (tiny_tokenizer_dir() / name).read_bytes(), name


# --------------------------------------------------------------------------------------------
# Loading


ROWS = [
    conv(("user", "What is 1 + 1?"), ("assistant", "2"), source="arith"),
    conv(("system", "Be brief."), ("user", "Reverse 'cat'."), ("assistant", "tac"), source="str"),
]


def test_builtin_tiny_tasks() -> None:
    test = load_conversations("builtin:tiny-tasks", "test")
    validation = load_conversations("builtin:tiny-tasks", "validation")
    train = load_conversations("builtin:tiny-tasks", "train")
    assert (len(train), len(validation), len(test)) == (2000, 200, 200)
    assert {"messages", "source", "check"} <= set(test.column_names)
    assert not prompts(test) & prompts(train)
    with pytest.raises(FishertuneError, match="no split 'dev'"):
        load_conversations("builtin:tiny-tasks", "dev")
    with pytest.raises(FishertuneError, match="unknown built-in dataset"):
        load_conversations("builtin:nope", "train")


def _check_rows(ds) -> None:
    assert ds["messages"] == [r["messages"] for r in ROWS]
    assert ds["source"] == ["arith", "str"]


def test_local_files_and_folders(tmp_path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    _check_rows(load_conversations(str(jsonl)))
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(ROWS))
    _check_rows(load_conversations(str(as_list)))
    as_field = tmp_path / "field.json"
    as_field.write_text(json.dumps({"data": ROWS}))
    _check_rows(load_conversations(str(as_field)))
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    _check_rows(load_conversations(str(parquet)))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text(jsonl.read_text())
    datasets.Dataset.from_list(ROWS[::-1]).to_parquet(str(folder / "validation.parquet"))
    _check_rows(load_conversations(str(folder), "train"))
    assert load_conversations(str(folder), "validation")["source"] == ["str", "arith"]
    with pytest.raises(FishertuneError, match=r"no test\.jsonl"):
        load_conversations(str(folder), "test")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_inputs_give_one_clear_line(tmp_path) -> None:
    """Malformed files are errors; with on_bad_rows=error so is the first unusable row, naming
    file, row and field."""
    good = json.dumps(ROWS[0])
    strict = DataOptions(on_bad_rows="error")
    cases = [
        (str(tmp_path / "missing.jsonl"), r"data file not found: .*missing\.jsonl"),
        (write(tmp_path / "a.jsonl", f"{good}\n{{oops\n"), r"a\.jsonl line 2: invalid JSON"),
        (
            write(tmp_path / "b.jsonl", f'{good}\n\n{{"prompt": "x"}}\n'),
            r"b\.jsonl line 3: field 'messages': missing \(bad_field\)",
        ),
        (
            write(
                tmp_path / "c.jsonl",
                json.dumps(conv(("user", "x"), ("bot", "y"))) + "\n",
            ),
            r"c\.jsonl line 1: field 'messages\[1\]\.role': unknown role 'bot'",
        ),
        (
            write(tmp_path / "d.json", json.dumps([ROWS[0], conv(("user", "x"))])),
            r"d\.json row 1: field 'messages': no assistant turn \(no_assistant_turn\)",
        ),
        (
            write(tmp_path / "e.jsonl", json.dumps({"messages": [{"role": "user"}]}) + "\n"),
            r"e\.jsonl line 1: field 'messages\[0\]': expected fields 'role' and 'content'",
        ),
        (write(tmp_path / "f.json", '[{"a": 1]'), r"f\.json line 1: invalid JSON"),
        (write(tmp_path / "g.csv", "a,b"), r"unsupported file type '\.csv'"),
        (write(tmp_path / "h.jsonl", '{"foo": 1}\n'), r"h\.jsonl line 1: cannot tell the data"),
    ]
    for source, pattern in cases:
        with pytest.raises(FishertuneError, match=pattern) as info:
            load_conversations(source, options=strict)
        assert "\n" not in str(info.value), str(info.value)


def test_empty_undecodable_and_bom_files(tmp_path) -> None:
    """No rows, bytes that are not UTF-8: one line naming file and line; a UTF-8 BOM (written
    by editors on Windows) loads like the same file without it."""
    good = json.dumps(ROWS[0])
    cases = [
        (
            write(tmp_path / "zero.jsonl", ""),
            r"zero\.jsonl: no conversations: .* empty \(0 bytes\)",
        ),
        (write(tmp_path / "blank.jsonl", "\n  \n\n"), r"blank\.jsonl: .* only blank lines"),
        (write(tmp_path / "zero.json", ""), r"zero\.json: no conversations"),
        (write(tmp_path / "obj.json", "{}"), r"obj\.json row 0: cannot tell the data format"),
        (write(tmp_path / "list.json", "[]"), r"list\.json: no conversations: the list is empty"),
    ]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(f"{good}\n".encode() + '{"messages": "caf\xe9"}\n'.encode("latin-1"))
    cases.append((str(latin), r"latin\.jsonl line 2 column 18: byte 0xe9 is not UTF-8"))
    whole = tmp_path / "latin.json"
    whole.write_bytes(b"[\n" + good.encode() + b",\n\xff]")
    cases.append((str(whole), r"latin\.json line 3 column 1: byte 0xff is not UTF-8"))
    for source, pattern in cases:
        for check in (load_conversations, check_conversations):
            with pytest.raises(FishertuneError, match=pattern) as info:
                check(source)
            assert "\n" not in str(info.value), str(info.value)
    bom = b"\xef\xbb\xbf"
    for name, text in (
        ("bom.jsonl", "\n".join(json.dumps(r) for r in ROWS)),
        ("bom.json", json.dumps(ROWS)),
    ):
        path = tmp_path / name
        path.write_bytes(bom + text.encode())
        check_conversations(str(path))
        assert load_conversations(str(path))["messages"] == [r["messages"] for r in ROWS]


def test_hub_name_goes_to_datasets_and_fails_cleanly(monkeypatch) -> None:
    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split))
        if name == "org/present":
            return datasets.Dataset.from_list(ROWS)
        raise ConnectionError("offline\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    _check_rows(load_conversations("org/present", "train"))
    with pytest.raises(FishertuneError, match=r"cannot load dataset 'org/absent' .*\(offline\)$"):
        load_conversations("org/absent", "train")
    assert calls == [("org/present", "train"), ("org/absent", "train")]
