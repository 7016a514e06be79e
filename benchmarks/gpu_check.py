"""One command that tells in minutes whether fishertune is right and fast on a GPU.

    python benchmarks/gpu_check.py                          # one CUDA GPU, within 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick     # the same code paths, micro model

Five checks, each caught and recorded on its own (a failure does not stop the others), under one
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
2. ``fused_ce``: the output projection's CE alone at that shape (4096 positions, hidden 2048,
   vocab 128256, bf16 autocast), ``fused_ce.py``'s comparison: the dense CE, fishertune's fused
   kernel (what the baseline runs by default), torch's ``F.linear_cross_entropy`` and Liger
   Kernel's fused linear CE where installed, each with its time as ratios to the dense CE and to
   fishertune's, its CUDA peak and its loss, timed alone after ``overhead`` (90 s and a third
   of the time left at most). It reports which is fastest, and fails only where the dense CE or
   fishertune's did not run or fishertune's loss is not the dense CE's (relative 1e-2 in bf16,
   1e-5 in float32; a non-finite loss fails too): a wrong kernel.
3. ``accuracy``: fd vs exact penalty gradients in float32 and bf16 on a smaller Llama (the
   comparison of ``overhead.py``, fd through SDPA), with the spread between two draws of y' as
   the yardstick: float32 within ``overhead.FLOOR_FD_ERROR``, and bf16's default (central) fd
   error below that spread.
4. ``training``: ``fishertune train`` as a user runs it (subprocesses): the tiny preset for 50
   steps per method, and one fd run with activation checkpointing at sequence 4096 on the 1B
   shape (a model saved with ``save_pretrained``, generated long conversations) for 10 steps;
   each must complete every step with finite logged losses and finite saved weights.
5. ``environment``: Python, torch, CUDA, the GPU, SDPA backends that run a bf16 forward and
   backward, ``flash_attn``, and the versions of transformers / TRL / accelerate / peft / datasets.

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--output``, prints the Markdown, and exits 1
when a check fails (or did not finish within the budget). ``--quick`` shrinks every shape and
step count: its numbers exercise the code, they measure nothing (on CPU the memory column is the
worker's cumulative peak RSS), and the floors are reported but not enforced. It also simulates an
out-of-memory error for the exact methods above batch 1, so the batch fallback runs too.

The work is split by job: ``gpu_check_workers.py`` (worker processes, the budget),
``gpu_check_jobs.py`` (what runs inside a worker), ``gpu_check_measure.py`` (the environment,
overhead, fused CE and accuracy checks), ``gpu_check_training.py`` (the CLI runs) and
``gpu_check_report.py`` (the Markdown).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpu_check_jobs import worker_main
from gpu_check_measure import check_accuracy, check_environment, check_fused_ce, check_overhead
from gpu_check_report import format_report
from gpu_check_training import TINY_RUNS, check_training
from gpu_check_workers import Budget, run_check
from harness import PENALTY_KINDS

CHECKS = ("environment", "overhead", "fused_ce", "accuracy", "training")
# the checks timed alone on the device (not beside the others)
TIMED_CHECKS = ("overhead", "fused_ce")


PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "model_size": "1b", "seq_len": 2048, "warmup": 2, "steps": 5, "batch_cap": 64,
        "accuracy_model_size": "small", "accuracy_seq_len": 512, "grad_batch_size": 4,
        "accuracy_kinds": list(PENALTY_KINDS),
        "tiny_steps": 50, "tiny_runs": list(TINY_RUNS),
        "long_model_size": "1b", "long_seq_len": 4096, "long_steps": 10,
        "fused_ce": {"rows": 4096, "hidden": 2048, "vocab": 128256, "dtype": "bf16", "repeats": 5},
    },
    "quick": {
        "model_size": "micro", "seq_len": 128, "warmup": 1, "steps": 2, "batch_cap": 2,
        "accuracy_model_size": "micro", "accuracy_seq_len": 64, "grad_batch_size": 2,
        "accuracy_kinds": ["token-f"],
        "tiny_steps": 3, "tiny_runs": ["token-f"],
        # the exact methods "run out of memory" above batch 1: the fallback runs on CPU too
        "simulate_oom": {"penalty_grad": "exact", "above": 1},
        "long_model_size": "micro", "long_seq_len": 512, "long_steps": 2,
        "fused_ce": {"rows": 64, "hidden": 32, "vocab": 1000, "dtype": "fp32", "repeats": 1},
    },
}  # fmt: skip


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
        return worker_main(args.worker)
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
        "overhead_share": 0.55,  # of the budget; the fused CE, then accuracy and training
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
        checks["environment"] = run_check("environment", lambda: check_environment(options, budget))
        env = checks["environment"]["result"]
        # a device or package problem makes every other check fail: skip them (recorded); an
        # environment worker that itself broke says nothing either way: run them
        usable = not env.get("problems")
        flash = env.get("flash_attn") == "importable"
        later = {
            "overhead": lambda: check_overhead(options, budget, flash),
            "fused_ce": lambda: check_fused_ce(options, budget),
            "accuracy": lambda: check_accuracy(options, budget),
            "training": lambda: check_training(options, budget, workdir),
        }
        for name in [n for n in later if n not in selected or not usable]:
            reason = "not selected (--only)" if name not in selected else "environment unusable"
            checks[name] = {"ok": name not in selected, "error": reason, "wall_s": 0.0,
                            "result": {}, "skipped": True}  # fmt: skip
        # the timings run alone on the device, one after the other; the gradient check and the
        # CLI runs after them, together (not timed). --quick measures nothing: all at once.
        alone = [] if options["quick"] else [n for n in TIMED_CHECKS if n in selected and usable]
        for name in alone:
            checks[name] = run_check(name, later[name])
        parallel = [n for n in later if n in selected and usable and n not in alone]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(later)) as pool:
            futures = {n: pool.submit(run_check, n, later[n]) for n in parallel}
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
