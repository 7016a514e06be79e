"""Evaluation: offline scorer, lm-eval bridge, judge answer files, ``fishertune evaluate``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fishertune.cli import main as cli_main
from fishertune.data import load_conversations, load_tiny_tokenizer, tokenize_conversation
from fishertune.data.instructions import reference_answer
from fishertune.errors import FishertuneError
from fishertune.evaluation.export import (
    export_answers,
    generate_replies,
    load_alpacaeval_questions,
    load_mtbench_questions,
)
from fishertune.evaluation.offline import (
    METRIC_DESCRIPTIONS,
    METRICS,
    answer_statistics,
    evaluate_offline,
)
from fishertune.modeling import tiny_llama

MC_DOCS = [
    {"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "label": 1},
    {"question": "Reverse the letters of the word 'cat'.", "choices": ["tac", "cat"], "label": 0},
    {"question": "What is 3 * 3?", "choices": ["6", "9", "12"], "label": 1},
    {"question": "How many letters are in 'bird'?", "choices": ["4", "3", "5"], "label": 0},
    {"question": "Sort the letters of 'dog'.", "choices": ["dgo", "god", "odg"], "label": 0},
    {"question": "What is 7 - 2?", "choices": ["5", "4"], "label": 0},
]


@pytest.fixture(autouse=True, scope="module")
def _offline_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # No network: lm-eval and datasets must read local files only; built-in tasks go to a temp
    # cache instead of the user's.
    values = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "FISHERTUNE_CACHE": str(tmp_path_factory.mktemp("cache")),
        "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf_datasets")),
    }
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def make_model(tok, seed: int = 0):
    return tiny_llama(
        len(tok),
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        seed=seed,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ).eval()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tok, model) -> Path:
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_tasks")
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks


# --------------------------------------------------------------------------------------------
# Offline scorer


class ScriptedModel(nn.Module):
    """A causal LM whose ``generate`` replies with scripted text for known prompts.

    The forward pass is the wrapped model's, so the validation loss is a real one.
    """

    def __init__(self, inner: nn.Module, tok, replies: dict[str, str]) -> None:
        super().__init__()
        self.inner, self.tok, self.replies = inner, tok, replies
        self.prompts_seen: list[str] = []

    def forward(self, **kwargs):
        return self.inner(**kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tok.decode(ids[mask.bool()], skip_special_tokens=False)
            self.prompts_seen.append(prompt)
            reply = self.tok(self.replies[prompt])["input_ids"] + [self.tok.eos_token_id]
            rows.append(reply[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            new[i, : len(r)] = torch.tensor(r)
        return torch.cat([input_ids, new], dim=1)


def prompt_text(tok, example) -> str:
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return tok.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)


def test_metrics_declare_direction() -> None:
    assert set(METRICS) == set(METRIC_DESCRIPTIONS)
    assert METRICS == {
        "val_loss": False,
        "test_loss": False,
        "perplexity": False,
        "exact_match": True,
        "ifeval_strict": True,
        "ifeval_loose": True,
        "reply_length": True,
        "distinct_2": True,
    }


def test_answer_statistics_by_hand() -> None:
    """Bigrams "a b", "b a", "a b" (repeated), "c d": 3 distinct of 4; a one-word reply has none;
    lengths from the given counter."""
    result = answer_statistics(["a b a b", "c d", "e"], lambda r: len(r))
    assert result["distinct_2"] == pytest.approx(3 / 4)
    assert result["reply_length"] == pytest.approx((7 + 3 + 1) / 3)
    assert math.isnan(answer_statistics(["one"], len)["distinct_2"])


def test_offline_scores_known_answers(tok, model) -> None:
    n = 40
    test = load_conversations("builtin:tiny-tasks", "test").select(range(n))
    rows = [test[i] for i in range(n)]
    right = {prompt_text(tok, r): reference_answer(r) for r in rows}
    scores = evaluate_offline(
        ScriptedModel(model, tok, right), tok, limit=n, batch_size=7, max_new_tokens=64
    )
    assert scores["n_test"] == n
    assert scores["exact_match"] == 1.0
    assert scores["ifeval_strict"] == 1.0 and scores["ifeval_loose"] == 1.0
    answers = [reference_answer(r) for r in rows]
    lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]
    assert scores["reply_length"] == pytest.approx(sum(lengths) / n)
    pairs = [p for a in answers for p in zip(a.split(), a.split()[1:], strict=False)]
    assert scores["distinct_2"] == pytest.approx(len(set(pairs)) / len(pairs))

    silent = {p: "" for p in right}
    scores = evaluate_offline(ScriptedModel(model, tok, silent), tok, limit=n, batch_size=8)
    assert scores["exact_match"] == 0.0
    assert scores["ifeval_strict"] == 0.0 and scores["ifeval_loose"] == 0.0

    # Right on even rows only: the scores count exactly those rows.
    half = {
        prompt_text(tok, r): reference_answer(r) if i % 2 == 0 else "" for i, r in enumerate(rows)
    }
    scripted = ScriptedModel(model, tok, half)
    scores = evaluate_offline(scripted, tok, limit=n, batch_size=16)
    assert scores["exact_match"] == 0.5
    ruled = [i for i, r in enumerate(rows) if r["check"]["instructions"]]
    assert 0 < len(ruled) < n
    expected = sum(i % 2 == 0 for i in ruled) / len(ruled)
    assert scores["ifeval_strict"] == pytest.approx(expected)
    assert scores["ifeval_loose"] == pytest.approx(expected)
    assert sorted(scripted.prompts_seen) == sorted(right)  # every test prompt, once


def _manual_loss(tok, model, split: str, n: int) -> float:
    """Token-weighted CE over the assistant tokens of the first ``n`` rows, one row at a time in
    float64."""
    rows = load_conversations("builtin:tiny-tasks", split).select(range(n))
    total, count = 0.0, 0
    for row in rows:
        enc = tokenize_conversation(tok, row["messages"], 512)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()  # (L, V), one row, no padding
        for t in range(1, ids.shape[1]):
            if enc["assistant_masks"][t]:
                total -= float(torch.log_softmax(logits[t - 1], -1)[ids[0, t]])
                count += 1
    return total / count


def test_losses_only_without_generation(tok, model) -> None:
    """max_new_tokens=0: validation and test losses, no generation metric."""
    scores = evaluate_offline(model, tok, limit=6, batch_size=4, max_new_tokens=0)
    assert set(scores) == {"val_loss", "test_loss", "perplexity", "n_test"}
    assert scores["test_loss"] == pytest.approx(_manual_loss(tok, model, "test", 6), rel=1e-5)
    assert scores["val_loss"] == pytest.approx(_manual_loss(tok, model, "validation", 6), rel=1e-5)


def test_val_loss_matches_manual_cross_entropy(tok, model) -> None:
    n = 12
    manual = _manual_loss(tok, model, "validation", n)
    scores = evaluate_offline(model, tok, limit=n, batch_size=5, max_new_tokens=4)
    assert scores["val_loss"] == pytest.approx(manual, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(manual), rel=1e-5)
    # A random model of vocabulary 1024 is near log(1024) nats per token.
    assert abs(manual - math.log(len(tok))) < 1.0
    assert 0.0 <= scores["exact_match"] <= 1.0 and scores["n_test"] == n
    test = load_conversations("builtin:tiny-tasks", "test").select(range(n))
    if not any(row["check"]["instructions"] for row in test):  # nothing to score: NaN, not 0
        assert math.isnan(scores["ifeval_strict"]) and math.isnan(scores["ifeval_loose"])
    else:
        assert 0.0 <= scores["ifeval_strict"] <= scores["ifeval_loose"] <= 1.0


# --------------------------------------------------------------------------------------------
# lm-eval bridge


def test_lm_eval_local_task_matches_manual_loglikelihood(
    tok, saved_model, mc_task, tmp_path, monkeypatch, capfd
) -> None:
    from fishertune.evaluation.lmeval import run_lm_eval

    monkeypatch.chdir(tmp_path)  # outside a git checkout, where lm-eval's `git describe` fails
    out = run_lm_eval(
        str(saved_model), ["tiny_mc"], include_path=[mc_task], device="cpu", log_samples=True
    )
    assert "not a git repository" not in capfd.readouterr().err
    acc = out["metrics"]["tiny_mc/acc"]
    assert 0.0 <= acc <= 1.0
    assert out["higher_is_better"]["tiny_mc/acc"] is True
    assert out["n_samples"]["tiny_mc"] == len(MC_DOCS)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    correct = 0
    for doc, sample in zip(MC_DOCS, samples, strict=True):
        context = tok.apply_chat_template(
            [{"role": "user", "content": doc["question"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        # The chat template was applied: each request is (templated prompt, choice).
        assert [tuple(a) for a in sample["arguments"]] == [(context, c) for c in doc["choices"]]
        scores = []
        for choice in doc["choices"]:
            # lm-eval moves the context's trailing whitespace into the continuation, tokenizes
            # the whole text and scores the tokens after those of the stripped context.
            whole = tok(context + choice)["input_ids"]
            start = len(tok(context.rstrip())["input_ids"])
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(start, len(whole))))
        lm_scores = [r[0][0] for r in sample["resps"]]
        assert lm_scores == pytest.approx(scores, abs=1e-4)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert acc == pytest.approx(correct / len(MC_DOCS))


def test_lm_eval_unknown_task_names_close_ones(mc_task) -> None:
    from fishertune.evaluation.lmeval import parse_model_args, run_lm_eval

    with pytest.raises(FishertuneError, match=r"unknown lm-eval task 'tiny_mcq'.*tiny_mc"):
        run_lm_eval("unused", ["tiny_mcq"], include_path=[mc_task])
    assert parse_model_args("dtype=float32, trust_remote_code=True") == {
        "dtype": "float32",
        "trust_remote_code": "True",
    }
    with pytest.raises(FishertuneError, match="key=value"):
        parse_model_args("dtype")


# --------------------------------------------------------------------------------------------
# Judge answer files


@pytest.fixture(scope="module")
def question_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("questions")
    alpaca = root / "alpaca_eval.json"
    alpaca.write_text(
        json.dumps(
            [
                {
                    "instruction": "What is 2 + 3?",
                    "output": "5",
                    "generator": "ref",
                    "dataset": "x",
                },
                {"instruction": "Reverse the word 'owl'.", "dataset": "y"},
                {"instruction": "List the words in 'cat dog'."},
            ]
        )
    )
    mtbench = root / "question.jsonl"
    questions = [
        {"question_id": 82, "category": "math", "turns": ["What is 4 * 3?", "Now add 1."]},
        {"question_id": 81, "category": "reasoning", "turns": ["Sort 'bca'.", "Reverse it."]},
    ]
    mtbench.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return alpaca, mtbench


def greedy(model, tok, messages, max_new_tokens: int) -> str:
    """One reply, generated alone (no padding), as a reference for the batched exports."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_export_formats(tok, model, question_files, tmp_path) -> None:
    alpaca, mtbench = question_files
    written = export_answers(
        model,
        tok,
        tmp_path,
        model_id="tiny-model",
        alpacaeval_questions=alpaca,
        mtbench_questions=mtbench,
        max_new_tokens=6,
        batch_size=2,
    )
    assert written == {
        "alpacaeval": tmp_path / "alpaca_eval" / "model_outputs.json",
        "mtbench": tmp_path / "mt_bench" / "model_answer" / "tiny-model.jsonl",
    }
    outputs = json.loads(written["alpacaeval"].read_text())
    instructions = [q["instruction"] for q in json.loads(alpaca.read_text())]
    assert [o["instruction"] for o in outputs] == instructions
    assert [o["dataset"] for o in outputs] == ["x", "y", ""]
    for record in outputs:
        assert set(record) == {"instruction", "output", "generator", "dataset"}
        assert record["generator"] == "tiny-model"
        # Batched left-padded generation gives the reply the prompt gets alone.
        alone = greedy(model, tok, [{"role": "user", "content": record["instruction"]}], 6)
        assert record["output"] == alone

    lines = written["mtbench"].read_text().splitlines()
    answers = [json.loads(line) for line in lines]
    assert [a["question_id"] for a in answers] == [81, 82]  # sorted, as FastChat writes them
    for answer in answers:
        assert set(answer) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert answer["model_id"] == "tiny-model" and len(answer["answer_id"]) == 22
        assert len(answer["choices"]) == 1 and answer["choices"][0]["index"] == 0
        assert len(answer["choices"][0]["turns"]) == 2
    # "math" is greedy in FastChat: turn 2 is generated after turn 1 and its reply.
    math_q = answers[1]
    first = greedy(model, tok, [{"role": "user", "content": "What is 4 * 3?"}], 6)
    assert math_q["choices"][0]["turns"][0] == first
    second = greedy(
        model,
        tok,
        [
            {"role": "user", "content": "What is 4 * 3?"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Now add 1."},
        ],
        6,
    )
    assert math_q["choices"][0]["turns"][1] == second


def test_generate_replies_restores_tokenizer_and_model_state(tok, model) -> None:
    model.train()
    side = tok.padding_side
    replies = generate_replies(model, tok, [[{"role": "user", "content": "hi"}]], max_new_tokens=3)
    assert len(replies) == 1 and model.training and tok.padding_side == side
    model.eval()


def test_bad_question_files(tmp_path) -> None:
    missing = tmp_path / "none.json"
    with pytest.raises(FishertuneError, match="question file not found"):
        load_alpacaeval_questions(missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["a"]}\n{oops\n')
    with pytest.raises(FishertuneError, match=r"bad\.jsonl:2: invalid JSON line"):
        load_mtbench_questions(bad)
    no_turns = tmp_path / "q.jsonl"
    no_turns.write_text('{"question_id": 7, "turns": []}\n')
    with pytest.raises(FishertuneError, match=r"question_id 7\): 'turns'"):
        load_mtbench_questions(no_turns)
    no_instruction = tmp_path / "a.json"
    no_instruction.write_text('[{"output": "x"}]')
    with pytest.raises(FishertuneError, match="record 0 has no string field 'instruction'"):
        load_alpacaeval_questions(no_instruction)


# --------------------------------------------------------------------------------------------
# `fishertune evaluate`


def test_cli_end_to_end(saved_model, mc_task, question_files, tmp_path, capsys) -> None:
    alpaca, mtbench = question_files
    output = tmp_path / "out" / "evaluation.json"
    argv = [
        "evaluate",
        "--model", str(saved_model),
        "--tasks", "offline,tiny_mc",
        "--output", str(output),
        "--seed", "3",
        "--limit", "6",
        "--batch_size", "4",
        "--max_new_tokens", "4",
        "--max_length", "128",
        "--device", "cpu",
        "--include_path", str(mc_task),
        "--alpacaeval_questions", str(alpaca),
        "--mtbench_questions", str(mtbench),
        "--answers_dir", str(tmp_path / "answers"),
        "--model_id", "run-a",
        "--answer_max_new_tokens", "3",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(output.read_text())
    assert set(result) == {"metrics", "higher_is_better", "meta"}
    metrics = result["metrics"]
    # The first 6 test rows carry no formatting instruction: IFEval accuracy is undefined there,
    # left out of the metrics (JSON has no NaN) and named in meta.
    undefined = ["offline/ifeval_loose", "offline/ifeval_strict"]
    assert result["meta"]["undefined_metrics"] == undefined
    expected = {"offline/val_loss", "offline/perplexity", "offline/exact_match", "offline/n_test"}
    assert expected | {"tiny_mc/acc"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["offline/n_test"] == 6
    assert 0 <= metrics["tiny_mc/acc"] <= 1
    assert metrics["offline/perplexity"] == pytest.approx(math.exp(metrics["offline/val_loss"]))
    directions = result["higher_is_better"]
    assert directions["offline/val_loss"] is False and directions["tiny_mc/acc"] is True
    assert result["meta"]["seed"] == 3 and result["meta"]["tasks"] == ["offline", "tiny_mc"]
    assert "offline/val_loss" in printed and "tiny_mc/acc" in printed
    assert (tmp_path / "answers" / "alpaca_eval" / "model_outputs.json").is_file()
    assert (tmp_path / "answers" / "mt_bench" / "model_answer" / "run-a.jsonl").is_file()
    assert not [p for p in output.parent.iterdir() if p.name != output.name]  # no temp file left

    # The same offline scores as calling the scorer directly.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(saved_model)
    direct = evaluate_offline(
        model, AutoTokenizer.from_pretrained(saved_model), limit=6, max_new_tokens=4,
        batch_size=4, max_length=128,
    )  # fmt: skip
    for key, value in direct.items():
        if math.isnan(value):
            assert f"offline/{key}" in undefined
        else:
            assert metrics[f"offline/{key}"] == pytest.approx(value, rel=1e-6)


def test_cli_errors_are_one_line(tmp_path, saved_model, capsys) -> None:
    out = str(tmp_path / "e.json")
    assert cli_main(["evaluate", "--model", str(tmp_path / "nope"), "--output", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and "no config.json" in err
    assert err.count("\n") == 1
    argv = ["evaluate", "--model", str(saved_model), "--output", out, "--batch_size", "0"]
    assert cli_main(argv) == 2
    assert "--batch_size must be positive" in capsys.readouterr().err
    assert not Path(out).exists()


def test_nonfinite_model_or_loss_is_an_error(tmp_path, tok, capsys) -> None:
    """A diverged model (NaN weights) or one whose outputs overflow (finite weights, non-finite
    val_loss) exits non-zero with one line, and no score file looks like a result."""
    cases = {"nan": ("hold NaN or inf", math.nan), "huge": ("non-finite offline/", 3e38)}
    for name, (message, value) in cases.items():
        model = make_model(tok)
        with torch.no_grad():
            model.model.norm.weight.fill_(value)
        folder = tmp_path / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out = tmp_path / f"{name}.json"
        argv = ["evaluate", "--model", str(folder), "--output", str(out), "--limit", "2",
                "--max_new_tokens", "2"]  # fmt: skip
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: --model") and message in err, err
        assert not out.exists()


def test_hub_only_lm_eval_task_offline_is_one_line(
    saved_model, mc_task, tmp_path, monkeypatch, capsys
):
    """lm-eval's built-in tasks fetch their data from the hub: offline that is one line saying
    so, not a ConnectionError traceback (the error below is the one datasets raises)."""
    import lm_eval

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    out = tmp_path / "e.json"
    # (--include_path only shares the task index built for the other lm-eval tests)
    argv = ["evaluate", "--model", str(saved_model), "--tasks", "mmlu", "--output", str(out),
            "--include_path", str(mc_task)]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: lm-eval task mmlu: its data comes from the Hugging Face hub")
    assert "cais/mmlu" in err and not out.exists()


def _chat_rows(path: Path, start: int, count: int) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                      {"role": "assistant", "content": f"{i + 1}"}]}
        for i in range(start, start + count)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trained_run(saved_model: Path, folder: Path, data: Path) -> Path:
    """A copy of the model as `fishertune train` leaves a run folder trained on ``data``: its
    run record names the data with the fingerprint the trainer records."""
    import shutil

    from fishertune.training.output_dir import _data_fingerprint

    shutil.copytree(saved_model, folder)
    settings = {"dataset_name": str(data), "dataset_train_split": "train",
                "data_sha256": _data_fingerprint(str(data))}  # fmt: skip
    record = {"status": "completed", "settings": settings}
    (folder / "fishertune_run.json").write_text(json.dumps(record))
    return folder


def test_evaluate_says_first_what_it_scores(saved_model, tmp_path, capsys) -> None:
    out = tmp_path / "e.json"
    argv = ["evaluate", "--model", str(saved_model), "--output", str(out), "--limit", "3",
            "--max_new_tokens", "0", "--device", "cpu"]  # fmt: skip
    assert cli_main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(
        f"evaluating {saved_model}: offline scores validation: 3 rows of "
        "builtin:tiny-tasks (the built-in generated tasks, split validation)"
    )
    assert "test: 3 rows of builtin:tiny-tasks" in first, first
    scored = json.loads(out.read_text())["meta"]["scored"]
    assert scored["test"]["rows"] == 3 and "split test" in scored["test"]["source"]

    held_out = _chat_rows(tmp_path / "val.jsonl", 100, 5)
    test = _chat_rows(tmp_path / "test.jsonl", 200, 4)
    argv = ["evaluate", "--model", str(saved_model), "--output", str(out), "--max_new_tokens",
            "0", "--validation_file", str(held_out), "--test_file", str(test)]  # fmt: skip
    assert cli_main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"validation: 5 rows of {held_out} (the whole file)" in first, first
    assert f"test: 4 rows of {test} (the whole file)" in first, first


def test_evaluate_refuses_the_training_rows_unless_allowed(saved_model, tmp_path, capsys):
    """The run's training file (by path, by contents under another name, from a checkpoint of
    the run) is not scored as validation or test unless --allow_training_data says so; other
    rows are."""
    train = _chat_rows(tmp_path / "alpaca.jsonl", 0, 6)
    run = _trained_run(saved_model, tmp_path / "run", train)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(train.read_bytes())
    (run / "checkpoint-2").mkdir()
    for name in ("config.json", "model.safetensors"):
        (run / "checkpoint-2" / name).write_bytes((run / name).read_bytes())
    out = tmp_path / "e.json"
    base = ["evaluate", "--output", str(out), "--max_new_tokens", "0", "--device", "cpu"]
    refused = [
        (["--model", str(run), "--dataset", str(train)], "--dataset", "the same file"),
        (["--model", str(run), "--dataset", str(copy)], "--dataset", "the same contents"),
        (["--model", str(run), "--test_file", str(train)], "--test_file", "the same file"),
        (
            ["--model", str(run / "checkpoint-2"), "--dataset", str(train)],
            "--dataset",
            "the same file",
        ),
    ]
    for extra, option, reason in refused:
        assert cli_main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {option} ") and err.count("\n") == 1, err
        assert f"rows {run} was trained on ({reason}" in err and "--allow_training_data" in err
        assert not out.exists()
    assert cli_main([*base, "--model", str(run), "--dataset", str(train),
                     "--allow_training_data"]) == 0  # fmt: skip
    first = capsys.readouterr().out.splitlines()[0]
    assert f"validation and test: the same 6 rows of {train} (the whole file)" in first, first
    assert "are training rows" in first
    assert json.loads(out.read_text())["meta"]["training_rows"] == ["validation", "test"]
    held_out = _chat_rows(tmp_path / "held_out.jsonl", 50, 3)
    assert cli_main([*base, "--model", str(run), "--dataset", str(held_out)]) == 0
    assert "training_rows" not in json.loads(out.read_text())["meta"]
