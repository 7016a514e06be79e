"""The equivalence study's runs: each run's kind and matched ``alpha`` from its settings,
its losses, answers, validation curve, curvature and breakdown, and the base's numbers, read
through :class:`fishertune.files.RunFolder`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.files import MEASURE_FILE, RunFolder

KINDS = ("baseline", "neftune", "hessian-trace", "token-f-unbiased", "token-f-paper")
REGULARIZERS = KINDS[1:]
LABELS = {
    "baseline": "baseline",
    "neftune": "NEFTune",
    "hessian-trace": "Hessian-trace",
    "token-f-unbiased": "token-F unbiased",
    "token-f-paper": "token-F paper",
}
COLORS = {
    "baseline": "0.35",
    "neftune": "C1",
    "hessian-trace": "C4",
    "token-f-unbiased": "C2",
    "token-f-paper": "C3",
}
# (first, second, the cause their difference isolates)
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("neftune", "baseline", "NEFTune's effect"),
    ("hessian-trace", "neftune", "Taylor remainder + noise gradient variance"),
    ("token-f-unbiased", "hessian-trace", "Gauss-Newton gap"),
    ("token-f-paper", "token-f-unbiased", "estimator bias"),
    ("token-f-paper", "neftune", "all causes: the seed's Fisher penalty vs NEFTune"),
)
METRICS = ("val_loss", "test_loss")
# greedy answers to the test prompts (the offline scorer's generation; absent in loss-only runs)
ANSWER_METRICS = ("reply_length", "distinct_2")
ALPHA = 0.05  # every test's level; intervals are 95% (two-sided) and 90% (TOST)


def run_kind(overrides: dict[str, Any]) -> tuple[str, float] | None:
    """A run's kind (one of :data:`KINDS`) and its matched ``alpha`` (0 for the baseline), from
    its training overrides; ``None`` for a run the study does not compare."""
    method = overrides.get("method", "baseline")
    if method == "baseline":
        return "baseline", 0.0
    if method == "neftune":
        return "neftune", float(overrides["neftune_alpha"])
    alpha = overrides.get("penalty_match_neftune_alpha")
    if alpha is None:
        return None
    if method == "hessian-trace":
        return "hessian-trace", float(alpha)
    if method == "token-f":
        estimator = overrides.get("penalty_estimator") or "paper"
        return f"token-f-{estimator}", float(alpha)
    return None


@dataclass
class StudyRun:
    """One fine-tuning run: name, kind, seed, matched ``alpha``; ``values`` holds ``val_loss``,
    ``test_loss``, ``step_s`` (training seconds per step) and, where answers were generated,
    ``reply_length`` and ``distinct_2``; ``curvature`` the measured splits
    (``{split: {trace_f, trace_h, gap, *_se, rms, loss}}``; empty when not measured);
    ``runaway`` what :func:`runaway` found (``None``: the run behaved)."""

    name: str
    kind: str
    seed: int
    alpha: float
    values: dict[str, float] = field(default_factory=dict)
    curvature: dict[str, dict[str, float]] = field(default_factory=dict)
    runaway: dict[str, Any] | None = None


def runaway(folder: RunFolder) -> dict[str, Any] | None:
    """``{"reason", "step"}`` when a run's training broke down, else ``None``.

    * ``diverged``: training stopped on the guard (run record ``failed``), skipped a non-finite
      step, or logged a non-finite loss or penalty; ``step`` where that happened;
    * ``penalty negative``: the last logged penalty is below 0 (the Hessian-trace penalty is not
      bounded below, and the optimizer can drive it there); ``step`` the first logged step of the
      run of negative values that lasts to the end. A single negative value mid-run is left alone:
      a one-probe estimate of a positive trace can dip below 0 by chance and recover.

    Such a run is its own outcome (reported with its seeds and steps), not a draw from the
    distribution a t interval assumes. The penalty is read as logged, ``penalty`` (the raw
    ``R``) or, in runs logged before it existed, ``penalty_term``: both carry ``R``'s sign.
    """
    record = folder.run_record or {}
    if record.get("status") == "failed":
        return {"reason": "diverged", "step": record.get("global_step")}
    history = (folder.trainer_state or {}).get("log_history", [])
    for entry in history:
        for key in ("loss", "penalty", "penalty_term"):
            value = entry.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return {"reason": "diverged", "step": entry.get("step")}
    if record.get("skipped_steps"):
        return {"reason": "diverged", "step": None}
    key = "penalty" if any("penalty" in e for e in history) else "penalty_term"
    logged = [(e.get("step"), float(e[key])) for e in history if key in e]
    if not logged or logged[-1][1] >= 0:
        return None
    first = len(logged) - 1
    while first > 0 and logged[first - 1][1] < 0:
        first -= 1
    return {"reason": "penalty negative", "step": logged[first][0]}


def validation_curve(folder: RunFolder) -> dict[str, float]:
    """The validation loss evaluated along training (``eval_loss`` in ``log_history``):

    * ``val_curve_last``: its value at the last evaluated step;
    * ``val_curve_best``: its minimum over the evaluated steps, ``val_curve_best_step`` where;
    * ``val_curve_rise = last - best`` (> 0: the run overfits after its best step).

    The last entry of a step wins (the run's closing evaluation repeats the last step). Empty for a
    run that did not evaluate along training (older runs, or ``eval_strategy: no``).
    """
    history = (folder.trainer_state or {}).get("log_history", [])
    points: dict[int, float] = {}
    for entry in history:
        value, step = entry.get("eval_loss"), entry.get("step")
        if isinstance(value, (int, float)) and isinstance(step, int):
            points[step] = float(value)
    if not points:
        return {}
    best_step = min(points, key=lambda s: (points[s], s))
    last = points[max(points)]
    return {
        "val_curve_last": last,
        "val_curve_best": points[best_step],
        "val_curve_best_step": float(best_step),
        "val_curve_rise": last - points[best_step],
    }


def _curvature(record: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Per measured split: the means, between-batch standard errors, and the estimators' noise.

    ``{trace}_noise`` is the relative standard deviation of a one-direction estimate of the trace
    on one measured batch: the estimator's own standard error ``se`` of the mean over ``n``
    batches with ``c`` directions each (Rademacher probes for ``Tr(H_X)``, target draws for
    ``Tr(F_X)``) gives ``se sqrt(n) sqrt(c) / |mean|``. A penalty with ``K`` directions per
    position (``penalty_samples``) has ``1 / sqrt(K)`` of it on a batch of the same size.
    """
    if not record:
        return {}
    splits = record.get("splits") or {record.get("split", "validation"): record["final"]}
    directions = {"trace_h": record.get("probes"),
                  "trace_f": record.get("fisher_draws") or record.get("probes")}  # fmt: skip
    out = {}
    for split, entry in splits.items():
        values = {"rms": float(entry["embedding_rms"]), "loss": float(entry["loss"]["mean"])}
        for key in ("trace_f", "trace_h", "gap"):
            values[key] = float(entry[key]["mean"])
            values[f"{key}_se"] = float(entry[key].get("se_batches", math.nan))
        values["batches"] = int(entry["trace_f"].get("num_batches", 0))
        for key, count in directions.items():
            se = entry[key].get("se_estimator")
            mean = abs(values[key])
            values[f"{key}_noise"] = (
                float(se) * math.sqrt(values["batches"] * count) / mean
                if isinstance(se, (int, float)) and isinstance(count, int) and mean > 0
                else math.nan
            )
        out[split] = values
    return out


def _step_seconds(folder: RunFolder) -> float:
    record = folder.run_record or {}
    runtime = (record.get("metrics") or {}).get("train_runtime")
    steps = record.get("global_step")
    if not runtime or not steps:
        return math.nan
    return float(runtime) / float(steps)


def _base_numbers(runs_dir: Path) -> dict[str, Any]:
    from fishertune.experiments.grid import BASE_RUN

    folder = RunFolder(runs_dir / BASE_RUN)
    if not folder.measured:
        raise FishertuneError(
            f"{runs_dir / BASE_RUN / MEASURE_FILE}: the base stage has no measurement yet; "
            "the equivalence report needs it (its rms, L and d place every noise level)"
        )
    final = folder.curvature["final"]
    metrics = (folder.evaluation or {}).get("metrics", {})
    record = folder.run_record or {}
    return {
        "rms": float(final["embedding_rms"]),
        "length": int(final["typical_length"]),
        "hidden_size": int(final["hidden_size"]),
        "val_loss": float(metrics.get("offline/val_loss", math.nan)),
        "test_loss": float(metrics.get("offline/test_loss", math.nan)),
        "steps": record.get("global_step"),
        "train_loss": (record.get("metrics") or {}).get("train_loss"),
        "tokens_seen": _tokens_seen(folder),
        "parameters": _parameters(folder),
        "curvature": _curvature(folder.curvature),
    }


def _tokens_seen(folder: RunFolder) -> float | None:
    """TRL's ``num_tokens`` at the last logged step of the base's training."""
    history = (folder.trainer_state or {}).get("log_history", [])
    counts = [float(e["num_tokens"]) for e in history if "num_tokens" in e]
    return counts[-1] if counts else None


def _parameters(folder: RunFolder) -> int | None:
    """The number of parameters in the base's saved weights (safetensors header shapes)."""
    weights = folder.model_dir / "model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            total += math.prod(f.get_slice(key).get_shape())
    return total


def load_study(runs_dir: str | Path, names: Sequence[str]) -> tuple[dict[str, Any], list[StudyRun]]:
    """The base's numbers and every evaluated run among ``names`` the study compares.

    Raises:
        FishertuneError: when the base run has no measurement yet.
    """
    from fishertune.experiments.grid import BASE_RUN

    runs_dir = Path(runs_dir)
    base = _base_numbers(runs_dir)
    runs = []
    for name in names:
        if name == BASE_RUN:
            continue
        folder = RunFolder(runs_dir / name)
        spec, evaluation = folder.spec, folder.evaluation
        if spec is None:
            continue
        found = run_kind(spec.get("overrides", {}))
        if found is None:
            continue
        broke = runaway(folder)
        # a training the guard stopped has no scores, but it is an outcome of its arm
        if evaluation is None and (broke is None or broke["reason"] != "diverged"):
            continue
        metrics = (evaluation or {}).get("metrics", {})
        values = {m: float(metrics.get(f"offline/{m}", math.nan)) for m in METRICS}
        values["step_s"] = _step_seconds(folder)
        for m in ANSWER_METRICS:
            if f"offline/{m}" in metrics:
                values[m] = float(metrics[f"offline/{m}"])
        values.update(validation_curve(folder))
        runs.append(
            StudyRun(
                name=name,
                kind=found[0],
                seed=int(spec.get("seed", 0)),
                alpha=found[1],
                values=values,
                curvature=_curvature(folder.curvature) if folder.measured else {},
                runaway=broke,
            )
        )
    return base, runs
