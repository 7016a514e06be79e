"""Paired comparisons between the study's arms over seeds: cells, differences with their
verdicts, each regularizer's share of NEFTune's effect, the ``a^2`` predictions between levels,
Holm's families and the generated answers."""

from __future__ import annotations

import math
import statistics as pystats
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.statistics import (
    equivalence_test,
    fieller_ratio,
    holm,
    paired_difference,
    ratio_equivalence,
    scaled_prediction,
    seeds_for_power,
)
from fishertune.studies.equivalence.runs import ALPHA, ANSWER_METRICS, REGULARIZERS, StudyRun


def summary_cell(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample sd and count of the finite ``values`` (NaN and 0 when none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    sd = pystats.stdev(finite) if len(finite) > 1 else math.nan
    return {"mean": pystats.fmean(finite), "sd": sd, "n": len(finite)}


def seed_values(runs: Sequence[StudyRun], metric: str) -> tuple[dict[int, float], list[int]]:
    """``{seed: value}`` of the runs that behaved, and the seeds left out as runaways."""
    kept = {r.seed: r.values.get(metric, math.nan) for r in runs if r.runaway is None}
    return kept, sorted(r.seed for r in runs if r.runaway is not None)


def common_seeds(
    *groups: Sequence[StudyRun], metric: str
) -> tuple[list[int], list[list[float]], list[int]]:
    """The seeds every group has a finite, non-runaway value for, the values per group in seed
    order, and the seeds left out because a run of theirs ran away."""
    found = [seed_values(g, metric) for g in groups]
    excluded = sorted({s for _, out in found for s in out})
    seeds = sorted(set.intersection(*(set(values) for values, _ in found)))
    seeds = [s for s in seeds if all(math.isfinite(values[s]) for values, _ in found)]
    return seeds, [[values[s] for s in seeds] for values, _ in found], excluded


def paired_comparison(
    first: Sequence[StudyRun],
    second: Sequence[StudyRun],
    metric: str,
    margin: float | None,
) -> dict[str, Any] | None:
    """Paired difference (95% CI) over the seeds both have (runaway runs left out, and listed in
    ``excluded``); with an absolute ``margin``, TOST against it and the seeds needed for 80% power
    at it. ``verdict_raw`` is read from the uncorrected test; ``summarize`` adds Holm's.
    ``None`` with fewer than 2 pairs."""
    seeds, (values, reference), excluded = common_seeds(first, second, metric=metric)
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
    out["verdict_raw"] = difference_verdict(out, diff.p_value)
    return out


def difference_verdict(result: dict[str, Any], p_value: float) -> str:
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


def match_verdict(entry: dict[str, Any], tost_p: float, differ_p: float, what: str) -> str:
    """A match's verdict from its (possibly Holm-adjusted) p-values: *reproduces* ``what`` when
    the ratio's TOST rejects at :data:`ALPHA`; when the ratio differs from 1, *different:
    opposite in sign to* ``what`` when its whole 95% Fieller interval is below 0 (the effect goes
    the other way), else *different: less/more than* ``what`` (ratio below or above 1); else
    *inconclusive*."""
    if tost_p < ALPHA:
        return f"reproduces {what}"
    if differ_p < ALPHA:
        ratio = entry["ratio"]
        if ratio.get("kind") == "bounded" and ratio["high"] < 0:
            return f"different: opposite in sign to {what}"
        return f"different: {'less' if ratio['ratio'] < 1 else 'more'} than {what}"
    return "inconclusive"


def reproduction_of(
    members: dict[str, list[StudyRun]], neftune_effect: dict[str, Any] | None, ratio_margin: float
) -> dict[str, Any]:
    """Each regularizer's paired effect on validation loss against the baseline, as a fraction of
    NEFTune's on the same seeds; matched only where NEFTune's own effect is detected."""
    out: dict[str, Any] = {}
    for kind in REGULARIZERS[1:]:
        if not members.get(kind) or not members.get("neftune"):
            continue
        seeds, (value, neftune, base), excluded = common_seeds(
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
            entry["verdict_raw"] = match_verdict(
                entry, entry["tost_p"], entry["differ_p"], "NEFTune's effect"
            )
        else:
            entry["ratio"] = asdict(fieller_ratio(x, y))
            entry["verdict_raw"] = entry["verdict"] = "no effect to match"
        out[kind] = entry
    return out


def level_predictions(
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
    seeds, (value, base), _ = common_seeds(at[top], baseline, metric="val_loss")
    if len(seeds) < 2:
        return None
    top_effect = paired_difference([v - b for v, b in zip(value, base, strict=True)])
    out: dict[str, Any] = {"top_alpha": top, "top_effect": asdict(top_effect), "levels": []}
    if not top_effect.detected:
        out["status"] = "no effect at the largest level to scale"
        return out
    out["status"] = "tested"
    for alpha in levels[:-1]:
        seeds, (low, high, base), excluded = common_seeds(
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
        entry["verdict_raw"] = match_verdict(
            entry, entry["tost_p"], entry["differ_p"], "the a² prediction"
        )
        out["levels"].append(entry)
    return out


def holm_family(
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


def answer_changes(
    members: dict[str, list[StudyRun]], baseline: Sequence[StudyRun]
) -> dict[str, Any]:
    """Each method's paired change of the greedy answers' mean length and distinct-2 against the
    baseline (only where the runs generated answers)."""
    out: dict[str, Any] = {}
    for kind in REGULARIZERS:
        for metric in ANSWER_METRICS:
            result = paired_comparison(members.get(kind, []), baseline, metric, None)
            if result is not None:
                out.setdefault(kind, {})[metric] = result
    return out
