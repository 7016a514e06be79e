"""``gpu_check.py``'s environment, overhead, fused CE and accuracy checks, driven from the parent
process through worker jobs (:mod:`gpu_check_jobs`): the methods timed, their ratios to the
baseline at the same batch and ``overhead.py``'s floors, fishertune's CE against the dense CE,
and the fd accuracy criteria."""

from __future__ import annotations

import math
from typing import Any

from fused_ce import DENSE, FISHERTUNE, LOSS_TOLERANCE
from gpu_check_workers import Budget, WorkerError, run_worker
from overhead import (
    BEST_BASELINE_GOALS,
    FLOOR_FD_ERROR,
    FLOOR_FD_MEMORY,
    FLOOR_FD_TIME,
    FLOORS_BY_SIZE,
    METHODS,
)

# timed methods: (label, FisherSFTConfig overrides, attention); the first six are overhead.py's
TIMED = [
    (label, overrides, "eager" if "exact" in label else "sdpa") for label, overrides in METHODS
]
TIMED = [row for row in TIMED if "1/4" not in row[0]]
FLASH = "flash_attention_2"
# the rows overhead.py's floors are for: one draw of token-F / logit-F over every row (m = 2, the
# unbiased estimator, NEFTune matching and hessian-trace do more work by design)
FLOORED = ("token-F fd", "logit-F fd")
# the baselines fishertune offers (CE kernels), and each penalty's fd paths, for the ratios
# against the best baseline (the fastest's step, the lightest's peak)
BASELINES = [label for label, _, _ in TIMED if label.startswith("baseline")]
FD_PATHS = {
    "token-F": ("token-F fd", "token-F fd, chunked CE"),
    "logit-F": ("logit-F fd", "logit-F fd, chunked CE"),
}
TIMED_FLASH = [
    ("baseline, flash-attn 2", {"method": "baseline"}, FLASH),
    *[(f"{label}, flash-attn 2", o, FLASH) for label, o, attention in TIMED if " fd" in label],
]
BASELINES.append("baseline, flash-attn 2")  # a baseline a user may pick too


# ---------------------------------------------------------------------- 5. environment
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
    _against_best_baseline(rows)
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
    if goals:
        floors += best_baseline_floors(rows)
    result["rows"] = rows
    result["floors"] = floors
    result["floors_enforced"] = not options["quick"]
    errors = [f"{row['label']}: {row['error']}" for row in rows if "error" in row]
    errors += [f"{row['label']}: no ratio to its baseline" for row in rows if "step_x" not in row]
    if options["quick"] is False:
        errors += [f"floor missed: {f['name']} {f['value']:.2f}x" for f in floors if not f["ok"]]
    return {"ok": not errors, "error": "; ".join(errors) or None, **result}


def _against_best_baseline(rows: list[dict[str, Any]]) -> None:
    """Each timed row's step against the fastest baseline at its batch and its peak against the
    lightest (``step_x_best``, ``peak_x_best``): the ratios a user should read."""
    for row in rows:
        same = [
            r
            for r in rows
            if r["label"] in BASELINES
            and r.get("batch_size") == row.get("batch_size")
            and "step_s" in r
        ]
        if "step_s" not in row or not same:
            continue
        fastest = min(same, key=lambda r: r["step_s"])
        lightest = min(same, key=lambda r: r["peak_gb"])
        row["fastest_baseline"], row["lightest_baseline"] = fastest["label"], lightest["label"]
        row["step_x_best"] = row["step_s"] / fastest["step_s"]
        row["peak_x_best"] = row["peak_gb"] / lightest["peak_gb"]


def best_baseline_floors(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per penalty, its fd path closest to the goals against the best baseline (both ratios
    within ``BEST_BASELINE_GOALS`` where one path meets both)."""
    time_goal, memory_goal = BEST_BASELINE_GOALS["time"], BEST_BASELINE_GOALS["memory"]

    def excess(row: dict[str, Any]) -> float:
        return max(row["step_x_best"] / time_goal, row["peak_x_best"] / memory_goal)

    floors = []
    for penalty, paths in FD_PATHS.items():
        measured = [r for r in rows if r["label"] in paths and "step_x_best" in r]
        if not measured:
            continue
        best = min(measured, key=excess)
        name = (
            f"{penalty}: {best['label']} vs the best baselines "
            f"(step {best['step_x_best']:.2f}x <= {time_goal}x, "
            f"peak {best['peak_x_best']:.2f}x <= {memory_goal}x); the larger share of its goal"
        )
        floors.append(_floor(name, excess(best), 1.0))
    return floors


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


# ---------------------------------------------------------------------- 2. fused CE
def check_fused_ce(options: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """``fused_ce.py``'s comparison; it fails only where fishertune's CE is not the dense CE's
    (a wrong kernel, a non-finite loss) or either did not run, never because another kernel is
    faster. At most 90 s and a third of the time left: accuracy and training run after it."""
    shape = options["fused_ce"]
    (rows,) = run_worker(options, {"type": "fused_ce"}, min(budget.left() / 3, 90))
    kernels = {row["kernel"]: row for row in rows}
    dense, ours = kernels[DENSE], kernels[FISHERTUNE]
    errors = [f"{row['kernel']}: {row['note']}" for row in (dense, ours) if row["loss"] is None]
    tolerance = LOSS_TOLERANCE[shape["dtype"]]
    if not errors and not (
        math.isfinite(dense["loss"])
        and abs(ours["loss"] - dense["loss"]) <= tolerance * abs(dense["loss"])
    ):
        errors.append(
            f"fishertune's CE {ours['loss']:.7g} is not the dense CE's {dense['loss']:.7g} "
            f"(relative tolerance {tolerance:g})"
        )
    result = {"shape": shape, "device": options["device"], "kernels": rows}
    return {"ok": not errors, "error": "; ".join(errors) or None, **result}


# ---------------------------------------------------------------------- 3. accuracy
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
