"""``fishertune evaluate``: score a saved model offline, with lm-eval, and export judge answers.

Examples::

    # offline verifiable tasks (no network): val loss, exact match, IFEval-style rules
    fishertune evaluate --model runs/token-f-seed0 --tasks offline --output eval.json
    # your own held-out rows (refused if they are the run's training data)
    fishertune evaluate --model runs/token-f-seed0 --validation_file val.jsonl \
        --test_file test.jsonl --output eval.json
    # lm-evaluation-harness tasks, through the model's chat template
    fishertune evaluate --model runs/token-f-seed0 --tasks mmlu,ifeval,truthfulqa_mc2 \\
        --output eval.json --batch_size 16
    # answer files for the LLM-judged benchmarks (question files given by the user)
    fishertune evaluate --model runs/token-f-seed0 --tasks offline --output eval.json \\
        --alpacaeval_questions alpaca_eval.json --mtbench_questions question.jsonl \\
        --answers_dir runs/token-f-seed0/answers --model_id token-f-seed0

``--tasks`` is a comma list: ``offline`` runs ``fishertune.evaluation.offline``; every other name
goes to lm-evaluation-harness (built-in tasks, or tasks under ``--include_path``, repeatable).

Output file (written atomically: a temporary file in the same folder, then renamed)::

    {
      "metrics": {"offline/val_loss": 1.93, "offline/exact_match": 0.41, ...,
                  "mmlu/acc": 0.25, "ifeval/prompt_level_strict_acc": 0.2, ...},
      "higher_is_better": {"offline/val_loss": false, "mmlu/acc": true, ...},
      "meta": {"model": "...", "tasks": [...], "seed": 0, "limit": null, "dataset": "...",
               "lm_eval_versions": {...}, "n_samples": {...}, "answers": {"alpacaeval": "..."},
               "wall_time_s": 12.3}
    }

Metric names are ``task/metric`` (``task/metric:filter`` for an lm-eval filter other than
``none``); every value in ``metrics`` is a finite float. A metric that is undefined on the data
(IFEval accuracy on a test subset with no instruction) is left out and named in
``meta["undefined_metrics"]`` (and a warning is printed). A non-finite offline loss, or a model
with NaN / inf weights, is an error: the command exits non-zero and writes nothing.

Judging the exported answers (outside this package, with the judges' own installs):

* AlpacaEval 2 (length-controlled win rate against GPT-4 Turbo, needs ``OPENAI_API_KEY``)::

      pip install alpaca-eval
      alpaca_eval evaluate --model_outputs ANSWERS_DIR/alpaca_eval/model_outputs.json \\
          --annotators_config weighted_alpaca_eval_gpt4_turbo

* MT-Bench (FastChat's ``llm_judge``, GPT-4 single-answer grading): copy
  ``ANSWERS_DIR/mt_bench/model_answer/MODEL_ID.jsonl`` to
  ``FastChat/fastchat/llm_judge/data/mt_bench/model_answer/``, then in ``fastchat/llm_judge``::

      python gen_judgment.py --model-list MODEL_ID --parallel 2
      python show_result.py --model-list MODEL_ID

  The answers were generated with the model's own chat template (the training one), not the one
  FastChat would pick by model name.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from fishertune.data.options import DataOptions, add_data_arguments
from fishertune.errors import FishertuneError
from fishertune.files import write_json_atomic
from fishertune.modeling import ADAPTER_CONFIG, DTYPES, is_adapter_folder

__all__ = ["build_parser", "main"]

OFFLINE = "offline"
BUILTIN_DATASET = "builtin:tiny-tasks"
DEFAULT_MAX_LENGTH = 512  # offline scoring's truncation unless --max_length says


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value if value < 1 else int(value)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fishertune evaluate``."""
    p = argparse.ArgumentParser(
        prog="fishertune evaluate",
        description="Evaluate a saved model: offline tasks, lm-eval tasks, judge answer files.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="saved model folder (model + tokenizer), or a LoRA run folder (its base is loaded "
        "with the adapter)",
    )
    p.add_argument(
        "--tasks",
        default=OFFLINE,
        help="comma list: 'offline' and/or lm-eval task names (mmlu,ifeval,truthfulqa_mc2)",
    )
    p.add_argument("--output", required=True, help="JSON file to write the scores to")
    p.add_argument("--seed", type=int, default=0, help="seed of python/numpy/torch and lm-eval")
    p.add_argument(
        "--limit", type=_limit, default=None, help="examples per task: an int or a fraction < 1"
    )
    p.add_argument("--batch_size", type=int, default=8, help="batch size of every stage")
    p.add_argument(
        "--max_new_tokens",
        type=int,
        default=64,
        help="offline: generation budget per test reply (0: losses only)",
    )
    p.add_argument("--max_length", type=int, default=None, help="truncation length (tokens)")
    p.add_argument(
        "--dataset",
        default=None,
        help="offline: the data scored: a folder with validation and test files, a hub dataset "
        "with those splits, or one file (read whole for both). Default builtin:tiny-tasks, the "
        "generated tasks",
    )
    p.add_argument(
        "--validation_file", default=None, help="offline: a held-out file for the validation loss"
    )
    p.add_argument(
        "--test_file", default=None, help="offline: a held-out file for the test loss and replies"
    )
    p.add_argument(
        "--allow_training_data",
        action="store_true",
        help="offline: score rows the model was trained on (by default refused when the "
        "model's run record names them as its training data)",
    )
    add_data_arguments(p.add_argument)
    p.add_argument("--num_fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    p.add_argument(
        "--model_args", default=None, help="lm-eval HFLM arguments k=v,... (loads from --model)"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype to load the model in (default auto: the dtype it was saved in)",
    )
    p.add_argument(
        "--merge_adapter",
        action="store_true",
        help="LoRA run folder: merge the adapter into its base (faster generation)",
    )
    p.add_argument(
        "--trust_remote_code", action="store_true", help="allow the model's own code to run"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if any)")
    p.add_argument(
        "--include_path", action="append", default=[], help="folder of lm-eval task YAMLs"
    )
    p.add_argument("--alpacaeval_questions", default=None, help="AlpacaEval instructions file")
    p.add_argument("--mtbench_questions", default=None, help="MT-Bench question.jsonl")
    p.add_argument(
        "--answers_dir", default=None, help="answer files folder (default: OUTPUT's folder/answers)"
    )
    p.add_argument("--model_id", default=None, help="name in answer files (default: model folder)")
    p.add_argument(
        "--answer_max_new_tokens", type=int, default=1024, help="generation budget per judge answer"
    )
    return p


def _load(args: argparse.Namespace, model_dir: Path, device: str) -> tuple[Any, Any]:
    from fishertune.modeling import load_model_and_tokenizer

    try:
        model, tokenizer = load_model_and_tokenizer(
            str(model_dir),
            dtype=args.dtype,
            merge_adapter=args.merge_adapter,
            trust_remote_code=args.trust_remote_code,
        )
    except FishertuneError as err:
        raise FishertuneError(f"--model {model_dir}: {err}") from err
    model.to(device)
    model.eval()
    _check_finite_weights(model, model_dir)
    return model, tokenizer


def _check_finite_weights(model: Any, model_dir: Path) -> None:
    """Refuse a model with NaN or inf weights (a diverged run): its scores would mean nothing."""
    import torch

    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FishertuneError(
            f"--model {model_dir}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); "
            "the training run diverged: evaluate an earlier checkpoint"
        )


def _table(metrics: dict[str, float]) -> str:
    width = max((len(k) for k in metrics), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  --------"]
    for name, value in metrics.items():
        lines.append(f"{name:<{width}}  {value:.4f}" if math.isfinite(value) else f"{name}  nan")
    return "\n".join(lines)


def _checked_arguments(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The model folder and the task list; a bad folder, empty work or bad size is an error."""
    model_dir = Path(args.model).expanduser()
    if not (model_dir / "config.json").is_file() and not is_adapter_folder(model_dir):
        raise FishertuneError(
            f"--model {args.model}: not a saved model folder (no config.json or {ADAPTER_CONFIG})"
        )
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks and not (args.alpacaeval_questions or args.mtbench_questions):
        raise FishertuneError("--tasks is empty and no question file is given: nothing to do")
    sizes = {
        "--batch_size": args.batch_size,
        "--max_new_tokens": args.max_new_tokens,
        "--max_length": args.max_length,
        "--num_fewshot": args.num_fewshot,
        "--answer_max_new_tokens": args.answer_max_new_tokens,
    }
    for name, value in sizes.items():
        if value is not None and value < (
            0 if name in ("--num_fewshot", "--max_new_tokens") else 1
        ):
            raise FishertuneError(f"{name} must be positive, got {value}")
    return model_dir, tasks


def _held_out(
    args: argparse.Namespace, model_dir: Path, tasks: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """The offline splits' rows (:mod:`fishertune.evaluation.heldout`) and those that are
    training rows; nothing without the offline task."""
    if OFFLINE not in tasks:
        given = [f"--{name}" for name in ("validation_file", "test_file") if getattr(args, name)]
        if given:
            raise FishertuneError(
                f"{', '.join(given)} given without the offline task: add offline to --tasks"
            )
        return {}, []
    from fishertune.evaluation.heldout import load_held_out

    dataset = ("--dataset", args.dataset or BUILTIN_DATASET)
    sources = {
        "validation": ("--validation_file", args.validation_file)
        if args.validation_file
        else dataset,
        "test": ("--test_file", args.test_file) if args.test_file else dataset,
    }
    for option, source in sources.values():
        if option != "--dataset" and not Path(source).expanduser().is_file():
            raise FishertuneError(f"{option} {source}: no such file")
    return load_held_out(
        sources,
        DataOptions.from_args(args),
        args.limit,
        model_dir,
        allow_training_data=args.allow_training_data,
    )


def _scoring_line(
    args: argparse.Namespace, tasks: list[str], held_out: dict[str, Any], trained: list[str]
) -> str:
    """The first printed line: what this command scores."""
    from fishertune.evaluation.heldout import describe

    parts = [describe(held_out, trained)] if held_out else []
    lm_tasks = [t for t in tasks if t != OFFLINE]
    if lm_tasks:
        parts.append(f"lm-eval tasks {', '.join(lm_tasks)}")
    questions = [q for q in (args.alpacaeval_questions, args.mtbench_questions) if q]
    if questions:
        parts.append(f"answers to {', '.join(questions)}")
    return f"evaluating {args.model}: " + "; ".join(parts)


def _lm_eval(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    model_dir: Path,
    lm_tasks: list[str],
    device: str,
) -> dict[str, Any]:
    """lm-eval's results for ``lm_tasks`` (:func:`fishertune.evaluation.lmeval.run_lm_eval`)."""
    from fishertune.evaluation.lmeval import run_lm_eval

    # With --model_args lm-eval loads the folder itself (dtype, parallelize...), a LoRA run
    # as its base with peft=ADAPTER; otherwise it scores the model already in memory.
    lm_model: Any = model_dir if args.model_args else model
    model_args = args.model_args
    if model_args and is_adapter_folder(model_dir):
        from fishertune.modeling import adapter_base

        lm_model = adapter_base(model_dir)[0]
        model_args = f"{model_args},peft={model_dir.resolve()}"
    return run_lm_eval(
        lm_model,
        lm_tasks,
        tokenizer=tokenizer,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=device,
        model_args=model_args,
        seed=args.seed,
    )


def _write_report(
    args: argparse.Namespace,
    metrics: dict[str, float],
    directions: dict[str, bool],
    meta: dict[str, Any],
    started: float,
) -> None:
    """Write ``--output`` (non-finite metrics listed apart: not JSON) and print the table."""
    # NaN from lm-eval (IFEval accuracy on a test subset without instructions) is undefined, not
    # a number, and not JSON: listed apart, and said.
    undefined = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
    if undefined:
        meta["undefined_metrics"] = undefined
    meta["wall_time_s"] = round(time.time() - started, 2)
    write_json_atomic(
        args.output,
        {"metrics": metrics, "higher_is_better": directions, "meta": meta},
        allow_nan=False,
    )
    print(_table(metrics))
    if undefined:
        print(f"warning: undefined (not finite) metrics: {', '.join(undefined)}", file=sys.stderr)
    for kind, path in meta.get("answers", {}).items():
        print(f"{kind} answers: {path}")
    print(f"wrote {args.output}")


def main(argv: list[str] | None = None) -> int:
    """Run ``fishertune evaluate``; returns the exit status."""
    args = build_parser().parse_args(argv)
    started = time.time()
    model_dir, tasks = _checked_arguments(args)

    held_out, trained = _held_out(args, model_dir, tasks)
    print(_scoring_line(args, tasks, held_out, trained), flush=True)

    import torch
    from transformers import set_seed

    set_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load(args, model_dir, device)

    metrics: dict[str, float] = {}
    directions: dict[str, bool] = {}
    meta: dict[str, Any] = {
        "model": str(model_dir.resolve()),
        "tasks": tasks,
        "seed": args.seed,
        "limit": args.limit,
        "device": device,
    }
    if OFFLINE in tasks:
        from fishertune.evaluation.heldout import file_sha256
        from fishertune.evaluation.offline import METRICS, evaluate_offline

        scores = evaluate_offline(
            model,
            tokenizer,
            dataset=args.dataset or BUILTIN_DATASET,
            options=DataOptions.from_args(args),
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            max_length=args.max_length or DEFAULT_MAX_LENGTH,
            splits={split: held.rows for split, held in held_out.items()},
        )
        metrics.update({f"{OFFLINE}/{k}": float(v) for k, v in scores.items()})
        directions.update({f"{OFFLINE}/{k}": v for k, v in METRICS.items()})
        meta["dataset"] = args.dataset or BUILTIN_DATASET
        # the files' sha256 and the truncation let `fishertune compare` reuse this evaluation
        meta["scored"] = {
            split: {"source": held.label, "rows": len(held.rows)}
            | ({"sha256": file_sha256(held.file)} if held.file is not None else {})
            for split, held in held_out.items()
        }
        meta["max_length"] = args.max_length or DEFAULT_MAX_LENGTH
        if trained:
            meta["training_rows"] = trained
    lm_tasks = [t for t in tasks if t != OFFLINE]
    if lm_tasks:
        result = _lm_eval(args, model, tokenizer, model_dir, lm_tasks, device)
        metrics.update(result["metrics"])
        directions.update(result["higher_is_better"])
        meta["lm_eval_versions"] = result["versions"]
        meta["n_samples"] = result["n_samples"]
    if args.alpacaeval_questions or args.mtbench_questions:
        from fishertune.evaluation.export import export_answers

        answers_dir = Path(args.answers_dir or Path(args.output).parent / "answers")
        written = export_answers(
            model,
            tokenizer,
            answers_dir,
            model_id=args.model_id or model_dir.resolve().name,
            alpacaeval_questions=args.alpacaeval_questions,
            mtbench_questions=args.mtbench_questions,
            max_new_tokens=args.answer_max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        meta["answers"] = {k: str(v) for k, v in written.items()}
    # A non-finite offline loss (val_loss, perplexity) means the model's outputs are not finite:
    # a failure, unlike an accuracy with no example to score.
    broken = sorted(
        k
        for k, v in metrics.items()
        if k.startswith(f"{OFFLINE}/") and directions.get(k) is False and not math.isfinite(v)
    )
    if broken:
        raise FishertuneError(
            f"--model {args.model}: non-finite {', '.join(broken)} (the model's outputs are not "
            f"finite); nothing written to {args.output}"
        )
    _write_report(args, metrics, directions, meta, started)
    return 0
