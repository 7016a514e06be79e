"""Bridge to lm-evaluation-harness: MMLU, IFEval, TruthfulQA and any task it knows or is given.

``run_lm_eval`` calls ``lm_eval.simple_evaluate`` with an ``HFLM`` wrapping either a model in
memory or a saved model folder, with ``apply_chat_template=True`` (instruction-tuned models are
scored through the template they were trained with; the Tulu 3 template is installed on a
tokenizer that has none), and returns the scores flattened as ``"task/metric"`` (or
``"task/metric:filter"`` when lm-eval's filter is not ``none``)::

    from fishertune.evaluation.lmeval import run_lm_eval
    out = run_lm_eval("runs/token-f-seed0", ["mmlu", "ifeval", "truthfulqa_mc2"])
    out["metrics"]["mmlu/acc"], out["higher_is_better"]["mmlu/acc"]

The same from the command line::

    fishertune evaluate --model DIR --tasks mmlu,ifeval,truthfulqa_mc2 --output eval.json

Notes:

* lm-eval's built-in tasks download their data from the Hugging Face hub on first use (then read
  it from the ``datasets`` cache, also with ``HF_DATASETS_OFFLINE=1``).
* The ``ifeval`` task needs lm-eval's ``[ifeval]`` extra (``langdetect``, ``nltk``) and nltk's
  ``punkt_tab`` data (``python -m nltk.downloader punkt_tab``).
* Local tasks: a folder of task YAMLs given as ``include_path`` (one or several). Data files in a
  YAML are resolved against the working directory, not the YAML's folder: write absolute paths,
  e.g. ``dataset_path: json`` with ``dataset_kwargs: {data_files: {test: /abs/path.jsonl}}``.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError, first_line

__all__ = ["flatten_results", "parse_model_args", "run_lm_eval"]


def parse_model_args(text: str | None) -> dict[str, Any]:
    """``"k1=v1,k2=v2"`` -> ``{"k1": "v1", "k2": "v2"}`` (lm-eval's ``--model_args`` syntax)."""
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise FishertuneError(f"--model_args: expected key=value, got {part!r} in {text!r}")
        out[key.strip()] = value.strip()
    return out


def flatten_results(results: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
    """lm-eval's ``results`` dict -> (``{"task/metric[:filter]": value}``, directions).

    Non-numeric entries (``alias``, ``"N/A"`` stderrs) are left out; stderrs are kept as
    ``task/metric_stderr``.
    """
    metrics: dict[str, float] = {}
    for task, entries in results.get("results", {}).items():
        for key, value in entries.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = f"{task}/{metric}" + ("" if filt == "none" else f":{filt}")
            metrics[name] = float(value)
    directions: dict[str, bool] = {}
    for task, entries in results.get("higher_is_better", {}).items():
        for metric, higher in (entries or {}).items():
            for name in metrics:
                if name == f"{task}/{metric}" or name.startswith(f"{task}/{metric}:"):
                    directions[name] = bool(higher)
    return metrics, directions


def _checked_task_manager(tasks: Sequence[str], include_path: Sequence[str | Path]) -> Any:
    """lm-eval's task manager over ``include_path``; an unknown task or folder is an error."""
    if not tasks:
        raise FishertuneError("no lm-eval task given")
    paths = [str(Path(p).expanduser().resolve()) for p in include_path]
    for path in paths:
        if not Path(path).is_dir():
            raise FishertuneError(f"--include_path {path}: not a folder")
    manager = _task_manager(tuple(paths))
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise FishertuneError(f"unknown lm-eval task {task!r}{hint}")
    return manager


def _harness_model(
    model: Any,
    tokenizer: Any,
    batch_size: int,
    max_length: int | None,
    device: str | None,
    extra: dict[str, Any],
) -> Any:
    """lm-eval's ``HFLM`` over a model in memory or a saved folder, with a chat template."""
    from lm_eval.models.huggingface import HFLM

    from fishertune.data.chat import ensure_chat_template

    if isinstance(model, (str, Path)):
        from transformers import AutoTokenizer

        folder = str(model)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder)
            except OSError as err:
                raise FishertuneError(f"cannot load the tokenizer of {folder}: {err}") from err
        ensure_chat_template(tokenizer)
        return HFLM(
            pretrained=folder,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            device=device or ("cuda" if _cuda() else "cpu"),
            **extra,
        )
    else:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        ensure_chat_template(tokenizer)
        return HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length
        )


def run_lm_eval(
    model: Any,
    tasks: Sequence[str],
    *,
    tokenizer: Any = None,
    include_path: Sequence[str | Path] = (),
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str | None = None,
    model_args: str | Mapping[str, Any] | None = None,
    seed: int = 0,
    apply_chat_template: bool = True,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval tasks on a model and return flat metrics.

    Args:
        model: a ``transformers`` causal LM in memory, or the path of a saved model folder.
        tasks: lm-eval task or group names (``mmlu``, ``ifeval``, ``truthfulqa_mc2``, or tasks
            found under ``include_path``).
        tokenizer: the model's tokenizer (default: loaded from the folder, or from
            ``model.name_or_path`` for a model in memory).
        include_path: folders of extra task YAMLs.
        num_fewshot: few-shot examples (default: each task's own).
        limit: examples per task: an int, or a fraction below 1.
        batch_size: lm-eval batch size.
        max_length: context length lm-eval truncates to (default: the model's).
        device: device for a model loaded from a folder (``cuda``, ``cpu``...).
        model_args: extra ``HFLM`` arguments (``"dtype=bfloat16,..."`` or a mapping) for a folder.
        seed: python, numpy, torch and few-shot sampling seeds.
        apply_chat_template: format prompts with the tokenizer's chat template.
        log_samples: keep lm-eval's per-example records under ``"samples"``.

    Returns:
        ``{"metrics": {...}, "higher_is_better": {...}, "versions": {...}, "n_samples": {...}}``,
        plus ``"samples"`` when ``log_samples``.

    Raises:
        FishertuneError: unknown task name (with the closest known names), bad ``model_args``.
    """
    manager = _checked_task_manager(tasks, include_path)
    extra = parse_model_args(model_args) if isinstance(model_args, str) else dict(model_args or {})
    lm = _harness_model(model, tokenizer, batch_size, max_length, device, extra)
    results = _simple_evaluate(
        lm,
        tasks,
        manager,
        num_fewshot=num_fewshot,
        limit=limit,
        seed=seed,
        apply_chat_template=apply_chat_template,
        log_samples=log_samples,
    )
    if results is None:  # non-zero ranks under lm-eval's own multi-process mode
        return {"metrics": {}, "higher_is_better": {}, "versions": {}, "n_samples": {}}
    return _flat_report(results, log_samples)


def _simple_evaluate(
    lm: Any,
    tasks: Sequence[str],
    manager: Any,
    *,
    num_fewshot: int | None,
    limit: int | float | None,
    seed: int,
    apply_chat_template: bool,
    log_samples: bool,
) -> dict[str, Any] | None:
    """``lm_eval.simple_evaluate`` with every seed set to ``seed``; a hub download that fails
    becomes one line saying why (``None`` on lm-eval's non-zero ranks)."""
    import lm_eval

    from fishertune.console import child_stderr_captured

    try:
        # lm-eval runs `git describe`, whose "fatal: not a git repository" would reach the terminal
        with child_stderr_captured():
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                apply_chat_template=apply_chat_template,
                log_samples=log_samples,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    except _hub_errors() as err:
        # lm-eval's built-in tasks (mmlu, ifeval, truthfulqa) fetch their data from the hub
        raise FishertuneError(
            f"lm-eval task {', '.join(tasks)}: its data comes from the Hugging Face hub and "
            f"could not be fetched ({first_line(err)}); run once where the hub is reachable "
            "(the data is then cached), or use --tasks offline or local tasks (--include_path)"
        ) from err


def _flat_report(results: Mapping[str, Any], log_samples: bool) -> dict[str, Any]:
    """lm-eval's results as :func:`run_lm_eval` returns them (see there)."""
    metrics, directions = flatten_results(results)
    out: dict[str, Any] = {
        "metrics": metrics,  # NaN kept: the caller says which metrics are undefined
        "higher_is_better": directions,
        "versions": {k: str(v) for k, v in results.get("versions", {}).items()},
        "n_samples": {
            task: int(info.get("effective", info.get("original", 0)))
            for task, info in results.get("n-samples", {}).items()
        },
    }
    if log_samples:
        out["samples"] = results.get("samples", {})
    return out


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What ``datasets`` / ``huggingface_hub`` raise when the hub cannot provide a dataset."""
    errors: list[type[BaseException]] = [ConnectionError]
    try:
        from datasets.exceptions import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:
        pass
    try:
        from huggingface_hub.errors import OfflineModeIsEnabled

        errors.append(OfflineModeIsEnabled)
    except ImportError:
        pass
    return tuple(errors)


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...]) -> Any:
    # Indexing lm-eval's thousands of task YAMLs takes seconds: do it once per set of folders.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
