"""Answer files for the judged benchmarks: AlpacaEval and MT-Bench.

These benchmarks are scored by an LLM judge outside this package, from answers generated here with
the model's own chat template (the template it was trained with: FastChat picks templates by model
name, and a wrong one moves MT-Bench scores by about 0.25). The question files are given by the
user; neither benchmark's data ships in its wheel.

Formats written:

* AlpacaEval ``model_outputs`` (``alpaca_eval evaluate --model_outputs FILE``): a JSON list of
  ``{"instruction", "output", "generator", "dataset"}``.
* MT-Bench ``model_answer`` JSONL (FastChat's ``gen_judgment.py`` reads
  ``data/mt_bench/model_answer/MODEL_ID.jsonl``): one line per question,
  ``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [...]}],
  "tstamp"}``.

The formats are written here rather than with FastChat / alpaca-eval because those packages pin
old dependencies (fschat: ``openai<1``) and are needed only by the judge, not to generate.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError

__all__ = [
    "FASTCHAT_TEMPERATURES",
    "alpacaeval_outputs",
    "export_answers",
    "generate_replies",
    "load_alpacaeval_questions",
    "load_mtbench_questions",
    "mtbench_answers",
    "write_alpacaeval",
    "write_mtbench",
]

# FastChat's llm_judge/common.py: sampling temperature per MT-Bench category (0 means greedy);
# categories not listed use 0.7, as its gen_model_answer.py does.
FASTCHAT_TEMPERATURES: dict[str, float] = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
FASTCHAT_DEFAULT_TEMPERATURE = 0.7


def _read_records(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list, or JSON Lines (one object per line); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FishertuneError(f"{path}: question file not found")
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as err:
            raise FishertuneError(f"{path}: invalid JSON: {err}") from err
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise FishertuneError(f"{path}:{number}: invalid JSON line: {err}") from err
    if not records or not all(isinstance(r, dict) for r in records):
        raise FishertuneError(f"{path}: expected a non-empty list of JSON objects")
    return records


def load_alpacaeval_questions(path: str | Path) -> list[dict[str, Any]]:
    """AlpacaEval instructions: JSON list or JSONL of objects with ``instruction``.

    ``dataset`` is kept when present (AlpacaEval's ``alpaca_eval.json`` carries it); other fields
    (the reference ``output``, its ``generator``) are dropped.
    """
    records = _read_records(path)
    questions = []
    for index, record in enumerate(records):
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction:
            raise FishertuneError(f"{path}: record {index} has no string field 'instruction'")
        questions.append({"instruction": instruction, "dataset": record.get("dataset", "")})
    return questions


def load_mtbench_questions(path: str | Path) -> list[dict[str, Any]]:
    """MT-Bench questions (FastChat's ``question.jsonl``): ``question_id``, ``category``,
    ``turns`` (a list of user messages)."""
    records = _read_records(path)
    for index, record in enumerate(records):
        turns = record.get("turns")
        if "question_id" not in record:
            raise FishertuneError(f"{path}: record {index} has no 'question_id'")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise FishertuneError(
                f"{path}: record {index} (question_id {record['question_id']}): 'turns' must be "
                "a non-empty list of strings"
            )
    return records


def generate_replies(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    temperature: float = 0.0,
) -> list[str]:
    """The model's next assistant message for each conversation, through its chat template.

    Batched with left padding; greedy when ``temperature`` is 0, sampling otherwise (seed torch
    beforehand for reproducible samples). Decoding stops at the tokenizer's EOS or the model's
    ``generation_config.eos_token_id``; special tokens are removed from the text.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer, with a chat template.
        conversations: message lists ending with a user turn.
        max_new_tokens: generation budget per reply.
        batch_size: conversations per ``generate`` call.
        temperature: sampling temperature.
    """
    import torch

    if not getattr(tokenizer, "chat_template", None):
        raise FishertuneError(
            "the tokenizer has no chat template: answers must be generated with the template the "
            "model was trained with (save the training tokenizer with the model)"
        )
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    sampling = temperature >= 1e-4  # FastChat's rule: below that, greedy
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sampling}
    if sampling:
        options["temperature"] = temperature
    else:  # override sampling defaults a model's generation_config may carry
        options.update(temperature=None, top_p=None, top_k=None)
    replies: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            prompts = [
                tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                for c in chunk
            ]
            # The template already writes BOS where the model expects one.
            batch = tokenizer(
                prompts, return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            with torch.no_grad():
                output = model.generate(
                    **batch, pad_token_id=tokenizer.pad_token_id, **options
                )  # (b, prompt_len + new)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            replies += [
                text.strip()
                for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            ]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def alpacaeval_outputs(
    model: Any,
    tokenizer: Any,
    questions: Sequence[dict[str, Any]],
    *,
    generator: str,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """AlpacaEval ``model_outputs`` records (greedy decoding), in the questions' order."""
    conversations = [[{"role": "user", "content": q["instruction"]}] for q in questions]
    replies = generate_replies(
        model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return [
        {
            "instruction": q["instruction"],
            "output": reply,
            "generator": generator,
            "dataset": q.get("dataset", ""),
        }
        for q, reply in zip(questions, replies, strict=True)
    ]


def mtbench_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[dict[str, Any]],
    *,
    model_id: str,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    temperatures: dict[str, float] | None = None,
    greedy: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """MT-Bench answers in FastChat's ``model_answer`` format, one choice per question.

    Turn ``k`` of every question is generated after turn ``k - 1`` of the same question, with the
    earlier replies in the conversation, as FastChat's ``gen_model_answer.py`` does. Temperatures
    follow FastChat's per-category settings unless ``greedy``.
    """
    import torch

    temperatures = FASTCHAT_TEMPERATURES if temperatures is None else temperatures
    conversations: list[list[dict[str, str]]] = [[] for _ in questions]
    turns_out: list[list[str]] = [[] for _ in questions]
    generator = torch.Generator().manual_seed(seed)
    for turn in range(max(len(q["turns"]) for q in questions)):
        active = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        by_temperature: dict[float, list[int]] = {}
        for i in active:
            category = questions[i].get("category")
            t = 0.0 if greedy else temperatures.get(category, FASTCHAT_DEFAULT_TEMPERATURE)
            by_temperature.setdefault(float(t), []).append(i)
            conversations[i].append({"role": "user", "content": questions[i]["turns"][turn]})
        for t, members in sorted(by_temperature.items()):
            # Reseed per group from our own generator: answers do not depend on global RNG use.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            replies = generate_replies(
                model,
                tokenizer,
                [conversations[i] for i in members],
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                temperature=t,
            )
            for i, reply in zip(members, replies, strict=True):
                conversations[i].append({"role": "assistant", "content": reply})
                turns_out[i].append(reply)
    return [
        {
            "question_id": q["question_id"],
            "answer_id": uuid.uuid4().hex[:22],  # FastChat uses a 22-character shortuuid
            "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}],
            "tstamp": time.time(),
        }
        for q, turns in zip(questions, turns_out, strict=True)
    ]


def write_alpacaeval(path: str | Path, outputs: Sequence[dict[str, Any]]) -> Path:
    """Write AlpacaEval ``model_outputs`` (a JSON list)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(outputs), indent=2, ensure_ascii=False) + "\n")
    return path


def write_mtbench(path: str | Path, answers: Sequence[dict[str, Any]]) -> Path:
    """Write MT-Bench answers as JSON Lines, sorted by ``question_id`` as FastChat does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(answers, key=lambda a: a["question_id"])
    path.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in ordered))
    return path


def export_answers(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    model_id: str,
    alpacaeval_questions: str | Path | None = None,
    mtbench_questions: str | Path | None = None,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Path]:
    """Generate and write the answer files for the question files given.

    Files: ``OUT_DIR/alpaca_eval/model_outputs.json`` and
    ``OUT_DIR/mt_bench/model_answer/MODEL_ID.jsonl`` (FastChat's layout under its ``data/``).

    Returns:
        ``{"alpacaeval": path, "mtbench": path}`` for the files written.
    """
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    if alpacaeval_questions is not None:
        outputs = alpacaeval_outputs(
            model,
            tokenizer,
            load_alpacaeval_questions(alpacaeval_questions),
            generator=model_id,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        written["alpacaeval"] = write_alpacaeval(
            out_dir / "alpaca_eval" / "model_outputs.json", outputs
        )
    if mtbench_questions is not None:
        answers = mtbench_answers(
            model,
            tokenizer,
            load_mtbench_questions(mtbench_questions),
            model_id=model_id,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
        )
        written["mtbench"] = write_mtbench(
            out_dir / "mt_bench" / "model_answer" / f"{model_id}.jsonl", answers
        )
    return written
