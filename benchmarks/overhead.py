"""Cost of NEFTune and the Fisher penalties against a baseline step, and fd's gradient accuracy.

    python benchmarks/overhead.py                 # CPU: both shapes below, seq 256 (~15 min)
    python benchmarks/overhead.py --model-size tiny --quick   # one shape, fewer steps (~2 min)
    python benchmarks/overhead.py --device cuda --model-size 1b --seq-len 2048 --dtype bf16

Two shapes by default (``--model-size``), each reported in its own tables: ``tiny``, a 4-layer,
256-wide Llama with an 8,192-token vocabulary (batch 8), where the trunk dominates, and ``vocab``,
a Llama-3 vocabulary (128,256, untied) on a 2-layer, 256-wide trunk (batch 4), where the
vocabulary-sized work (output projection, softmax, CE, the penalty's draws) dominates.

Every number comes from the shipped code: each method trains a ``FisherSFTTrainer`` on the same
model (same config and seed), the same batch and the same seed, and times each step from
``on_step_begin`` to ``on_pre_optimizer_step`` (forward, penalty, backward: everything that
differs between methods; the optimizer update is identical for all and left out). The model, data,
trainer and callbacks are shared with ``gpu_check.py`` (``harness.py``). Each method runs in its
own process so its
peak memory is its own: peak RSS on CPU (``resource.getrusage``),
``torch.cuda.max_memory_allocated`` on GPU. Exact modes use eager attention (what
``fishertune train`` picks for them); the others use SDPA.

The gradient check compares the penalty's parameter gradient in fd mode with exact double
backward, for the same draws ``y'``: ``grad(CE + c R) - grad(CE)`` from one training step with a
coefficient ``c`` large enough that the CE part cancels to rounding. It also prints the spread of
exact gradients over a fresh draw of ``y'``, the noise the penalty carries anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from harness import (
    MODEL_SIZES,
    PENALTY_KINDS,
    attention_for,
    build_model,
    build_trainer,
    gradient_agreement,
    peak_memory_bytes,
    step_clock,
)

# (label, overrides of FisherSFTConfig); coefficients only need to be > 0 for timing
PENALTY = {"penalty_coef": 1e-3, "penalty_warmup_steps": 0}
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("baseline", {"method": "baseline"}),  # the default CE kernel (auto: linear here)
    ("baseline, chunked CE", {"method": "baseline", "ce_kernel": "chunked"}),
    ("baseline, dense CE", {"method": "baseline", "ce_kernel": "dense"}),
    ("neftune", {"method": "neftune", "neftune_alpha": 5.0}),
    ("token-F exact", {"method": "token-f", "penalty_grad": "exact", **PENALTY}),
    ("logit-F exact", {"method": "logit-f", "penalty_grad": "exact", **PENALTY}),
    ("token-F fd", {"method": "token-f", "penalty_grad": "fd", **PENALTY}),
    ("logit-F fd", {"method": "logit-f", "penalty_grad": "fd", **PENALTY}),
    # the model's logits read chunk by chunk (what auto takes where the linear kernel cannot)
    ("token-F fd, chunked CE",
     {"method": "token-f", "penalty_grad": "fd", "ce_kernel": "chunked", **PENALTY}),
    ("logit-F fd, chunked CE",
     {"method": "logit-f", "penalty_grad": "fd", "ce_kernel": "chunked", **PENALTY}),
    # the CE taken at X + h v (one backward fewer; its error grows as 1 / coefficient)
    ("token-F fd, fused CE",
     {"method": "token-f", "penalty_grad": "fd", "penalty_fd_fused_ce": True, **PENALTY}),
    ("logit-F fd, fused CE",
     {"method": "logit-f", "penalty_grad": "fd", "penalty_fd_fused_ce": True, **PENALTY}),
    (
        "token-F fd, 1/4 rows",
        {"method": "token-f", "penalty_grad": "fd", "penalty_fraction": 0.25, **PENALTY},
    ),
    (
        "logit-F fd, 1/4 rows",
        {"method": "logit-f", "penalty_grad": "fd", "penalty_fraction": 0.25, **PENALTY},
    ),
    # the unbiased estimator needs m >= 2 draws: compare it with the paper's at m = 2
    ("token-F fd, m=2",
     {"method": "token-f", "penalty_grad": "fd", "penalty_samples": 2, **PENALTY}),
    (
        "token-F fd unbiased, m=2",
        {"method": "token-f", "penalty_grad": "fd", "penalty_estimator": "unbiased", **PENALTY},
    ),
    (
        "token-F fd, NEFTune-matched",
        {"method": "token-f", "penalty_grad": "fd", "penalty_match_neftune_alpha": 5.0,
         "penalty_warmup_steps": 0},
    ),
    ("hessian-trace exact", {"method": "hessian-trace", "penalty_grad": "exact", **PENALTY}),
    ("hessian-trace fd", {"method": "hessian-trace", "penalty_grad": "fd", **PENALTY}),
]  # fmt: skip

# Floors the fd mode must meet (ratios to the baseline; relative gradient error in float32).
FLOOR_FD_TIME = 2.4
FLOOR_FD_TIME_FRACTION = 1.5
FLOOR_FD_MEMORY = 1.15
FLOOR_FD_ERROR = {"forward": 1e-2, "central": 1e-3}
FLOOR_UNBIASED_TIME = 1.05  # the score-function term shares the CE's backward
# Tighter goals at a real vocabulary (time, peak memory, memory above set-up), where the step is
# mostly vocabulary-sized work that the penalty shares between its terms.
VOCAB_GOALS = {"time": 2.3, "memory": 1.1, "above_setup": 1.15}
FLOORS_BY_SIZE = {"vocab": VOCAB_GOALS, "1b": VOCAB_GOALS}  # both V = 128,256
# Against the best baseline fishertune has (the fastest for time, the lightest for memory), at
# V = 128,256: the ratio a user should read; met where some fd path of each penalty meets both.
BEST_BASELINE_GOALS = {"time": 2.2, "memory": 1.05}
# Batch per shape when --batch-size is not given
DEFAULT_BATCH = {"tiny": 8, "vocab": 4}


def _setup_torch(options: dict[str, Any]) -> None:
    import torch

    if options["device"] == "cpu":
        torch.set_num_threads(options["threads"])


# ---------------------------------------------------------------------- timing worker
def serve_method(options: dict[str, Any], overrides: dict[str, Any], reply: TextIO) -> None:
    """Train one method for ``warmup + steps`` steps, each started by a ``step`` line on stdin
    and answered with its time (forward, penalty, backward); ``stats`` prints the peak memory.
    One process per method: its peak is its own. Answers go to ``reply``.
    """
    _setup_torch(options)

    def gate() -> None:
        line = sys.stdin.readline().strip()
        if line != "step":
            raise SystemExit(f"expected 'step' on stdin, got {line!r}")

    def answer(record: dict[str, float]) -> None:
        print(json.dumps(record["fwd_bwd_s"]), file=reply, flush=True)

    clock = step_clock(options["device"], before_step=gate, after_step=answer)
    trainer = build_trainer(
        options,
        overrides,
        build_model(options, attention_for(overrides)),
        batch_size=options["batch_size"],
        max_steps=options["warmup"] + options["steps"],
        callbacks=[clock],
    )
    print("ready", file=reply, flush=True)
    trainer.train()
    sys.stdin.readline()  # "stats"
    peak = peak_memory_bytes(options["device"])
    stats = {"peak_mb": peak / 2**20, "step_mb": (peak - clock.setup_bytes) / 2**20}
    print(json.dumps(stats), file=reply, flush=True)


# ---------------------------------------------------------------------- driver
def _worker_env(options: dict[str, Any], compact_malloc: bool = False) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if options["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(options["threads"])
    if compact_malloc:
        # glibc raises its mmap threshold after the first large free, then serves big tensors from
        # the heap and keeps freed blocks: peak RSS then tracks allocation history, not need. A
        # fixed threshold returns every large tensor to the OS when freed, so the peak RSS follows
        # the peak of live tensors. It slows steps (page faults): only the memory pass uses it.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return env


def _start(
    options: dict[str, Any], job: dict[str, Any], compact_malloc: bool = False
) -> subprocess.Popen:
    payload = json.dumps({"options": options, "job": job})
    # stderr to a file: a pipe nobody reads would block a chatty worker
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the worker)
    worker = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", payload],
        env=_worker_env(options, compact_malloc), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=log, text=True,
    )  # fmt: skip
    worker.log = log  # type: ignore[attr-defined]
    return worker


def _reply(worker: subprocess.Popen, job: Any) -> str:
    """The worker's next line of JSON (skipping library chatter); fail with its stderr."""
    assert worker.stdout is not None
    for line in worker.stdout:
        line = line.strip()
        if line == "ready" or line.startswith(("{", "[")) or line[:1].isdigit():
            return line
    worker.wait()
    worker.log.seek(0)  # type: ignore[attr-defined]
    raise SystemExit(f"worker {job} failed:\n{worker.log.read()[-3000:]}")  # type: ignore[attr-defined]


def _ask(worker: subprocess.Popen, command: str, job: Any) -> Any:
    assert worker.stdin is not None
    worker.stdin.write(command + "\n")
    worker.stdin.flush()
    return json.loads(_reply(worker, job))


def time_methods(
    options: dict[str, Any], methods: list[tuple[str, dict]], compact_malloc: bool = False
) -> dict[str, dict]:
    """Median (and minimum) step time and peak memory of each method, each in its own process.

    ``interleaved`` (CPU default) keeps every method's process alive and runs one step of each in
    turn, round after round, so load from anything else on the machine falls on all methods alike;
    ``sequential`` (GPU default: one model per process would not fit eight times) runs them one
    after the other.
    """
    rounds = options["warmup"] + options["steps"]
    groups = [methods] if options["schedule"] == "interleaved" else [[m] for m in methods]
    results: dict[str, dict] = {}
    for group in groups:
        workers = {
            label: _start(options, {"type": "time", "overrides": o}, compact_malloc)
            for label, o in group
        }
        for label, worker in workers.items():
            _reply(worker, label)  # "ready"
        times: dict[str, list[float]] = {label: [] for label in workers}
        for step in range(rounds):
            for label, worker in workers.items():
                elapsed = _ask(worker, "step", label)
                if step >= options["warmup"]:
                    times[label].append(elapsed)
        for label, worker in workers.items():
            results[label] = {
                "step_s": statistics.median(times[label]),
                "min_s": min(times[label]),
                **_ask(worker, "stats", label),
            }
            worker.wait()
    return {label: results[label] for label, _ in methods}


def _collect(worker: subprocess.Popen, job: Any) -> Any:
    result = json.loads(_reply(worker, job))
    worker.wait()
    return result


def _worker_main(payload: str) -> None:
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    spec = json.loads(payload)
    job, options = spec["job"], spec["options"]
    reply = sys.stdout
    # the Trainer prints its final metrics (a dict) to stdout: keep stdout for the answers
    with contextlib.redirect_stdout(sys.stderr):
        if job["type"] == "time":
            serve_method(options, job["overrides"], reply)
        else:
            _setup_torch(options)
            print(json.dumps(gradient_agreement(options, job["kind"])), file=reply, flush=True)


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _best_baseline_checks(
    timings: dict[str, dict], memory: dict[str, dict], baselines: list[str]
) -> list[str]:
    """Each penalty's fd paths (one draw, every row) against the fastest baseline's step and the
    lightest baseline's peak: a path meets the goal when it meets both."""
    fastest = min(timings[label]["step_s"] for label in baselines)
    lightest = min(memory[label]["peak_mb"] for label in baselines)
    checks = []
    for label, row in timings.items():
        if " fd" not in label or any(skip in label for skip in ("m=2", "hessian", "1/4")):
            continue
        time_x = row["step_s"] / fastest
        memory_x = memory[label]["peak_mb"] / lightest
        time_goal, memory_goal = BEST_BASELINE_GOALS["time"], BEST_BASELINE_GOALS["memory"]
        ok = time_x <= time_goal and memory_x <= memory_goal
        checks.append(
            f"{label}: step {time_x:.2f}x the fastest baseline (<= {time_goal}x), "
            f"peak {memory_x:.2f}x the lightest (<= {memory_goal}x): {_mark(ok)}"
        )
    return checks


def format_report(
    options: dict[str, Any],
    timings: dict[str, dict],
    memory: dict[str, dict],
    agreement: list[dict],
) -> str:
    """Markdown tables: cost ratios to the baseline, fd agreement, and the floors.

    On GPU the peak is ``max_memory_allocated`` of the timed run; on CPU the floor is checked on
    the memory pass's peak RSS (fixed malloc threshold, see ``_worker_env``), and the timed run's
    peak RSS (default malloc) is shown beside it.
    """
    lines = []
    base = timings.get("baseline")
    memory = memory or timings  # GPU: the timed run's CUDA peak
    mem_base = memory.get("baseline")

    def ratio(value: float, reference: float) -> str:
        return f"{value / max(reference, 1e-9):.2f}"

    if base is not None:
        kind = "CUDA peak" if options["device"] == "cuda" else "peak RSS"
        header = f"| method | step (s), median | x baseline | min (s) | x | {kind} (MB) | x "
        header += "| above set-up (MB) | x |"
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        if memory is not timings:
            header += " peak RSS, default malloc (MB) | x |"
            rule += "---:|---:|"
        lines += [header, rule]
        for label, row in timings.items():
            mem = memory[label]
            line = (
                f"| {label} | {row['step_s']:.3f} | {ratio(row['step_s'], base['step_s'])} "
                f"| {row['min_s']:.3f} | {ratio(row['min_s'], base['min_s'])} "
                f"| {mem['peak_mb']:.0f} | {ratio(mem['peak_mb'], mem_base['peak_mb'])} "
                f"| {mem['step_mb']:.0f} | {ratio(mem['step_mb'], mem_base['step_mb'])} |"
            )
            if memory is not timings:
                line += f" {row['peak_mb']:.0f} | {ratio(row['peak_mb'], base['peak_mb'])} |"
            lines.append(line)
    baselines = [label for label in timings if label.startswith("baseline")]
    if base is not None and len(baselines) > 1:
        # the ratio a user should read: against the fastest (lightest) baseline fishertune has
        fastest = min(baselines, key=lambda label: timings[label]["step_s"])
        lightest = min(baselines, key=lambda label: memory[label]["peak_mb"])
        dense = "baseline, dense CE" if "baseline, dense CE" in timings else "baseline"
        lines += [
            "",
            f"Against the dense-CE baseline and the best baseline (fastest: {fastest}; "
            f"lightest: {lightest}):",
            "",
            "| method | step x dense | step x fastest | peak x dense | peak x fastest "
            "| peak x lightest |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, row in timings.items():
            mem = memory[label]
            lines.append(
                f"| {label} | {ratio(row['step_s'], timings[dense]['step_s'])} "
                f"| {ratio(row['step_s'], timings[fastest]['step_s'])} "
                f"| {ratio(mem['peak_mb'], memory[dense]['peak_mb'])} "
                f"| {ratio(mem['peak_mb'], memory[fastest]['peak_mb'])} "
                f"| {ratio(mem['peak_mb'], memory[lightest]['peak_mb'])} |"
            )
        if options["model_size"] in FLOORS_BY_SIZE:
            lines += ["", "Goals against the best baseline:"]
            lines += [f"- {line}" for line in _best_baseline_checks(timings, memory, baselines)]
    if agreement:
        lines += [
            "",
            "| penalty | dtype | fd scheme | h_rel | cosine | rel. error vs exact (same dtype) "
            "| vs exact fp32 | exact vs exact fp32 | exact, other draw |",
            "|---|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in agreement:
            lines.append(
                f"| {row['kind']} | {row['dtype']} | {row['scheme']} "
                f"| {row['fd_step'] or 'default'} | {row['cosine']:.6f} "
                f"| {row['rel_error']:.2e} | {row['rel_error_vs_fp32_exact']:.2e} "
                f"| {row['exact_vs_fp32_exact']:.2e} | {row['draw_noise']:.2e} |"
            )
    checks = []
    if base is not None:
        for label, row in timings.items():
            # the floors are for one draw of token-F / logit-F (m = 2 and hessian-trace's two
            # shifted forwards per probe do more work by design)
            if " fd" not in label or "m=2" in label or "hessian" in label:
                continue
            goals = FLOORS_BY_SIZE.get(options["model_size"], {})
            floor = FLOOR_FD_TIME_FRACTION if "1/4" in label else goals.get("time", FLOOR_FD_TIME)
            # the penalty's own cost: against the baseline with the same CE kernel
            same = "baseline, chunked CE" if label.endswith("chunked CE") else "baseline"
            own, own_memory = timings.get(same, base), memory.get(same, mem_base)
            value = row["step_s"] / own["step_s"]
            checks.append(
                f"{label}: median step {value:.2f}x its baseline <= {floor}x: "
                f"{_mark(value <= floor)}"
            )
            if "1/4" not in label:
                value = memory[label]["peak_mb"] / own_memory["peak_mb"]
                floor = goals.get("memory", FLOOR_FD_MEMORY)
                checks.append(
                    f"{label}: peak memory {value:.2f}x <= {floor}x: {_mark(value <= floor)}"
                )
                if "above_setup" in goals:
                    value = memory[label]["step_mb"] / max(own_memory["step_mb"], 1e-9)
                    floor = goals["above_setup"]
                    checks.append(
                        f"{label}: memory above set-up {value:.2f}x <= {floor}x: "
                        f"{_mark(value <= floor)}"
                    )
    unbiased, paper = timings.get("token-F fd unbiased, m=2"), timings.get("token-F fd, m=2")
    if unbiased and paper:
        value = unbiased["step_s"] / paper["step_s"]
        checks.append(
            f"token-F fd unbiased / paper (m=2): median step {value:.3f}x <= "
            f"{FLOOR_UNBIASED_TIME}x: {_mark(value <= FLOOR_UNBIASED_TIME)}"
        )
    for row in agreement:
        if row["dtype"] == "fp32" and row["fd_step"] is None:
            floor = FLOOR_FD_ERROR[row["scheme"]]
            checks.append(
                f"{row['kind']} fd {row['scheme']} fp32: relative error {row['rel_error']:.1e} <= "
                f"{floor:.0e}: {_mark(row['rel_error'] <= floor)}"
            )
    if checks:
        lines += ["", "Floors:"] + [f"- {check}" for check in checks]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--model-size",
        nargs="+",
        choices=tuple(MODEL_SIZES),
        default=["tiny", "vocab"],
        help="shapes to measure, one after the other (the gradient check runs on the first)",
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--batch-size", type=int, help="rows per step (default: 8, 4 for the vocab shape)"
    )
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="precision of the timed runs (bf16: mixed precision, bf16=true)",
    )
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--grad-batch-size",
        type=int,
        help="rows of the gradient check (default 4 on CPU, 1 on CUDA: exact "
        "double backward through eager attention is memory-hungry)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per process (1: least hurt by other load)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--schedule",
        choices=("interleaved", "sequential"),
        help="method processes side by side, one step of each in turn (CPU "
        "default), or one after the other (GPU default)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 timed steps, 1 warm-up, seq 128, gradient check on 2 rows",
    )
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-gradients", action="store_true")
    parser.add_argument("--methods", nargs="*", help="subset of method labels to time")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)  # fmt: skip
    if args.grad_batch_size is None:
        args.grad_batch_size = 4 if args.device == "cpu" else 1
    if args.quick:
        args.steps, args.warmup, args.grad_batch_size = 3, 1, 2
        args.seq_len = min(args.seq_len, 128)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.worker:
        _worker_main(args.worker)
        return 0
    started = time.time()
    for index, size in enumerate(args.model_size):
        if index:
            print()
        batch = args.batch_size or DEFAULT_BATCH.get(size, 8)
        measure_size(args, size, batch, gradients=index == 0 and not args.skip_gradients)
    print(f"\n({time.time() - started:.0f} s)")
    return 0


def measure_size(args: argparse.Namespace, size: str, batch_size: int, gradients: bool) -> None:
    """Time every method at one shape (and check fd's gradients there) and print the tables."""
    options = {
        "device": args.device,
        "model_size": size,
        "seq_len": args.seq_len,
        "batch_size": batch_size,
        "grad_batch_size": args.grad_batch_size,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "seed": args.seed,
        "schedule": args.schedule or ("interleaved" if args.device == "cpu" else "sequential"),
    }
    print(f"# overhead: {json.dumps(options)}", flush=True)
    timings: dict[str, dict] = {}
    memory: dict[str, dict] = {}
    chosen = [
        (label, overrides)
        for label, overrides in METHODS
        if not args.methods or label in args.methods or label == "baseline"
    ]
    if not args.skip_timing:
        timings = time_methods(options, chosen)
    # nothing below is timed: the gradient checks run beside the memory pass
    jobs = [{"type": "grad", "kind": k} for k in PENALTY_KINDS] if gradients else []
    grad_workers = [(_start(options, job), job) for job in jobs]
    if not args.skip_timing and options["device"] == "cpu":
        memory_options = {**options, "schedule": "sequential", "warmup": 1, "steps": 1}
        memory = time_methods(memory_options, chosen, compact_malloc=True)
    agreement: list[dict] = []
    for worker, job in grad_workers:
        agreement += _collect(worker, job)
    print(format_report(options, timings, memory, agreement), flush=True)


if __name__ == "__main__":
    sys.exit(main())
