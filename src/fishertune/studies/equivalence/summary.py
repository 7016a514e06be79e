"""The study's summary: per level, the methods, the cause chain and the reproduction of
NEFTune's effect; across levels, the ``a^2`` predictions, slopes, runaways, Holm's corrections
and the practitioner's choice (the summary's JSON is the report's ``equivalence.json``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.statistics import (
    fieller_ratio,
    paired_difference,
    scaling_slope,
)
from fishertune.studies.equivalence.comparisons import (
    answer_changes,
    common_seeds,
    difference_verdict,
    holm_family,
    level_predictions,
    match_verdict,
    paired_comparison,
    reproduction_of,
    seed_values,
    summary_cell,
)
from fishertune.studies.equivalence.runs import (
    ANSWER_METRICS,
    COMPARISONS,
    KINDS,
    LABELS,
    METRICS,
    REGULARIZERS,
    StudyRun,
)

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
        kind: {
            m: summary_cell([r.values.get(m, math.nan) for r in members[kind]])
            for m in CURVE_METRICS
        }
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
    neftune = paired_comparison(members.get("neftune", []), baseline, "val_curve_best", None)
    best_vs_baseline = {}
    for kind in REGULARIZERS:
        result = paired_comparison(members.get(kind, []), baseline, "val_curve_best", None)
        if result is None:
            continue
        if kind != "neftune" and neftune is not None and neftune["detected"]:
            seeds, (a, n, z), _ = common_seeds(
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
    by_seed, _ = seed_values(baseline, "val_loss")
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


def _cause_chain(
    members: dict[str, list[StudyRun]],
    neftune_effect: dict[str, Any] | None,
    margin: float | None,
) -> list[dict[str, Any]]:
    """The paired comparisons of :data:`COMPARISONS` on both losses at one level, each with its
    share of NEFTune's effect (Fieller) where that effect is detected."""
    baseline = members["baseline"]
    comparisons = []
    for first, second, cause in COMPARISONS:
        for metric in METRICS:
            result = paired_comparison(members[first], members[second], metric, margin)
            if result is None:
                continue
            entry = {"first": first, "second": second, "cause": cause, "metric": metric, **result}
            if neftune_effect is not None and neftune_effect["detected"]:
                # the step as a fraction of NEFTune's effect: which cause carries how much
                seeds, (a, b, n, z), _ = common_seeds(
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
    return comparisons


def _level(
    alpha: float,
    runs: Sequence[StudyRun],
    base: dict[str, Any],
    *,
    ratio_margin: float,
    margin: float | None,
) -> dict[str, Any]:
    """One noise level ``alpha``: ``a = alpha / sqrt(L d)`` and ``a / rms``, the methods' rows,
    NEFTune's effect, its reproduction, the cause chain, answers, the curve along training and
    each regularizer's test loss against the baseline."""
    baseline = [r for r in runs if r.kind == "baseline"]
    scale = math.sqrt(base["length"] * base["hidden_size"])
    members = {k: [r for r in runs if r.kind == k and r.alpha == alpha] for k in REGULARIZERS}
    members["baseline"] = baseline
    rows = {
        kind: {
            **{
                m: summary_cell([r.values.get(m, math.nan) for r in members[kind]])
                for m in (*METRICS, "step_s", *ANSWER_METRICS)
            },
            "runaway": sum(r.runaway is not None for r in members[kind]),
        }
        for kind in KINDS
        if members[kind]
    }
    neftune_effect = paired_comparison(members["neftune"], baseline, "val_loss", None)
    against_baseline = {}
    for kind in REGULARIZERS:
        result = paired_comparison(members[kind], baseline, "test_loss", margin)
        if result is not None:
            result["verdict"] = result["verdict_raw"]
            against_baseline[kind] = result
    return {
        "alpha": alpha,
        "a": alpha / scale,
        "ratio": alpha / scale / base["rms"],
        "lambda_eq_typical": (alpha / scale) ** 2 / 6.0,
        "rows": rows,
        "neftune_effect": neftune_effect,
        "reproduction": reproduction_of(members, neftune_effect, ratio_margin),
        "comparisons": _cause_chain(members, neftune_effect, margin),
        "answers": answer_changes(members, baseline),
        "along_training": _along_training(members, baseline),
        "test_vs_baseline": against_baseline,
    }


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
    levels = [
        _level(alpha, runs, base, ratio_margin=ratio_margin, margin=margin)
        for alpha in sorted({r.alpha for r in runs if r.kind != "baseline"})
    ]
    predictions = {
        kind: found
        for kind in REGULARIZERS
        if (found := level_predictions(runs, baseline, kind, ratio_margin)) is not None
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
        holm_family(
            "reproduction of NEFTune's effect (validation loss)",
            members,
            lambda r, p: match_verdict(r, p["tost_p"], p["differ_p"], "NEFTune's effect"),
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
            return difference_verdict(
                {**result, "tost_p": adjusted.get("tost_p")}, adjusted["p_value"]
            )

        families.append(holm_family(f"cause chain ({metric.replace('_', ' ')})", members, chain))
    members = [
        (f"{LABELS[kind]} at alpha {entry['alpha']:.4g}", entry, match_keys)
        for kind, found in predictions.items()
        for entry in found["levels"]
    ]
    families.append(
        holm_family(
            "a² predictions",
            members,
            lambda r, p: match_verdict(r, p["tost_p"], p["differ_p"], "the a² prediction"),
        )
    )
    return families


def _choice(levels: Sequence[dict[str, Any]], runs: Sequence[StudyRun]) -> dict[str, Any]:
    """Each regularizer at its level of lowest mean validation loss over the runs that did not run
    away (``{"ran_away": True}`` when every run did): that level, its test-loss
    difference to the baseline (paired, 95% CI), and its cost per step (mean over all its runs,
    every level: the computation per step does not depend on the strength) against the
    baseline's."""
    steps = {
        kind: summary_cell([r.values["step_s"] for r in runs if r.kind == kind]) for kind in KINDS
    }
    out: dict[str, Any] = {"baseline_step": steps["baseline"]}
    for kind in REGULARIZERS:
        # the runs that behaved: a runaway run is its own outcome, not a level's loss
        behaved = {
            lv["alpha"]: [r for r in runs if r.kind == kind and r.alpha == lv["alpha"]
                          and r.runaway is None]
            for lv in levels
        }  # fmt: skip
        candidates = [lv for lv in levels if kind in lv["rows"] and behaved[lv["alpha"]]]
        if not candidates:
            if any(kind in lv["rows"] for lv in levels):
                out[kind] = {"ran_away": True}
            continue

        cells = {
            lv["alpha"]: {
                m: summary_cell([r.values.get(m, math.nan) for r in behaved[lv["alpha"]]])
                for m in ("val_loss", "test_loss")
            }
            for lv in candidates
        }
        best = min(candidates, key=lambda lv: cells[lv["alpha"]]["val_loss"]["mean"])
        out[kind] = {
            "alpha": best["alpha"],
            "ratio": best["ratio"],
            "val_loss": cells[best["alpha"]]["val_loss"],
            "test_loss": cells[best["alpha"]]["test_loss"],
            "test_vs_baseline": best["test_vs_baseline"].get(kind),
            "step_s": steps[kind]["mean"],
            "step_sd": steps[kind]["sd"],
            "cost_vs_baseline": steps[kind]["mean"] / steps["baseline"]["mean"]
            if steps["baseline"]["n"]
            else math.nan,
        }
    return out
