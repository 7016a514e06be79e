"""The equivalence study's report: NEFTune vs its matched curvature penalties, causes separated.

NEFTune adds uniform noise of half-width ``a = alpha / sqrt(L d)`` to the input embeddings ``X``;
to second order ``E_eps[CE(X + eps)] = CE(X) + (a^2 / 6) Tr(H_X)``. The grid (the shipped
``sharegpt-equivalence`` preset) trains, per noise level, four regularizers matched to the same
``alpha`` row by row (``lambda_b = alpha^2 / (6 L_b d)``), plus the baseline, over paired seeds.
Each adjacent pair differs by one cause:

* NEFTune vs **Hessian-trace** (``lambda Tr(H_X)``, the noise's own second-order term): the
  Taylor series' higher terms and the noise's gradient variance;
* Hessian-trace vs **token-F unbiased** (``lambda Tr(F_X)`` with an unbiased gradient): the
  Gauss-Newton gap ``Tr(H_X) - Tr(F_X)``;
* token-F unbiased vs **token-F paper** (the seed's estimator, ``y'`` held constant): the
  estimator's gradient bias (its dropped score-function term).

Statistics (:mod:`fishertune.experiments.statistics`), all on per-seed differences (runs of one
seed share the base and the data order):

* the question as an effect to reproduce: each regularizer's paired effect against the baseline
  over NEFTune's at the same level, a ratio with Fieller's 95% interval, and equivalence by TOST
  of the ratio inside ``1 ± ratio_margin`` (fixed in the preset), only where NEFTune's own effect
  is detected (its 95% CI excludes 0); elsewhere "no effect to match", never "equivalent";
* the cause chain: mean difference of validation and test loss with its 95% t interval, each
  step's share of NEFTune's effect (Fieller), and, with an absolute ``margin``, TOST against it;
* the ``a^2`` law as a prediction between levels: the effect at the largest level times
  ``(a_i / a_max)^2`` against the effect measured at level ``i``, seed by seed; the least-squares
  slope on ``a^2`` stays beside it;
* Holm over each family (reproduction, the chain per loss, the predictions): verdicts read the
  adjusted p-values, and the report lists those the correction changed;
* runaway runs (the last logged penalty negative, or training diverged) as their own outcome,
  left out of every interval;
* greedy answers (where generated): paired change of mean length and distinct-2;
* along training (where the runs evaluated validation loss every few steps): the last and the best
  validation loss per method, the baseline's rise after its best step (overfitting), and each
  regularizer's best against the baseline's, with its share of NEFTune's;
* practitioner's choice: each method at its best level by mean validation loss, its test-loss
  difference to the baseline, and its measured seconds per training step (the runs' own
  ``train_runtime / global_step``, mean over all its runs) against the baseline's.

Curvature (the ``measure`` stage, :mod:`fishertune.experiments.curvature`): ``Tr(F_X)``,
``Tr(H_X)``, the gap, per split measured, with their between-batch standard errors; the embedding
rms and the scale-free curvature ``rms^2 Tr`` of every measured run.

Written into the report folder: ``equivalence.md``, ``equivalence.json``,
``equivalence_pairs.png`` (the four comparisons per level with 95% intervals and the margin),
``equivalence_ratio.png`` (each regularizer's share of NEFTune's effect per level with Fieller's
interval and the equivalence band), ``equivalence_slope.png`` (effect vs ``a^2`` with the fitted
lines), ``equivalence_choice.png``
(test-loss change at the best level vs cost per step).
"""

from __future__ import annotations

import json
import math
import statistics as pystats
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.experiments.statistics import (
    equivalence_test,
    fieller_ratio,
    holm,
    paired_difference,
    ratio_equivalence,
    scaled_prediction,
    scaling_slope,
    seeds_for_power,
)
from fishertune.files import MEASURE_FILE, RunFolder

__all__ = [
    "COMPARISONS",
    "KINDS",
    "StudyRun",
    "format_markdown",
    "load_study",
    "run_kind",
    "runaway",
    "summarize",
    "write_equivalence_report",
]

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


def _cell(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    sd = pystats.stdev(finite) if len(finite) > 1 else math.nan
    return {"mean": pystats.fmean(finite), "sd": sd, "n": len(finite)}


def _seed_values(runs: Sequence[StudyRun], metric: str) -> tuple[dict[int, float], list[int]]:
    """``{seed: value}`` of the runs that behaved, and the seeds left out as runaways."""
    kept = {r.seed: r.values.get(metric, math.nan) for r in runs if r.runaway is None}
    return kept, sorted(r.seed for r in runs if r.runaway is not None)


def _common(
    *groups: Sequence[StudyRun], metric: str
) -> tuple[list[int], list[list[float]], list[int]]:
    """The seeds every group has a finite, non-runaway value for, the values per group in seed
    order, and the seeds left out because a run of theirs ran away."""
    found = [_seed_values(g, metric) for g in groups]
    excluded = sorted({s for _, out in found for s in out})
    seeds = sorted(set.intersection(*(set(values) for values, _ in found)))
    seeds = [s for s in seeds if all(math.isfinite(values[s]) for values, _ in found)]
    return seeds, [[values[s] for s in seeds] for values, _ in found], excluded


def _paired(
    first: Sequence[StudyRun],
    second: Sequence[StudyRun],
    metric: str,
    margin: float | None,
) -> dict[str, Any] | None:
    """Paired difference (95% CI) over the seeds both have (runaway runs left out, and listed in
    ``excluded``); with an absolute ``margin``, TOST against it and the seeds needed for 80% power
    at it. ``verdict_raw`` is read from the uncorrected test; ``summarize`` adds Holm's.
    ``None`` with fewer than 2 pairs."""
    seeds, (values, reference), excluded = _common(first, second, metric=metric)
    if len(seeds) < 2:
        return None
    diff = paired_difference(values, reference)
    out: dict[str, Any] = {
        **asdict(diff),
        "detected": diff.detected,
        "seeds": seeds,
        "excluded": excluded,
        "tost_p": None,
        "tost_low": None,
        "tost_high": None,
        "equivalent": None,
        "seeds_for_power": None,
    }
    if margin is not None:
        tost = equivalence_test(values, reference, margin=margin)
        try:
            needed = seeds_for_power(margin, diff.sd) if diff.sd > 0 else 2
        except FishertuneError:
            needed = None
        out.update(
            tost_p=tost.p_value,
            tost_low=tost.low,
            tost_high=tost.high,
            equivalent=tost.equivalent,
            seeds_for_power=needed,
        )
    out["verdict_raw"] = _difference_verdict(out, diff.p_value)
    return out


def _difference_verdict(result: dict[str, Any], p_value: float) -> str:
    """The four verdicts with an absolute margin, two without; "different" read from
    ``p_value`` (raw or Holm-adjusted), equivalence from the TOST's own p-value (``tost_p``,
    likewise)."""
    different = p_value < ALPHA
    if result["tost_p"] is None:
        return "different" if different else "no detectable difference"
    equivalent = result["tost_p"] < ALPHA
    if equivalent and different:
        return "different, inside the margin"
    if equivalent:
        return "equivalent"
    return "different" if different else "no detectable difference"


def _match(x: Sequence[float], y: Sequence[float], ratio_margin: float) -> dict[str, Any]:
    """``x`` against the target ``y`` (per seed): the ratio of means with Fieller's 95% interval,
    TOST of the ratio inside ``[1 - ratio_margin, 1 + ratio_margin]`` (p and the 90% Fieller
    interval), and the paired t-test of ``x - y`` (ratio 1; its p-value)."""
    ratio = fieller_ratio(x, y)
    tost = ratio_equivalence(x, y, lower=1 - ratio_margin, upper=1 + ratio_margin, alpha=ALPHA)
    differ = paired_difference(x, y)
    return {
        "ratio": asdict(ratio),
        "ratio_90": asdict(tost.interval),
        "tost_p": tost.p_value,
        "differ_p": differ.p_value,
        "differ_mean": differ.mean,
    }


def _match_verdict(entry: dict[str, Any], tost_p: float, differ_p: float, what: str) -> str:
    if tost_p < ALPHA:
        return f"reproduces {what}"
    if differ_p < ALPHA:
        below = abs(entry["ratio"]["ratio"]) < 1
        return f"different: {'less' if below else 'more'} than {what}"
    return "inconclusive"


def _reproduction(
    members: dict[str, list[StudyRun]], neftune_effect: dict[str, Any] | None, ratio_margin: float
) -> dict[str, Any]:
    """Each regularizer's paired effect on validation loss against the baseline, as a fraction of
    NEFTune's on the same seeds; matched only where NEFTune's own effect is detected."""
    out: dict[str, Any] = {}
    for kind in REGULARIZERS[1:]:
        if not members.get(kind) or not members.get("neftune"):
            continue
        seeds, (value, neftune, base), excluded = _common(
            members[kind], members["neftune"], members["baseline"], metric="val_loss"
        )
        if len(seeds) < 2:
            continue
        x = [v - b for v, b in zip(value, base, strict=True)]
        y = [v - b for v, b in zip(neftune, base, strict=True)]
        entry: dict[str, Any] = {
            "effect": asdict(paired_difference(x)),
            "neftune": asdict(paired_difference(y)),
            "seeds": seeds,
            "excluded": excluded,
            "to_match": bool(neftune_effect and neftune_effect["detected"]),
        }
        if entry["to_match"]:
            entry.update(_match(x, y, ratio_margin))
            entry["verdict_raw"] = _match_verdict(
                entry, entry["tost_p"], entry["differ_p"], "NEFTune's effect"
            )
        else:
            entry["ratio"] = asdict(fieller_ratio(x, y))
            entry["verdict_raw"] = entry["verdict"] = "no effect to match"
        out[kind] = entry
    return out


def _predictions(
    runs: Sequence[StudyRun],
    baseline: Sequence[StudyRun],
    kind: str,
    ratio_margin: float,
) -> dict[str, Any] | None:
    """The ``a^2`` law as a prediction between levels: the effect (against the baseline, per seed)
    at the largest level, times ``(a_i / a_max)^2``, against the effect measured at level ``i``.
    Only when the largest level's effect is detected: scaling an undetected effect predicts
    nothing."""
    levels = sorted({r.alpha for r in runs if r.kind == kind})
    if len(levels) < 2:
        return None
    top = levels[-1]
    at = {alpha: [r for r in runs if r.kind == kind and r.alpha == alpha] for alpha in levels}
    seeds, (value, base), _ = _common(at[top], baseline, metric="val_loss")
    if len(seeds) < 2:
        return None
    top_effect = paired_difference([v - b for v, b in zip(value, base, strict=True)])
    out: dict[str, Any] = {"top_alpha": top, "top_effect": asdict(top_effect), "levels": []}
    if not top_effect.detected:
        out["status"] = "no effect at the largest level to scale"
        return out
    out["status"] = "tested"
    for alpha in levels[:-1]:
        seeds, (low, high, base), excluded = _common(
            at[alpha], at[top], baseline, metric="val_loss"
        )
        if len(seeds) < 2:
            continue
        factor = (alpha / top) ** 2  # a = alpha / sqrt(L d): the scale cancels
        measured = [v - b for v, b in zip(low, base, strict=True)]
        source = [v - b for v, b in zip(high, base, strict=True)]
        difference = scaled_prediction(measured, source, factor)
        entry = {
            "alpha": alpha,
            "factor": factor,
            "measured": math.fsum(measured) / len(measured),
            "predicted": factor * math.fsum(source) / len(source),
            "difference": asdict(difference),
            "seeds": seeds,
            "excluded": excluded,
            **_match(measured, [factor * s for s in source], ratio_margin),
        }
        entry["verdict_raw"] = _match_verdict(
            entry, entry["tost_p"], entry["differ_p"], "the a² prediction"
        )
        out["levels"].append(entry)
    return out


def _holm_family(
    name: str,
    members: list[tuple[str, dict[str, Any], list[str]]],
    verdict: Any,
) -> dict[str, Any]:
    """Holm over ``members`` (label, the result, its p-value keys); writes ``*_holm`` beside each
    p-value and ``verdict`` (``verdict(result, adjusted)``), and lists the verdicts the
    correction changed."""
    keys = [(i, key) for i, (_, _, ks) in enumerate(members) for key in ks]
    raw = [members[i][1][key] for i, key in keys]
    adjusted = holm(raw) if raw else []
    for (i, key), value in zip(keys, adjusted, strict=True):
        members[i][1][f"{key}_holm"] = value
    changed = []
    for label, result, ks in members:
        result["verdict"] = verdict(result, {k: result[f"{k}_holm"] for k in ks})
        if result["verdict"] != result["verdict_raw"]:
            changed.append({"what": label, "raw": result["verdict_raw"], "holm": result["verdict"]})
    return {"name": name, "tests": len(raw), "changed": changed}


def _answers(members: dict[str, list[StudyRun]], baseline: Sequence[StudyRun]) -> dict[str, Any]:
    """Each method's paired change of the greedy answers' mean length and distinct-2 against the
    baseline (only where the runs generated answers)."""
    out: dict[str, Any] = {}
    for kind in REGULARIZERS:
        for metric in ANSWER_METRICS:
            result = _paired(members.get(kind, []), baseline, metric, None)
            if result is not None:
                out.setdefault(kind, {})[metric] = result
    return out


CURVE_METRICS = ("val_curve_last", "val_curve_best", "val_curve_best_step", "val_curve_rise")


def _along_training(
    members: dict[str, list[StudyRun]], baseline: Sequence[StudyRun]
) -> dict[str, Any] | None:
    """The validation curve's last and best values per method (mean ± sd), the baseline's rise
    from its best to its last evaluation (paired over seeds: > 0 is overfitting), and each
    regularizer's best validation loss against the baseline's best (paired, uncorrected 95% CI)
    with its ratio to NEFTune's (Fieller 95%) where NEFTune's effect on the best is detected.
    ``None`` when no run evaluated along training."""
    if not any("val_curve_best" in r.values for r in baseline):
        return None
    rows = {
        kind: {m: _cell([r.values.get(m, math.nan) for r in members[kind]]) for m in CURVE_METRICS}
        for kind in KINDS
        if members.get(kind)
    }
    pairs = [
        (r.values["val_curve_last"], r.values["val_curve_best"])
        for r in baseline
        if r.runaway is None and "val_curve_best" in r.values
    ]
    last, best = [a for a, _ in pairs], [b for _, b in pairs]
    rise = asdict(paired_difference(last, best)) if len(pairs) >= 2 else None
    neftune = _paired(members.get("neftune", []), baseline, "val_curve_best", None)
    best_vs_baseline = {}
    for kind in REGULARIZERS:
        result = _paired(members.get(kind, []), baseline, "val_curve_best", None)
        if result is None:
            continue
        if kind != "neftune" and neftune is not None and neftune["detected"]:
            seeds, (a, n, z), _ = _common(
                members[kind], members["neftune"], baseline, metric="val_curve_best"
            )
            if len(seeds) >= 2:
                result["ratio"] = asdict(
                    fieller_ratio(
                        [p - q for p, q in zip(a, z, strict=True)],
                        [p - q for p, q in zip(n, z, strict=True)],
                    )
                )
        best_vs_baseline[kind] = result
    return {"rows": rows, "baseline_rise": rise, "best_vs_baseline": best_vs_baseline}


def _runaways(runs: Sequence[StudyRun]) -> list[dict[str, Any]]:
    """Per method and level with a runaway run: how many of its seeds, which, why and when."""
    out = []
    for kind in KINDS:
        for alpha in sorted({r.alpha for r in runs if r.kind == kind}):
            cell = [r for r in runs if r.kind == kind and r.alpha == alpha]
            away = sorted((r for r in cell if r.runaway is not None), key=lambda r: r.seed)
            if away:
                out.append(
                    {
                        "kind": kind,
                        "alpha": alpha,
                        "count": len(away),
                        "of": len(cell),
                        "seeds": [{"seed": r.seed, **r.runaway} for r in away],
                    }
                )
    return out


def _slope(
    runs: Sequence[StudyRun], baseline: Sequence[StudyRun], kind: str, base: dict[str, Any]
) -> dict[str, Any] | None:
    """The paired effect ``val_loss(kind) - val_loss(baseline)`` of each seed and level against
    ``a^2`` (``a = alpha / sqrt(L d)``): least squares with the slope's 95% interval (runaway
    runs left out)."""
    by_seed, _ = _seed_values(baseline, "val_loss")
    scale = math.sqrt(base["length"] * base["hidden_size"])
    points = [
        ((r.alpha / scale) ** 2, r.values["val_loss"] - by_seed[r.seed])
        for r in runs
        if r.kind == kind
        and r.runaway is None
        and r.seed in by_seed
        and math.isfinite(r.values["val_loss"])
        and math.isfinite(by_seed[r.seed])
    ]
    try:
        fit = scaling_slope([x for x, _ in points], [y for _, y in points])
    except FishertuneError:
        return None
    return {**asdict(fit), "points": points}


def summarize(
    base: dict[str, Any],
    runs: Sequence[StudyRun],
    *,
    ratio_margin: float,
    margin: float | None = None,
) -> dict[str, Any]:
    """Levels (NEFTune's effect, each regularizer's share of it, the cause chain, answers), the
    ``a^2`` predictions, slopes, runaways, Holm's corrections, the practitioner's choice and the
    curvature table (see the module docstring)."""
    if not 0 < ratio_margin < 1:
        raise FishertuneError(f"ratio margin must lie in (0, 1), got {ratio_margin!r}")
    baseline = [r for r in runs if r.kind == "baseline"]
    if not baseline:
        raise FishertuneError("the equivalence report needs finished baseline runs")
    scale = math.sqrt(base["length"] * base["hidden_size"])
    levels = []
    for alpha in sorted({r.alpha for r in runs if r.kind != "baseline"}):
        members = {k: [r for r in runs if r.kind == k and r.alpha == alpha] for k in REGULARIZERS}
        members["baseline"] = baseline
        rows = {
            kind: {
                **{
                    m: _cell([r.values.get(m, math.nan) for r in members[kind]])
                    for m in (*METRICS, "step_s", *ANSWER_METRICS)
                },
                "runaway": sum(r.runaway is not None for r in members[kind]),
            }
            for kind in KINDS
            if members[kind]
        }
        neftune_effect = _paired(members["neftune"], baseline, "val_loss", None)
        comparisons = []
        for first, second, cause in COMPARISONS:
            for metric in METRICS:
                result = _paired(members[first], members[second], metric, margin)
                if result is None:
                    continue
                entry = {
                    "first": first,
                    "second": second,
                    "cause": cause,
                    "metric": metric,
                    **result,
                }
                if neftune_effect is not None and neftune_effect["detected"]:
                    # the step as a fraction of NEFTune's effect: which cause carries how much
                    seeds, (a, b, n, z), _ = _common(
                        members[first], members[second], members["neftune"], baseline, metric=metric
                    )
                    if len(seeds) >= 2:
                        entry["share"] = asdict(
                            fieller_ratio(
                                [p - q for p, q in zip(a, b, strict=True)],
                                [p - q for p, q in zip(n, z, strict=True)],
                            )
                        )
                comparisons.append(entry)
        against_baseline = {}
        for kind in REGULARIZERS:
            result = _paired(members[kind], baseline, "test_loss", margin)
            if result is not None:
                result["verdict"] = result["verdict_raw"]
                against_baseline[kind] = result
        levels.append(
            {
                "alpha": alpha,
                "a": alpha / scale,
                "ratio": alpha / scale / base["rms"],
                "lambda_eq_typical": (alpha / scale) ** 2 / 6.0,
                "rows": rows,
                "neftune_effect": neftune_effect,
                "reproduction": _reproduction(members, neftune_effect, ratio_margin),
                "comparisons": comparisons,
                "answers": _answers(members, baseline),
                "along_training": _along_training(members, baseline),
                "test_vs_baseline": against_baseline,
            }
        )
    predictions = {
        kind: found
        for kind in REGULARIZERS
        if (found := _predictions(runs, baseline, kind, ratio_margin)) is not None
    }
    corrections = _corrections(levels, predictions)
    slopes = {kind: _slope(runs, baseline, kind, base) for kind in REGULARIZERS}
    choice = _choice(levels, runs)
    measured = [
        {"name": r.name, "kind": r.kind, "alpha": r.alpha, "seed": r.seed, "splits": r.curvature}
        for r in runs
        if r.curvature
    ]
    return {
        "margin": margin,
        "ratio_margin": ratio_margin,
        "base": base,
        "levels": levels,
        "predictions": predictions,
        "corrections": corrections,
        "runaways": _runaways(runs),
        "slopes": slopes,
        "choice": choice,
        "curvature": measured,
        "runs": [asdict(r) for r in runs],
    }


def _corrections(
    levels: Sequence[dict[str, Any]], predictions: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Holm over each family of tests the report reads verdicts from: the reproduction of
    NEFTune's effect (equivalence and difference of every regularizer at every level with an
    effect to match), the cause chain per loss (every comparison at every level), and the ``a^2``
    predictions. Each verdict is then read from the adjusted p-values; ``verdict_raw`` keeps the
    uncorrected one."""
    families = []
    match_keys = ["tost_p", "differ_p"]
    members = [
        (f"{LABELS[kind]} at a/rms {level['ratio']:.2g}", entry, match_keys)
        for level in levels
        for kind, entry in level["reproduction"].items()
        if entry["to_match"]
    ]
    families.append(
        _holm_family(
            "reproduction of NEFTune's effect (validation loss)",
            members,
            lambda r, p: _match_verdict(r, p["tost_p"], p["differ_p"], "NEFTune's effect"),
        )
    )
    for metric in METRICS:
        members = [
            (
                f"{LABELS[c['first']]} − {LABELS[c['second']]} at a/rms {level['ratio']:.2g}",
                c,
                ["p_value", "tost_p"] if c["tost_p"] is not None else ["p_value"],
            )
            for level in levels
            for c in level["comparisons"]
            if c["metric"] == metric
        ]

        def chain(result: dict[str, Any], adjusted: dict[str, float]) -> str:
            return _difference_verdict(
                {**result, "tost_p": adjusted.get("tost_p")}, adjusted["p_value"]
            )

        families.append(_holm_family(f"cause chain ({metric.replace('_', ' ')})", members, chain))
    members = [
        (f"{LABELS[kind]} at alpha {entry['alpha']:.4g}", entry, match_keys)
        for kind, found in predictions.items()
        for entry in found["levels"]
    ]
    families.append(
        _holm_family(
            "a² predictions",
            members,
            lambda r, p: _match_verdict(r, p["tost_p"], p["differ_p"], "the a² prediction"),
        )
    )
    return families


def _choice(levels: Sequence[dict[str, Any]], runs: Sequence[StudyRun]) -> dict[str, Any]:
    """Each regularizer at its level of lowest mean validation loss: that level, its test-loss
    difference to the baseline (paired, 95% CI), and its cost per step (mean over all its runs,
    every level: the computation per step does not depend on the strength) against the
    baseline's."""
    steps = {kind: _cell([r.values["step_s"] for r in runs if r.kind == kind]) for kind in KINDS}
    out: dict[str, Any] = {"baseline_step": steps["baseline"]}
    for kind in REGULARIZERS:
        candidates = [
            lv for lv in levels if kind in lv["rows"] and lv["rows"][kind]["val_loss"]["n"]
        ]
        if not candidates:
            continue
        best = min(candidates, key=lambda lv: lv["rows"][kind]["val_loss"]["mean"])
        out[kind] = {
            "alpha": best["alpha"],
            "ratio": best["ratio"],
            "val_loss": best["rows"][kind]["val_loss"],
            "test_loss": best["rows"][kind]["test_loss"],
            "test_vs_baseline": best["test_vs_baseline"].get(kind),
            "step_s": steps[kind]["mean"],
            "step_sd": steps[kind]["sd"],
            "cost_vs_baseline": steps[kind]["mean"] / steps["baseline"]["mean"]
            if steps["baseline"]["n"]
            else math.nan,
        }
    return out


# ------------------------------------------------------------------------------- markdown


def _num(value: Any, fmt: str = "+.4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, fmt)


def _ci(result: dict[str, Any] | None) -> str:
    if result is None:
        return "–"
    return f"{result['mean']:+.4f} [{result['low']:+.4f}, {result['high']:+.4f}]"


def _mean_sd(cell: dict[str, Any]) -> str:
    if not cell["n"]:
        return "–"
    sd = "" if not math.isfinite(cell["sd"]) else f" ± {cell['sd']:.4f}"
    return f"{cell['mean']:.4f}{sd}"


def _base_text(base: dict[str, Any]) -> str:
    tokens = base["tokens_seen"]
    params = base["parameters"]
    lines = [
        f"Base model: {_num(params, ',d') if params else '–'} parameters (d = "
        f"{base['hidden_size']}), pretrained for {base['steps']} steps on "
        f"{_num(tokens, ',.0f') if tokens else '–'} tokens of part A's text; on the chat data "
        f"(assistant tokens) validation loss {base['val_loss']:.4f}, test loss "
        f"{base['test_loss']:.4f}; embedding rms {base['rms']:.4g}, typical length L = "
        f"{base['length']} tokens.",
    ]
    return "\n".join(lines) + "\n"


def _curvature_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| run | split | Tr(F_X) | Tr(H_X) | gap | rms | rms²·Tr(F_X) | rms²·Tr(H_X) | batches "
        "| one-direction rel. sd Tr(F_X) / Tr(H_X) |",
        "|" + "---|" * 10,
    ]
    entries = [{"name": "base", "splits": summary["base"]["curvature"]}, *summary["curvature"]]
    for entry in entries:
        for split, c in entry["splits"].items():
            rms2 = c["rms"] ** 2
            lines.append(
                f"| {entry['name']} | {split} | {c['trace_f']:.4g} ± {c['trace_f_se']:.2g} | "
                f"{c['trace_h']:.4g} ± {c['trace_h_se']:.2g} | {c['gap']:.4g} ± "
                f"{c['gap_se']:.2g} | {c['rms']:.4g} | {rms2 * c['trace_f']:.3g} | "
                f"{rms2 * c['trace_h']:.3g} | {c['batches']} | "
                f"{_num(c.get('trace_f_noise', math.nan), '.2f')} / "
                f"{_num(c.get('trace_h_noise', math.nan), '.2f')} |"
            )
    return lines


def _ratio_text(ratio: dict[str, Any] | None) -> str:
    if ratio is None:
        return "–"
    if ratio["kind"] == "bounded":
        return f"{ratio['ratio']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"
    if ratio["kind"] == "exclusive":
        return f"{ratio['ratio']:.2f} (outside ({ratio['low']:.2f}, {ratio['high']:.2f}))"
    return f"{ratio['ratio']:.2f} (unbounded)"


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.2g}"


def _excluded(result: dict[str, Any]) -> str:
    return ", ".join(str(s) for s in result.get("excluded") or []) or "–"


def _reproduction_table(summary: dict[str, Any]) -> list[str]:
    lo, hi = 1 - summary["ratio_margin"], 1 + summary["ratio_margin"]
    lines = [
        "| a/rms | NEFTune − baseline [95% CI] | method | method − baseline [95% CI] | ratio to "
        f"NEFTune [95% Fieller] | 90% Fieller | TOST p in [{lo:g}, {hi:g}] (Holm) | p ratio = 1 "
        "(Holm) | verdict (Holm) | seeds left out |",
        "|" + "---|" * 10,
    ]
    for level in summary["levels"]:
        for kind, entry in level["reproduction"].items():
            if entry["to_match"]:
                tost = f"{entry['tost_p']:.2g} ({entry['tost_p_holm']:.2g})"
                differ = f"{entry['differ_p']:.2g} ({entry['differ_p_holm']:.2g})"
                ratio90 = _ratio_text(entry["ratio_90"])
            else:
                tost = differ = ratio90 = "–"
            lines.append(
                f"| {level['ratio']:.2g} | {_ci(entry['neftune'])} | {LABELS[kind]} | "
                f"{_ci(entry['effect'])} | {_ratio_text(entry['ratio'])} | {ratio90} | {tost} | "
                f"{differ} | {entry['verdict']} | {_excluded(entry)} |"
            )
    return lines


def _prediction_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| method | level (alpha) | (a_i/a_max)² | measured | predicted | measured − predicted "
        "[95% CI] | measured / predicted [95% Fieller] | verdict (Holm) |",
        "|" + "---|" * 8,
    ]
    for kind, found in summary["predictions"].items():
        top = found["top_effect"]
        if found["status"] != "tested":
            lines.append(
                f"| {LABELS[kind]} | largest {found['top_alpha']:.4g}: {_ci(top)} | – | – | – | – "
                f"| – | {found['status']} |"
            )
            continue
        for entry in found["levels"]:
            lines.append(
                f"| {LABELS[kind]} | {entry['alpha']:.4g} (from {found['top_alpha']:.4g}) | "
                f"{entry['factor']:.3g} | {entry['measured']:+.4f} | {entry['predicted']:+.4f} | "
                f"{_ci(entry['difference'])} | {_ratio_text(entry['ratio'])} | "
                f"{entry['verdict']} |"
            )
    return lines


def _runaway_table(summary: dict[str, Any]) -> list[str]:
    if not summary["runaways"]:
        return ["No run ran away: no penalty ended negative, no training diverged."]
    lines = ["| method | alpha | runs | seed: reason (from step) |", "|---|---|---|---|"]
    for cell in summary["runaways"]:
        seeds = "; ".join(
            f"{s['seed']}: {s['reason']}"
            + (f" (step {s['step']})" if s["step"] is not None else "")
            for s in cell["seeds"]
        )
        lines.append(
            f"| {LABELS[cell['kind']]} | {cell['alpha']:.4g} | {cell['count']} of {cell['of']} "
            f"| {seeds} |"
        )
    return lines


def _corrections_text(summary: dict[str, Any]) -> list[str]:
    lines = []
    for family in summary["corrections"]:
        changed = "; ".join(f"{c['what']}: {c['raw']} → {c['holm']}" for c in family["changed"])
        lines.append(
            f"- {family['name']}: {family['tests']} tests; verdicts changed by the correction: "
            f"{changed or 'none'}."
        )
    return lines


def _answers_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| a/rms | method | mean length − baseline [95% CI] | distinct-2 − baseline [95% CI] |",
        "|---|---|---|---|",
    ]
    found = False
    for level in summary["levels"]:
        for kind, entry in level["answers"].items():
            found = True
            lines.append(
                f"| {level['ratio']:.2g} | {LABELS[kind]} | {_ci(entry.get('reply_length'))} | "
                f"{_ci(entry.get('distinct_2'))} |"
            )
    return lines if found else []


def _along_training_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| a/rms | method | last | best | best at step | best − baseline's best [95% CI] "
        "| share of NEFTune's (Fieller 95%) |",
        "|" + "---|" * 7,
    ]
    found = False
    for level in summary["levels"]:
        along = level.get("along_training")
        if along is None:
            continue
        found = True
        for kind, row in along["rows"].items():
            result = along["best_vs_baseline"].get(kind)
            lines.append(
                f"| {level['ratio']:.2g} | {LABELS[kind]} | {_mean_sd(row['val_curve_last'])} | "
                f"{_mean_sd(row['val_curve_best'])} | "
                f"{_num(row['val_curve_best_step']['mean'], '.0f')} | "
                f"{_ci(result) if result else '–'} | "
                f"{_ratio_text(result.get('ratio')) if result else '–'} |"
            )
    if not found:
        return []
    rise = next(
        (
            lv["along_training"]["baseline_rise"]
            for lv in summary["levels"]
            if lv.get("along_training")
        ),
        None,
    )
    if rise is not None:
        lines.append("")
        lines.append(
            f"The baseline's last − best validation loss (paired over seeds): {_ci(rise)} "
            "(> 0: it overfits after its best step)."
        )
    return lines


def _reading(summary: dict[str, Any]) -> list[str]:
    """Sentences computed from the (Holm-corrected) verdicts: only what the intervals support."""
    lines = []
    lo, hi = 1 - summary["ratio_margin"], 1 + summary["ratio_margin"]
    for level in summary["levels"]:
        effect = level["neftune_effect"]
        if effect is None:
            continue
        head = f"- a/rms {level['ratio']:.2g}: NEFTune − baseline {_ci(effect)}"
        if not effect["detected"]:
            lines.append(head + ": no effect to match; nothing is called equivalent here.")
            continue
        parts = [
            f"{LABELS[kind]} {_ratio_text(entry['ratio'])} of it, {entry['verdict']}"
            for kind, entry in level["reproduction"].items()
        ]
        lines.append(
            head
            + f" (detected); ratio to it (95% Fieller), equivalence margin [{lo:g}, {hi:g}]: "
            + "; ".join(parts)
            + "."
        )
        for c in level["comparisons"]:
            if c["first"] == "neftune" and c["second"] == "baseline":
                continue  # the effect itself, stated above
            if c["metric"] == "val_loss" and c.get("share") and c["verdict"] == "different":
                lines.append(
                    f"  - {LABELS[c['first']]} − {LABELS[c['second']]} ({c['cause']}): {_ci(c)}, "
                    f"{_ratio_text(c['share'])} of NEFTune's effect (Holm: different)."
                )
    for kind, found in summary["predictions"].items():
        if found["status"] != "tested":
            lines.append(f"- a² law, {LABELS[kind]}: {found['status']}.")
            continue
        for entry in found["levels"]:
            lines.append(
                f"- a² law, {LABELS[kind]} at alpha {entry['alpha']:.4g}: measured "
                f"{entry['measured']:+.4f}, predicted {entry['predicted']:+.4f}, difference "
                f"{_ci(entry['difference'])}: {entry['verdict']}."
            )
    for cell in summary["runaways"]:
        lines.append(
            f"- {LABELS[cell['kind']]} at alpha {cell['alpha']:.4g} ran away in {cell['count']} of "
            f"{cell['of']} seeds (left out of every interval above)."
        )
    choice = summary["choice"]
    for kind in REGULARIZERS:
        pick = choice.get(kind)
        if pick is None or pick["test_vs_baseline"] is None:
            continue
        result = pick["test_vs_baseline"]
        lines.append(
            f"- {LABELS[kind]} at its best level (a/rms {pick['ratio']:.2g}, chosen on "
            f"validation): test loss − baseline {_ci(result)}, {result['verdict']}; "
            f"{pick['cost_vs_baseline']:.2f}x the baseline's time per step."
        )
    return lines


def format_markdown(summary: dict[str, Any], *, title: str = "Equivalence study") -> str:
    """The report's text: base, reproduction of NEFTune's effect, per-level tables and the cause
    chain, the a² predictions, runaways, Holm's corrections, slopes, choice, curvature."""
    margin, ratio_margin = summary["margin"], summary["ratio_margin"]
    lo, hi = 1 - ratio_margin, 1 + ratio_margin
    parts = [f"# {title}\n", _base_text(summary["base"])]
    parts.append(
        "## Does each regularizer reproduce NEFTune's effect?\n\n"
        "Per seed, each regularizer's change of validation loss against the baseline and "
        "NEFTune's at the same level; the ratio of their means with Fieller's 95% interval (the "
        "ratios the paired t-test of `effect − R · NEFTune's` does not reject: exact for normal "
        "per-seed differences, and unbounded exactly when NEFTune's effect is not detected). "
        f"Equivalence (fixed in the preset before the run): the ratio within [{lo:g}, {hi:g}], "
        "by two one-sided paired t-tests at 5% (the 90% Fieller interval inside the margin). "
        "Only at levels where NEFTune's own effect is detected (its 95% CI excludes 0); "
        "elsewhere the verdict is *no effect to match*. *different* = the ratio differs from 1 "
        "(the paired test of regularizer − NEFTune); *inconclusive* = neither. Verdicts read "
        "Holm-adjusted p-values (family below); seeds whose run ran away are left out.\n"
    )
    parts.append("\n".join(_reproduction_table(summary)) + "\n")
    if margin is not None:
        margin_text = (
            f"Absolute margin ±{margin:g} nats: *equivalent* = the 90% CI inside it (TOST) and no "
            "detected difference; *different, inside the margin* = both; "
        )
    else:
        margin_text = ""
    parts.append(
        "## Per level: the methods and the cause chain\n\n"
        "Paired differences are per seed (same base, same data order); cells are mean [95% CI], "
        "uncorrected; 'share' = the step over NEFTune's effect (95% Fieller; where that effect is "
        f"detected). {margin_text}*different* = Holm-adjusted p < 0.05; otherwise *no detectable "
        "difference*, which is not equivalence.\n"
    )
    for level in summary["levels"]:
        parts.append(
            f"### a/rms = {level['ratio']:.3g} (alpha = {level['alpha']:.4g}, a = "
            f"{level['a']:.3g}, lambda at L: {level['lambda_eq_typical']:.3g})\n"
        )
        lines = [
            "| method | val loss | test loss | s / step | n | ran away |",
            "|---|---|---|---|---|---|",
        ]
        for kind, row in level["rows"].items():
            lines.append(
                f"| {LABELS[kind]} | {_mean_sd(row['val_loss'])} | {_mean_sd(row['test_loss'])} "
                f"| {_num(row['step_s']['mean'], '.3f')} | {row['val_loss']['n']} | "
                f"{row['runaway']} |"
            )
        parts.append("\n".join(lines) + "\n")
        lines = [
            "| comparison | cause | loss | difference [95% CI] | p (Holm) | share of NEFTune's "
            "effect | 90% CI | verdict (Holm) | uncorrected | seeds left out |",
            "|" + "---|" * 10,
        ]
        for c in level["comparisons"]:
            tost = (
                "–" if c["tost_low"] is None else f"[{c['tost_low']:+.4f}, {c['tost_high']:+.4f}]"
            )
            lines.append(
                f"| {LABELS[c['first']]} − {LABELS[c['second']]} | {c['cause']} | "
                f"{c['metric'].removesuffix('_loss')} | {_ci(c)} | {c['p_value']:.2g} "
                f"({c['p_value_holm']:.2g}) | {_ratio_text(c.get('share'))} | {tost} | "
                f"{c['verdict']} | {c['verdict_raw']} | {_excluded(c)} |"
            )
        parts.append("\n".join(lines) + "\n")
    parts.append(
        "## The a² law as a prediction between levels\n\n"
        "Each method's effect at its largest level, scaled by (a_i/a_max)², against the effect "
        "measured at level i, seed by seed (the interval holds both levels' noise). *reproduces "
        f"the a² prediction* = measured/predicted within [{lo:g}, {hi:g}] (TOST); *different* = "
        "measured − predicted excludes 0 (Holm); *inconclusive* = neither. Tested only where the "
        "largest level's effect is detected.\n"
    )
    parts.append("\n".join(_prediction_table(summary)) + "\n")
    parts.append(
        "## Runaway runs\n\nA run whose last logged penalty is negative (from the step it turned "
        "negative for good) or whose training diverged: its own outcome, left out of every "
        "interval and test above.\n"
    )
    parts.append("\n".join(_runaway_table(summary)) + "\n")
    parts.append("## Multiple comparisons (Holm, family-wise error 5% per family)\n")
    parts.append("\n".join(_corrections_text(summary)) + "\n")
    along = _along_training_table(summary)
    if along:
        parts.append(
            "## Along training: the last and the best validation loss\n\nValidation loss "
            "evaluated every few steps during training (transformers' `eval_loss`, the mean of "
            "per-batch assistant-token means); *best* = its minimum over the evaluations (the "
            "step an early stop would keep). Paired over seeds, uncorrected 95% CIs; the share "
            "is each regularizer's gain on the best over NEFTune's, where NEFTune's is "
            "detected.\n"
        )
        parts.append("\n".join(along) + "\n")
    answers = _answers_table(summary)
    if answers:
        parts.append(
            "## Generated answers (greedy, test prompts)\n\nPaired change against the baseline "
            "of the answers' mean length (tokens) and distinct-2 (distinct word bigrams over all "
            "bigrams of the run's answers); uncorrected 95% CIs.\n"
        )
        parts.append("\n".join(answers) + "\n")
    parts.append("## Effect against a² (least squares; a slope alone does not test a²)\n")
    lines = [
        "| method | slope (val loss per a²) | 95% CI | intercept | n |",
        "|---|---|---|---|---|",
    ]
    for kind, slope in summary["slopes"].items():
        if slope is None:
            continue
        lines.append(
            f"| {LABELS[kind]} | {slope['slope']:+.4g} | [{slope['low']:+.4g}, "
            f"{slope['high']:+.4g}] | {slope['intercept']:+.4f} | {slope['n']} |"
        )
    parts.append("\n".join(lines) + "\n")
    parts.append("## What to pick: each regularizer at its best level (chosen on validation)\n")
    choice = summary["choice"]
    lines = [
        "| method | best a/rms | val loss | test loss | test − baseline [95% CI] | verdict "
        "| s / step | x baseline |",
        "|" + "---|" * 8,
    ]
    for kind in REGULARIZERS:
        pick = choice.get(kind)
        if pick is None:
            continue
        result = pick["test_vs_baseline"]
        lines.append(
            f"| {LABELS[kind]} | {pick['ratio']:.2g} | {_mean_sd(pick['val_loss'])} | "
            f"{_mean_sd(pick['test_loss'])} | {_ci(result)} | "
            f"{result['verdict'] if result else '–'} | {_num(pick['step_s'], '.3f')} | "
            f"{_num(pick['cost_vs_baseline'], '.2f')} |"
        )
    parts.append("\n".join(lines) + "\n")
    parts.append(
        f"Baseline: {_num(choice['baseline_step']['mean'], '.3f')} s / step. s / step is the mean "
        "over all of a method's runs (every level); runs shared the machine with other jobs, so "
        "costs are indicative. One comparison per method, uncorrected.\n"
    )
    parts.append(
        "## Curvature (the base and the measured runs)\n\n± = between-batch standard error; "
        "traces per scored token as `fishertune analyze` reports them; rms²·Tr is the "
        "scale-free curvature. The estimators' noise: the relative standard deviation of a "
        "one-direction estimate (one Rademacher probe, one target draw per position) on one "
        "measured batch, from the measurement's own standard error; an arm with K directions "
        "per position (`penalty_samples`) has 1/√K of it on a batch of that size.\n"
    )
    parts.append("\n".join(_curvature_table(summary)) + "\n")
    parts.append("## Reading (computed from the intervals above)\n")
    parts.append("\n".join(_reading(summary)) + "\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------- plots


def _plot_pairs(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = COMPARISONS[:4]
    fig, axes = plt.subplots(1, len(comparisons), figsize=(4.2 * len(comparisons), 3.8))
    margin = summary["margin"]
    for ax, (first, second, cause) in zip(axes, comparisons, strict=True):
        xs, means, lows, highs = [], [], [], []
        for level in summary["levels"]:
            found = next(
                (
                    c
                    for c in level["comparisons"]
                    if (c["first"], c["second"], c["metric"]) == (first, second, "val_loss")
                ),
                None,
            )
            if found is not None:
                xs.append(level["ratio"])
                means.append(found["mean"])
                lows.append(found["mean"] - found["low"])
                highs.append(found["high"] - found["mean"])
        if margin is not None:
            ax.axhspan(-margin, margin, color="0.9", label=f"±margin {margin:g}")
        ax.axhline(0.0, color="0.4", lw=0.8)
        if xs:
            ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3, color=COLORS[first])
        ax.set_xscale("log")
        ax.set_xlabel("noise level a / rms(X)")
        ax.set_title(f"{LABELS[first]} − {LABELS[second]}\n({cause})", fontsize=9)
        if margin is not None:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("paired Δ validation loss (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_ratios(summary: dict[str, Any], path: Path) -> Path:
    """Each regularizer's effect over NEFTune's per level, with Fieller's 95% interval where it is
    bounded (an open marker where it is not), the equivalence band and the lines at 0 and 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = 1 - summary["ratio_margin"], 1 + summary["ratio_margin"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhspan(lo, hi, color="0.9", label=f"equivalence [{lo:g}, {hi:g}]")
    ax.axhline(1.0, color="0.4", lw=0.8)
    ax.axhline(0.0, color="0.4", lw=0.8, ls=":")
    kinds = REGULARIZERS[1:]
    labelled: set[str] = set()
    for offset, kind in enumerate(kinds):
        shift = 1.0 + 0.04 * (offset - (len(kinds) - 1) / 2)  # side by side on the log axis
        for level in summary["levels"]:
            entry = level["reproduction"].get(kind)
            if entry is None or not entry.get("to_match") or entry.get("ratio") is None:
                continue
            ratio = entry["ratio"]
            x = level["ratio"] * shift
            label = None if kind in labelled else LABELS[kind]
            labelled.add(kind)
            if ratio["kind"] == "bounded":
                ax.errorbar(
                    [x],
                    [ratio["ratio"]],
                    yerr=[[ratio["ratio"] - ratio["low"]], [ratio["high"] - ratio["ratio"]]],
                    marker="o",
                    capsize=3,
                    color=COLORS[kind],
                    label=label,
                )
            else:
                ax.plot([x], [ratio["ratio"]], marker="o", mfc="none", color=COLORS[kind],
                        label=label)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("noise level a / rms(X) (levels where NEFTune's effect is detected)")
    ax.set_ylabel("effect / NEFTune's effect (Fieller 95%)")
    ax.set_title("Share of NEFTune's effect on validation loss reproduced")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_slope(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(0.0, color="0.4", lw=0.8)
    for kind, slope in summary["slopes"].items():
        if slope is None:
            continue
        xs = [x for x, _ in slope["points"]]
        ax.scatter(xs, [y for _, y in slope["points"]], s=10, color=COLORS[kind], alpha=0.6)
        top = max(xs)
        ax.plot(
            [0, top],
            [slope["intercept"], slope["intercept"] + slope["slope"] * top],
            color=COLORS[kind],
            label=f"{LABELS[kind]}: slope {slope['slope']:+.3g} [{slope['low']:+.3g}, "
            f"{slope['high']:+.3g}]",
        )
    ax.set_xlabel("a² (a = alpha / sqrt(L d))")
    ax.set_ylabel("val loss − baseline (same seed)")
    ax.set_title("Effect against a² (one point per seed and level; 95% CI of slopes)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_choice(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(0.0, color="0.4", lw=0.8, label="baseline")
    if summary["margin"] is not None:
        ax.axhspan(-summary["margin"], summary["margin"], color="0.9")
    for kind in REGULARIZERS:
        pick = summary["choice"].get(kind)
        if pick is None or pick["test_vs_baseline"] is None:
            continue
        r = pick["test_vs_baseline"]
        ax.errorbar(
            [pick["cost_vs_baseline"]],
            [r["mean"]],
            yerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]],
            marker="o",
            capsize=4,
            color=COLORS[kind],
            label=f"{LABELS[kind]} (a/rms {pick['ratio']:.2g})",
        )
    ax.set_xlabel("time per training step / baseline's")
    ax.set_ylabel("test loss − baseline (same seed), 95% CI")
    ax.set_title("Each regularizer at its best level: gain vs cost")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_equivalence_report(
    runs_dir: str | Path,
    names: Sequence[str],
    out_dir: str | Path,
    *,
    title: str,
    ratio_margin: float,
    margin: float | None = None,
) -> dict[str, Path]:
    """Write ``equivalence.md``, ``equivalence.json`` and the four plots into ``out_dir``.

    Returns:
        The written files by kind.
    """
    base, runs = load_study(runs_dir, names)
    summary = summarize(base, runs, ratio_margin=ratio_margin, margin=margin)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {
        "equivalence_md": out_dir / "equivalence.md",
        "equivalence_json": out_dir / "equivalence.json",
    }
    written["equivalence_md"].write_text(format_markdown(summary, title=title))
    written["equivalence_json"].write_text(json.dumps(_json_safe(summary), indent=1) + "\n")
    written["pairs_png"] = _plot_pairs(summary, out_dir / "equivalence_pairs.png")
    written["ratio_png"] = _plot_ratios(summary, out_dir / "equivalence_ratio.png")
    written["slope_png"] = _plot_slope(summary, out_dir / "equivalence_slope.png")
    written["choice_png"] = _plot_choice(summary, out_dir / "equivalence_choice.png")
    return written
