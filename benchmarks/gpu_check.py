"""One command that tells in minutes whether fishertune is right and fast on a GPU.

    python benchmarks/gpu_check.py                          # one CUDA GPU, within 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick     # the same code paths, micro model

Four checks, each caught and recorded on its own (a failure does not stop the others), under one
time budget (``--budget-s``, 450 s on CUDA):

1. ``overhead``: step time and peak memory of baseline, NEFTune, token-F / logit-F exact (eager
   attention) and fd (SDPA; flash-attention 2 too where ``flash_attn`` is installed) at the
   Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192, vocab
   128256, tied embeddings), bf16 autocast over float32 weights as training runs it, sequence
   2048, at the largest batch that fits the baseline (searched first). Each method trains in its
   own process for a few steps; the median step and ``torch.cuda.max_memory_allocated`` are
   given as ratios to the baseline at the same batch (a method that does not fit halves its
   batch, and the baseline is measured again there), with tokens per second; the minimum step
   and the peak above the set-up's memory as ratios too. fd must meet the floors of
   ``overhead.py``: at this vocabulary its vocabulary goals (``FLOORS_BY_SIZE``: 2.3x time,
   1.1x peak, 1.15x above set-up).
2. ``accuracy``: fd vs exact penalty gradients in float32 and bf16 on a smaller Llama (the
   comparison of ``overhead.py``, fd through SDPA), with the spread between two draws of y' as
   the yardstick: float32 within ``overhead.FLOOR_FD_ERROR``, and bf16's default (central) fd
   error below that spread.
3. ``training``: ``fishertune train`` as a user runs it (subprocesses): the tiny preset for 50
   steps per method, and one fd run with activation checkpointing at sequence 4096 on the 1B
   shape (a model saved with ``save_pretrained``, generated long conversations) for 10 steps;
   each must complete every step with finite logged losses and finite saved weights.
4. ``environment``: Python, torch, CUDA, the GPU, SDPA backends that run a bf16 forward and
   backward, ``flash_attn``, and the versions of transformers / TRL / accelerate / peft / datasets.

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--output``, prints the Markdown, and exits 1
when a check fails (or did not finish within the budget). ``--quick`` shrinks every shape and
step count: its numbers exercise the code, they measure nothing (on CPU the memory column is the
worker's cumulative peak RSS), and the floors are reported but not enforced. It also simulates an
out-of-memory error for the exact methods above batch 1, so the batch fallback runs too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from harness import (
    PENALTY_KINDS,
    build_model,
    build_trainer,
    free_memory,
    gradient_agreement,
    largest_batch,
    llama_config,
    peak_memory_bytes,
    step_clock,
    summarize_steps,
)
from overhead import FLOOR_FD_ERROR, FLOOR_FD_MEMORY, FLOOR_FD_TIME, FLOORS_BY_SIZE, METHODS

CHECKS = ("environment", "overhead", "accuracy", "training")
REQUIRED_PACKAGES = ("transformers", "trl", "accelerate", "peft", "datasets")
REPORTED_PACKAGES = (*REQUIRED_PACKAGES, "safetensors", "tokenizers", "flash-attn", "fishertune")
RESULT = "RESULT "  # prefix of a worker's answer lines on stdout

# timed methods: (label, FisherSFTConfig overrides, attention); the first six are overhead.py's
TIMED = [
    (label, overrides, "eager" if "exact" in label else "sdpa") for label, overrides in METHODS
]
TIMED = [row for row in TIMED if "1/4" not in row[0]]
FLASH = "flash_attention_2"
# the rows overhead.py's floors are for: one draw of token-F / logit-F over every row (m = 2, the
# unbiased estimator, NEFTune matching and hessian-trace do more work by design)
FLOORED = ("token-F fd", "logit-F fd")
TIMED_FLASH = [
    ("baseline, flash-attn 2", {"method": "baseline"}, FLASH),
    *[(f"{label}, flash-attn 2", o, FLASH) for label, o, attention in TIMED if " fd" in label],
]

# tiny-preset runs through the CLI: name -> extra flags
TINY_RUNS: dict[str, list[str]] = {
    "baseline": ["--method", "baseline"],
    "neftune": ["--method", "neftune"],
    "token-f": ["--method", "token-f"],
    "logit-f": ["--method", "logit-f"],
    "token-f fd": ["--method", "token-f", "--penalty_grad", "fd"],
    "logit-f fd": ["--method", "logit-f", "--penalty_grad", "fd"],
}

PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "model_size": "1b", "seq_len": 2048, "warmup": 2, "steps": 5, "batch_cap": 64,
        "accuracy_model_size": "small", "accuracy_seq_len": 512, "grad_batch_size": 4,
        "accuracy_kinds": list(PENALTY_KINDS),
        "tiny_steps": 50, "tiny_runs": list(TINY_RUNS),
        "long_model_size": "1b", "long_seq_len": 4096, "long_steps": 10,
    },
    "quick": {
        "model_size": "micro", "seq_len": 128, "warmup": 1, "steps": 2, "batch_cap": 2,
        "accuracy_model_size": "micro", "accuracy_seq_len": 64, "grad_batch_size": 2,
        "accuracy_kinds": ["token-f"],
        "tiny_steps": 3, "tiny_runs": ["token-f"],
        # the exact methods "run out of memory" above batch 1: the fallback runs on CPU too
        "simulate_oom": {"penalty_grad": "exact", "above": 1},
        "long_model_size": "micro", "long_seq_len": 512, "long_steps": 2,
    },
}  # fmt: skip


# ====================================================================== workers
# Each job runs in its own process (``--worker``): a crash, an OOM or a hung kernel in one
# costs only that job, each process's CUDA peak is its own, and the driver never holds a CUDA
# context that would take memory from the measurements.
def _emit(reply: TextIO, payload: Any) -> None:
    print(RESULT + json.dumps(payload), file=reply, flush=True)


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def environment_job(options: dict[str, Any]) -> dict[str, Any]:
    """Versions, the device, and which attention kernels run a bf16 forward and backward."""
    import importlib.metadata
    import platform

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "requested_device": options["device"],
    }
    packages = {}
    for name in REPORTED_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    import fishertune

    info["fishertune_source"] = str(Path(fishertune.__file__).parent)
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    device = options["device"]
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["cudnn"] = torch.backends.cudnn.version()
    if device == "cuda" and not torch.cuda.is_available():
        info["sdpa_backends"] = {}
    else:
        info["sdpa_backends"] = _sdpa_backends(device)
    try:
        import flash_attn  # noqa: F401

        info["flash_attn"] = "importable"
    except Exception as err:  # an ImportError, or a broken build's own error
        info["flash_attn"] = _first_line(err)
    missing = [name for name in REQUIRED_PACKAGES if packages[name] is None]
    problems = []
    if missing:
        problems.append(
            f"missing packages {', '.join(missing)} (docs/benchmarks.md, 'Installing on an offline "
            "GPU machine': install fishertune's train extra from a wheelhouse)"
        )
    if device == "cuda" and not torch.cuda.is_available():
        problems.append("CUDA is not available to torch")
    info["problems"] = problems
    return info


def _sdpa_backends(device: str) -> dict[str, str]:
    """Each SDPA backend alone, on a (2, 8, 256, 64) bf16 causal forward and backward."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    result = {}
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ):
        try:
            q, k, v = (
                torch.randn(2, 8, 256, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
                for _ in range(3)
            )
            with sdpa_kernel([backend]):
                scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()
            result[backend.name] = "ok"
        except Exception as err:  # each backend refuses in its own way
            result[backend.name] = _first_line(err)
    return result


def _train_steps(
    options: dict[str, Any], overrides: dict[str, Any], attention: str, batch: int, steps: int
) -> dict[str, Any]:
    """Train ``steps`` steps of one method on a fresh model at ``batch`` rows; times and peak."""
    clock = step_clock(options["device"])
    model = trainer = None
    simulate = options.get("simulate_oom")
    same_mode = simulate and overrides.get("penalty_grad") == simulate["penalty_grad"]
    if same_mode and batch > simulate["above"]:
        import torch

        raise torch.OutOfMemoryError(f"simulated out of memory at batch {batch} (--quick)")
    try:
        model = build_model(options, attention)
        trainer = build_trainer(
            options, overrides, model, batch_size=batch, max_steps=steps, callbacks=[clock]
        )
        trainer.train()
        peak = peak_memory_bytes(options["device"])
        return {"steps": clock.steps, "peak_bytes": peak, "setup_bytes": clock.setup_bytes}
    finally:
        if model is not None:
            model.zero_grad(set_to_none=True)
        del trainer, model
        free_memory()


def search_job(options: dict[str, Any]) -> dict[str, Any]:
    """The largest baseline batch whose two training steps (optimizer state included) fit."""
    probes = []

    def fits(batch: int) -> bool:
        try:
            result = _train_steps(options, {"method": "baseline"}, "sdpa", batch, 2)
            probes.append({"batch": batch, "fits": True, "peak_gb": result["peak_bytes"] / 2**30})
            return True
        except Exception as err:
            if not _is_oom(err):
                raise
            probes.append({"batch": batch, "fits": False, "error": _first_line(err)})
        # outside the except block: the traceback's frames (and their tensors) are gone now
        free_memory()
        return False

    deadline = time.time() + options["search_s"]
    batch = largest_batch(fits, options["batch_cap"], deadline=deadline)
    return {"batch_size": batch, "probes": probes}


def time_job(options: dict[str, Any], methods: list[dict[str, Any]], reply: TextIO) -> None:
    """Time each method (one answer line each); on out-of-memory halve its batch and retry."""
    for method in methods:
        batch, oom_at = method["batch_size"], []
        row: dict[str, Any] = {"label": method["label"], "attention": method["attention"]}
        while batch >= 1:
            try:
                result = _train_steps(
                    options,
                    method["overrides"],
                    method["attention"],
                    batch,
                    options["warmup"] + options["steps"],
                )
            except Exception as err:
                if not _is_oom(err):
                    row["error"] = _first_line(err)
                    row["traceback"] = traceback.format_exc()[-2000:]
                    break
                oom_at.append(batch)
            if oom_at and oom_at[-1] == batch:
                # outside the except block: the traceback's frames (and their tensors) are gone
                free_memory()
                batch //= 2
                continue
            row.update(summarize_steps(result["steps"], options["warmup"]))
            row["peak_gb"] = result["peak_bytes"] / 2**30
            row["above_setup_gb"] = (result["peak_bytes"] - result["setup_bytes"]) / 2**30
            row["batch_size"] = batch
            break
        else:
            row["error"] = f"out of memory at every batch size down to 1 (tried {oom_at})"
        row["oom_at"] = oom_at
        _emit(reply, row)


def accuracy_job(options: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for kind in options["accuracy_kinds"]:
        rows += gradient_agreement(options, kind)
    return rows


def long_run_setup_job(options: dict[str, Any]) -> dict[str, Any]:
    """A float32 model of the long run's shape saved with ``save_pretrained``, and a JSONL of
    conversations whose assistant turn alone is longer than the sequence (truncated to it)."""
    import torch
    from transformers import LlamaForCausalLM

    from fishertune.data.tokenizer import load_tiny_tokenizer

    folder = Path(options["folder"])
    config = llama_config(options["model_size"], options["seq_len"], "sdpa")
    torch.manual_seed(options["seed"])
    with torch.device(options["device"]):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "model")
    del model
    tokenizer = load_tiny_tokenizer()
    words = [
        "the",
        "river",
        "carries",
        "seven",
        "stones",
        "past",
        "the",
        "old",
        "mill",
        "while",
        "clocks",
        "count",
        "the",
        "hours",
    ]
    text, count, i = [], 0, 0
    while count < options["seq_len"] + 64:
        chunk = " ".join(words[(i + j) % len(words)] for j in range(64))
        text.append(chunk)
        count += len(tokenizer(" " + chunk, add_special_tokens=False)["input_ids"])
        i += 1
    long_reply = " ".join(text)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Tell story number {n}."},
                {"role": "assistant", "content": long_reply},
            ]
        }
        for n in range(16)
    ]
    data = folder / "long.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"model": str(folder / "model"), "data": str(data), "reply_tokens": count}


def _worker_main(payload: str) -> int:
    spec = json.loads(payload)
    job, options = spec["job"], spec["options"]
    reply = sys.stdout
    # libraries print (the Trainer its final metrics): stdout carries only the answers
    with contextlib.redirect_stdout(sys.stderr):
        import torch

        if options["device"] == "cpu":
            torch.set_num_threads(options.get("threads", 1))
        with contextlib.suppress(ImportError):
            from datasets.utils.logging import disable_progress_bar

            disable_progress_bar()
        kind = job["type"]
        if kind == "environment":
            _emit(reply, environment_job(options))
        elif kind == "search":
            _emit(reply, search_job(options))
        elif kind == "time":
            time_job(options, job["methods"], reply)
        elif kind == "accuracy":
            _emit(reply, accuracy_job(options))
        elif kind == "long_setup":
            _emit(reply, long_run_setup_job(options))
        else:
            raise SystemExit(f"unknown job {kind!r}")
    return 0


# ====================================================================== driver
class Budget:
    """Wall-clock budget shared by all checks."""

    def __init__(self, seconds: float) -> None:
        self.start = time.time()
        self.end = self.start + seconds

    def left(self, until: float | None = None) -> float:
        return max(0.0, min(self.end, until or self.end) - time.time())


class WorkerError(RuntimeError):
    pass


def _env(options: dict[str, Any]) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    # the batch search runs near the memory limit: expandable segments keep fragmentation from
    # failing a batch that fits
    env.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    if options["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(options["threads"])
    return env


def run_worker(options: dict[str, Any], job: dict[str, Any], timeout: float) -> list[Any]:
    """Run one worker job; its answers, also those given before a crash or the timeout.

    Raises ``WorkerError`` (with the end of its stderr) when it gave no answer or failed."""
    if timeout <= 1:
        raise WorkerError("time budget spent before it could start")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    command.append(json.dumps({"job": job, "options": options}))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=_env(options)
        )
        stdout, stderr, failure = done.stdout, done.stderr, done.returncode != 0
        reason = f"exit status {done.returncode}"
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else err.stderr or ""
        failure, reason = True, f"stopped by the time budget after {timeout:.0f} s"
    answers = [
        json.loads(line[len(RESULT) :]) for line in stdout.splitlines() if line.startswith(RESULT)
    ]
    if failure:
        error = WorkerError(f"worker {job['type']}: {reason}; stderr ends:\n{stderr[-3000:]}")
        error.answers = answers  # type: ignore[attr-defined]
        raise error
    return answers


# ---------------------------------------------------------------------- 4. environment
def check_environment(options: dict[str, Any], budget: Budget) -> dict[str, Any]:
    (info,) = run_worker(options, {"type": "environment"}, min(budget.left(), 180))
    return {"ok": not info["problems"], "error": "; ".join(info["problems"]) or None, **info}


# ---------------------------------------------------------------------- 1. overhead
def check_overhead(options: dict[str, Any], budget: Budget, flash: bool) -> dict[str, Any]:
    # alone on the device it gets its share of the budget; beside the others (--quick) all of it
    share = options["overhead_share"] if not options["quick"] else 1.0
    deadline = budget.start + share * (budget.end - budget.start)
    run = {**options, "dtype": "bf16"}
    (search,) = run_worker(
        {**run, "search_s": options["search_s"]}, {"type": "search"}, budget.left(deadline)
    )
    batch = search["batch_size"]
    result: dict[str, Any] = {
        "model_size": options["model_size"],
        "seq_len": options["seq_len"],
        "dtype": "bf16 autocast, float32 weights",
        "batch_size": batch,
        "search": search["probes"],
        "rows": [],
    }
    if batch == 0:
        return {"ok": False, "error": "the baseline does not fit at batch 1", **result}
    methods = [
        {"label": label, "overrides": o, "attention": attention, "batch_size": batch}
        for label, o, attention in TIMED + (TIMED_FLASH if flash else [])
    ]
    rows = _time_methods(run, methods, budget, deadline)
    # ratios need the baseline at the batch each method ran at
    kernel_baseline = {"sdpa": "baseline", "eager": "baseline", FLASH: "baseline, flash-attn 2"}
    extra = []
    for row in rows:
        base = kernel_baseline[row["attention"]]
        if "batch_size" in row and row["batch_size"] != batch and row["label"] != base:
            key = (base, row["batch_size"])
            if key not in [(m["label"], m["batch_size"]) for m in extra]:
                spec = next(m for m in methods if m["label"] == base)
                extra.append({**spec, "batch_size": row["batch_size"]})
    rows += _time_methods(run, extra, budget, deadline)
    tokens = options["seq_len"]
    for row in rows:
        if "step_s" not in row:
            continue
        row["tokens_per_s"] = row["batch_size"] * tokens / row["step_s"]
        base_label = kernel_baseline[row["attention"]]
        base = next(
            (
                r
                for r in rows
                if r["label"] == base_label
                and r.get("batch_size") == row["batch_size"]
                and "step_s" in r
            ),
            None,
        )
        if base is not None:
            row["baseline_label"] = base_label
            row["step_x"] = row["step_s"] / base["step_s"]
            row["fwd_bwd_x"] = row["fwd_bwd_s"] / base["fwd_bwd_s"]
            row["min_fwd_bwd_x"] = row["min_fwd_bwd_s"] / base["min_fwd_bwd_s"]
            row["peak_x"] = row["peak_gb"] / base["peak_gb"]
            row["above_setup_x"] = row["above_setup_gb"] / max(base["above_setup_gb"], 1e-9)
    # overhead.py's floors; at a 128k vocabulary (the 1B shape) its tighter goals
    goals = FLOORS_BY_SIZE.get(options["model_size"], {})
    floors = []
    for row in rows:
        if row["label"].removesuffix(", flash-attn 2") not in FLOORED or "fwd_bwd_x" not in row:
            continue
        label = row["label"]
        time_floor = goals.get("time", FLOOR_FD_TIME)
        floors.append(_floor(f"{label}: forward+backward", row["fwd_bwd_x"], time_floor))
        memory_floor = goals.get("memory", FLOOR_FD_MEMORY)
        floors.append(_floor(f"{label}: peak memory", row["peak_x"], memory_floor))
        if "above_setup" in goals:
            name = f"{label}: memory above set-up"
            floors.append(_floor(name, row["above_setup_x"], goals["above_setup"]))
    result["rows"] = rows
    result["floors"] = floors
    result["floors_enforced"] = not options["quick"]
    errors = [f"{row['label']}: {row['error']}" for row in rows if "error" in row]
    errors += [f"{row['label']}: no ratio to its baseline" for row in rows if "step_x" not in row]
    if options["quick"] is False:
        errors += [f"floor missed: {f['name']} {f['value']:.2f}x" for f in floors if not f["ok"]]
    return {"ok": not errors, "error": "; ".join(errors) or None, **result}


def _floor(name: str, value: float, floor: float) -> dict[str, Any]:
    return {"name": name, "value": value, "floor": floor, "ok": value <= floor}


def _time_methods(
    options: dict[str, Any], methods: list[dict[str, Any]], budget: Budget, deadline: float
) -> list[dict[str, Any]]:
    """On CUDA one process per method (its own CUDA peak, crash and OOM isolation); on CPU one
    process for all (each start costs seconds of imports, and RSS is cumulative anyway)."""
    groups = [[m] for m in methods] if options["device"] == "cuda" else [methods]
    rows = []
    for group in groups:
        if not group:
            continue
        try:
            answers = run_worker(options, {"type": "time", "methods": group}, budget.left(deadline))
        except WorkerError as err:
            answers = list(getattr(err, "answers", []))
            done = {a["label"] for a in answers}
            answers += [
                {"label": m["label"], "attention": m["attention"], "error": str(err)[:3000]}
                for m in group
                if m["label"] not in done
            ]
        rows += answers
    return rows


# ---------------------------------------------------------------------- 2. accuracy
def check_accuracy(options: dict[str, Any], budget: Budget) -> dict[str, Any]:
    run = {
        **options,
        "model_size": options["accuracy_model_size"],
        "seq_len": options["accuracy_seq_len"],
        "fd_attention": "sdpa",
    }
    (rows,) = run_worker(run, {"type": "accuracy"}, budget.left())
    criteria = []
    for row in rows:
        label = f"{row['kind']} fd {row['scheme']} {row['dtype']}"
        if row["dtype"] == "fp32" and row["fd_step"] is None:
            floor = FLOOR_FD_ERROR[row["scheme"]]
            criteria.append(
                {
                    "name": f"{label}: relative error vs exact",
                    "value": row["rel_error"],
                    "bound": floor,
                    "ok": row["rel_error"] <= floor,
                }
            )
        if row["dtype"] == "bf16" and row["scheme"] == "central" and row["fd_step"] is None:
            criteria.append(
                {
                    "name": f"{label}: error vs exact fp32 below the spread of two draws",
                    "value": row["rel_error_vs_fp32_exact"],
                    "bound": row["draw_noise"],
                    "ok": row["rel_error_vs_fp32_exact"] < row["draw_noise"],
                }
            )
    errors = [] if options["quick"] else [c["name"] for c in criteria if not c["ok"]]
    return {
        "ok": not errors,
        "error": "; ".join(errors) or None,
        "model_size": run["model_size"],
        "seq_len": run["seq_len"],
        "batch_size": options["grad_batch_size"],
        "rows": rows,
        "criteria": criteria,
        "criteria_enforced": not options["quick"],
    }


# ---------------------------------------------------------------------- 3. training (CLI)
def _tiny_preset() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("fishertune") / "configs" / "tiny.yaml"))


def _cli_train(
    options: dict[str, Any], name: str, output: Path, flags: list[str], steps: int, timeout: float
) -> dict[str, Any]:
    """``fishertune train`` in a subprocess; the run must complete ``steps`` steps with finite
    logged losses and finite saved weights."""
    command = [sys.executable, "-m", "fishertune.cli", "train", "--config", str(_tiny_preset())]
    command += ["--output_dir", str(output), "--max_steps", str(steps), "--logging_steps", "1"]
    # NaN losses must show in the log, not be replaced by the running average
    command += ["--logging_nan_inf_filter", "false", "--report_to", "none"]
    command += ["--save_strategy", "no", "--disable_tqdm", "true", *flags]
    if options["device"] == "cuda":
        command += ["--use_cpu", "false", "--bf16", "true"]
    row: dict[str, Any] = {"name": name, "command": " ".join(command[1:]), "steps": steps}
    started = time.time()
    log = output.parent / f"{output.name}.log"
    try:
        with log.open("w") as handle:
            done = subprocess.run(
                command, stdout=handle, stderr=subprocess.STDOUT, timeout=max(timeout, 1),
                env=_env(options), cwd=output.parent,
            )  # fmt: skip
        row["returncode"] = done.returncode
    except subprocess.TimeoutExpired:
        row["returncode"] = None
        row["error"] = f"stopped by the time budget after {timeout:.0f} s"
    row["wall_s"] = time.time() - started
    if row["returncode"] not in (0, None):
        tail = log.read_text()[-2500:] if log.is_file() else ""
        row["error"] = f"exit status {row['returncode']}; output ends:\n{tail}"
    if "error" not in row:
        row.update(_inspect_run(output, steps))
    row["ok"] = "error" not in row
    return row


def _inspect_run(output: Path, steps: int) -> dict[str, Any]:
    """What a user would check: completed, every step ran, losses and weights finite."""
    record_path = output / "fishertune_run.json"
    if not record_path.is_file():
        return {"error": "no fishertune_run.json"}
    record = json.loads(record_path.read_text())
    state_path = output / "trainer_state.json"
    if not state_path.is_file():
        return {"error": "no trainer_state.json (the log history)"}
    state = json.loads(state_path.read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    ce = [h["ce_loss"] for h in state["log_history"] if "ce_loss" in h]
    penalties = [h["penalty"] for h in state["log_history"] if "penalty" in h]
    tokens = [h["num_tokens"] for h in state["log_history"] if "num_tokens" in h]
    found: dict[str, Any] = {
        "status": record.get("status"),
        "global_step": record.get("global_step"),
        "final_loss": losses[-1] if losses else None,
        "final_ce_loss": ce[-1] if ce else None,
        "final_penalty": penalties[-1] if penalties else None,
        "num_tokens": tokens[-1] if tokens else None,
    }
    problems = []
    if record.get("status") != "completed":
        problems.append(f"status {record.get('status')!r}")
    if record.get("global_step") != steps:
        problems.append(f"{record.get('global_step')} steps of {steps}")
    if len(losses) != steps or not all(math.isfinite(x) for x in losses + ce + penalties):
        problems.append(f"logged losses not all finite ({len(losses)} logged)")
    bad = _nonfinite_weights(output)
    if bad:
        problems.append(f"non-finite saved weights: {', '.join(bad[:5])}")
    if problems:
        found["error"] = "; ".join(problems)
    return found


def _nonfinite_weights(folder: Path) -> list[str]:
    import torch
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return ["no *.safetensors in the output"]
    bad = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if not torch.isfinite(handle.get_tensor(key)).all():
                    bad.append(key)
    return bad


def check_training(options: dict[str, Any], budget: Budget, workdir: Path) -> dict[str, Any]:
    steps = options["tiny_steps"]

    def tiny(name: str) -> dict[str, Any]:
        return _cli_train(
            options, f"tiny {name}", workdir / f"tiny-{name.replace(' ', '-')}",
            TINY_RUNS[name], steps, budget.left(),
        )  # fmt: skip

    def long_run() -> dict[str, Any]:
        seq, long_steps = options["long_seq_len"], options["long_steps"]
        name = f"{options['long_model_size']} fd + checkpointing, seq {seq}"
        try:
            (setup,) = run_worker(
                {
                    **options,
                    "folder": str(workdir / "long"),
                    "model_size": options["long_model_size"],
                    "seq_len": seq,
                },
                {"type": "long_setup"},
                budget.left(),
            )
        except WorkerError as err:
            return {"name": name, "ok": False, "steps": long_steps, "error": str(err)[:3000]}
        flags = [
            "--model_name_or_path", setup["model"], "--tokenizer_name_or_path",
            "builtin:tiny-tokenizer", "--dataset_name", setup["data"], "--max_length", str(seq),
            "--per_device_train_batch_size", "1", "--method", "token-f", "--penalty_grad", "fd",
            "--penalty_warmup_steps", "0", "--activation_checkpointing", "true",
            "--learning_rate", "1e-5", "--warmup_steps", "0",
        ]  # fmt: skip
        row = _cli_train(options, name, workdir / "long-run", flags, long_steps, budget.left())
        if row["ok"] and (row.get("num_tokens") or 0) < long_steps * seq:
            row["ok"] = False
            row["error"] = f"{row.get('num_tokens')} tokens: rows shorter than {seq}"
        return row

    jobs: list[Callable[[], dict[str, Any]]] = [long_run]
    jobs += [lambda name=name: tiny(name) for name in options["tiny_runs"]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=options["jobs"]) as pool:
        runs = list(pool.map(lambda job: job(), jobs))
    errors = [f"{r['name']}: {r['error'].splitlines()[0]}" for r in runs if not r["ok"]]
    return {"ok": not errors, "error": "; ".join(errors) or None, "runs": runs}


# ---------------------------------------------------------------------- report
def _run_check(name: str, function: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    started = time.time()
    try:
        result = function()
        ok, error = bool(result.pop("ok")), result.pop("error", None)
    except Exception as err:  # recorded; the other checks still run
        result, ok = {}, False
        error = str(err) if isinstance(err, WorkerError) else traceback.format_exc()[-3000:]
    wall = time.time() - started
    return {"ok": ok, "error": error, "wall_s": wall, "result": result, "skipped": False}


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """The Markdown: check summary, then one table per check."""
    checks = report["checks"]
    env = checks.get("environment", {}).get("result", {})
    options = report["options"]
    lines = ["# fishertune GPU check", ""]
    device = env.get("gpu") or options["device"]
    lines.append(
        f"{device}; torch {env.get('torch', '?')} (CUDA {env.get('cuda_runtime') or '-'}); "
        f"{'quick' if options['quick'] else 'full'} run, {report['wall_s']:.0f} s; "
        f"{'all checks passed' if report['ok'] else 'FAILED'}"
    )
    lines += ["", "| check | result | time (s) | problem |", "|---|---|---:|---|"]
    for name, check in checks.items():
        problem = (check["error"] or "").replace("\n", " ").replace("|", "/")[:300]
        status = "ok" if check["ok"] else "FAILED"
        lines.append(f"| {name} | {status} | {check['wall_s']:.0f} | {problem} |")

    overhead = checks.get("overhead", {}).get("result", {})
    if overhead.get("rows"):
        lines += [
            "",
            f"## Overhead: {overhead['model_size']} shape, sequence {overhead['seq_len']}, "
            f"{overhead['dtype']}, largest baseline batch {overhead['batch_size']}",
            "",
            "| method | attention | batch | step (s) | x baseline | fwd+bwd (s), median | x "
            "| min, x | peak (GB) | x | above set-up (GB) | x | tokens/s | note |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in overhead["rows"]:
            note = row.get("error", "")
            if row.get("oom_at"):
                note = f"out of memory at batch {row['oom_at']} {note}"
            lines.append(
                f"| {row['label']} | {row['attention']} | {_fmt(row.get('batch_size'))} "
                f"| {_fmt(row.get('step_s'))} | {_fmt(row.get('step_x'), '.2f')} "
                f"| {_fmt(row.get('fwd_bwd_s'))} | {_fmt(row.get('fwd_bwd_x'), '.2f')} "
                f"| {_fmt(row.get('min_fwd_bwd_x'), '.2f')} "
                f"| {_fmt(row.get('peak_gb'), '.2f')} | {_fmt(row.get('peak_x'), '.2f')} "
                f"| {_fmt(row.get('above_setup_gb'), '.2f')} "
                f"| {_fmt(row.get('above_setup_x'), '.2f')} "
                f"| {_fmt(row.get('tokens_per_s'), '.0f')} "
                f"| {note.splitlines()[0][:200] if note else ''} |"
            )
        enforced = "" if overhead.get("floors_enforced") else " (reported, not enforced: --quick)"
        if overhead.get("floors"):
            lines += ["", f"Floors{enforced}:"]
            lines += [
                f"- {f['name']} {f['value']:.2f}x <= {f['floor']}x: {'ok' if f['ok'] else 'MISSED'}"
                for f in overhead["floors"]
            ]

    accuracy = checks.get("accuracy", {}).get("result", {})
    if accuracy.get("rows"):
        lines += [
            "",
            f"## fd vs exact penalty gradients: {accuracy['model_size']} shape, sequence "
            f"{accuracy['seq_len']}, batch {accuracy['batch_size']} (fd through SDPA)",
            "",
            "| penalty | dtype | fd scheme | h_rel | cosine | rel. error vs exact (same dtype) "
            "| vs exact fp32 | exact vs exact fp32 | exact, other draw |",
            "|---|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in accuracy["rows"]:
            lines.append(
                f"| {row['kind']} | {row['dtype']} | {row['scheme']} "
                f"| {row['fd_step'] or 'default'} | {row['cosine']:.6f} "
                f"| {row['rel_error']:.2e} | {row['rel_error_vs_fp32_exact']:.2e} "
                f"| {row['exact_vs_fp32_exact']:.2e} | {row['draw_noise']:.2e} |"
            )
        enforced = "" if accuracy.get("criteria_enforced") else " (reported, not enforced: --quick)"
        lines += ["", f"Criteria{enforced}:"]
        lines += [
            f"- {c['name']}: {c['value']:.2e} vs {c['bound']:.2e}: {'ok' if c['ok'] else 'MISSED'}"
            for c in accuracy["criteria"]
        ]

    training = checks.get("training", {}).get("result", {})
    if training.get("runs"):
        lines += [
            "",
            "## Training through `fishertune train`",
            "",
            "| run | steps | final loss | final CE | final penalty | tokens | wall (s) | result |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for run in training["runs"]:
            result = "ok" if run["ok"] else run["error"].splitlines()[0][:200].replace("|", "/")
            lines.append(
                f"| {run['name']} | {_fmt(run.get('global_step'))}/{run['steps']} "
                f"| {_fmt(run.get('final_loss'), '.4f')} | {_fmt(run.get('final_ce_loss'), '.4f')} "
                f"| {_fmt(run.get('final_penalty'), '.4g')} | {_fmt(run.get('num_tokens'), '.0f')} "
                f"| {_fmt(run.get('wall_s'), '.0f')} | {result} |"
            )

    if env:
        lines += ["", "## Environment", "", "| item | value |", "|---|---|"]
        for key, value in env.items():
            if key in ("packages", "sdpa_backends"):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            lines.append(f"| {key} | {_fmt(value)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="micro shapes and few steps (tests)")
    parser.add_argument(
        "--output", default="runs/gpu-check", help="folder for the JSON and Markdown"
    )
    parser.add_argument(
        "--budget-s", type=float, help="wall-clock budget (default 450 s; 600 s with --quick)"
    )
    parser.add_argument("--only", nargs="+", choices=CHECKS, help="run only these checks")
    parser.add_argument(
        "--jobs", type=int, help="CLI runs at once (default: all on CUDA, 2 on CPU)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="scratch folder for models and runs (default: a temp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.worker:
        return _worker_main(args.worker)
    profile = PROFILES["quick" if args.quick else "full"]
    options: dict[str, Any] = {
        **profile,
        "device": args.device,
        "quick": args.quick,
        "seed": args.seed,
        "threads": args.threads,
        "dtype": "bf16",
        "jobs": args.jobs or (len(profile["tiny_runs"]) + 1 if args.device == "cuda" else 2),
        # --quick: generous, for a loaded CPU machine
        "budget_s": args.budget_s or (600.0 if args.quick else 450.0),
        "overhead_share": 0.55,  # of the budget; accuracy and training run after it, together
        # the search's own limit; --quick's cap (2) bounds it, and a loaded CPU must not cut it
        "search_s": 600.0 if args.quick else 75.0,
    }
    selected = args.only or list(CHECKS)
    budget = Budget(options["budget_s"])
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fishertune-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# gpu_check: {json.dumps(options)}", file=sys.stderr, flush=True)
    checks: dict[str, dict[str, Any]] = {}
    try:
        checks["environment"] = _run_check(
            "environment", lambda: check_environment(options, budget)
        )
        env = checks["environment"]["result"]
        # a device or package problem makes every other check fail: skip them (recorded); an
        # environment worker that itself broke says nothing either way: run them
        usable = not env.get("problems")
        flash = env.get("flash_attn") == "importable"
        later = {
            "overhead": lambda: check_overhead(options, budget, flash),
            "accuracy": lambda: check_accuracy(options, budget),
            "training": lambda: check_training(options, budget, workdir),
        }
        for name in [n for n in later if n not in selected or not usable]:
            reason = "not selected (--only)" if name not in selected else "environment unusable"
            checks[name] = {"ok": name not in selected, "error": reason, "wall_s": 0.0,
                            "result": {}, "skipped": True}  # fmt: skip
        # the timing runs alone on the device; the gradient check and the CLI runs after it,
        # together (not timed). --quick measures nothing: all three at once.
        alone = not options["quick"]
        if usable and "overhead" in selected and alone:
            checks["overhead"] = _run_check("overhead", later["overhead"])
        parallel = [n for n in later if n in selected and usable and (n != "overhead" or not alone)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            futures = {n: pool.submit(_run_check, n, later[n]) for n in parallel}
            for name, future in futures.items():
                checks[name] = future.result()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    checks = {name: checks[name] for name in CHECKS if name in checks}
    report = {
        "ok": all(check["ok"] for check in checks.values()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "options": options,
        "wall_s": time.time() - budget.start,
        "checks": checks,
    }
    (output / "gpu_check.json").write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    markdown = format_report(report)
    (output / "gpu_check.md").write_text(markdown)
    print(markdown)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
