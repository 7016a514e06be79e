"""``gpu_check.py``'s training check: ``fishertune train`` run as a user runs it (subprocesses),
the tiny preset per method and one long fd run with activation checkpointing, each inspected
for completed steps, finite logged losses and finite saved weights."""

from __future__ import annotations

import concurrent.futures
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_check_workers import Budget, WorkerError, run_worker, worker_env

# tiny-preset runs through the CLI: name -> extra flags
TINY_RUNS: dict[str, list[str]] = {
    "baseline": ["--method", "baseline"],
    "neftune": ["--method", "neftune"],
    "token-f": ["--method", "token-f"],
    "logit-f": ["--method", "logit-f"],
    "token-f fd": ["--method", "token-f", "--penalty_grad", "fd"],
    "logit-f fd": ["--method", "logit-f", "--penalty_grad", "fd"],
}


# ---------------------------------------------------------------------- 4. training (CLI)
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
                env=worker_env(options), cwd=output.parent,
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
        row.update(inspect_run(output, steps))
    row["ok"] = "error" not in row
    return row


def inspect_run(output: Path, steps: int) -> dict[str, Any]:
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
