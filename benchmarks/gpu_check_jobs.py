"""``gpu_check.py``'s jobs, each run inside its own worker process: the environment, the
largest baseline batch, timed training steps per method, the fused CEs (``fused_ce.py``), fd
against exact gradients, and the long run's model and data; :func:`worker_main` runs the one a
``--worker`` payload names."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from gpu_check_workers import emit, first_line, is_oom
from harness import (
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

REQUIRED_PACKAGES = ("transformers", "trl", "accelerate", "peft", "datasets")
REPORTED_PACKAGES = (*REQUIRED_PACKAGES, "safetensors", "tokenizers", "flash-attn", "fishertune")


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
        info["flash_attn"] = first_line(err)
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
            result[backend.name] = first_line(err)
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
            if not is_oom(err):
                raise
            probes.append({"batch": batch, "fits": False, "error": first_line(err)})
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
                if not is_oom(err):
                    row["error"] = first_line(err)
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
        emit(reply, row)


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


def worker_main(payload: str) -> int:
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
            emit(reply, environment_job(options))
        elif kind == "search":
            emit(reply, search_job(options))
        elif kind == "time":
            time_job(options, job["methods"], reply)
        elif kind == "accuracy":
            emit(reply, accuracy_job(options))
        elif kind == "fused_ce":
            from fused_ce import compare

            emit(reply, compare(device=options["device"], **options["fused_ce"]))
        elif kind == "long_setup":
            emit(reply, long_run_setup_job(options))
        else:
            raise SystemExit(f"unknown job {kind!r}")
    return 0
