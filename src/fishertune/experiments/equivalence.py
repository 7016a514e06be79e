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

* every comparison: mean difference of validation (and test) loss with its 95% t interval;
* equivalence only by two one-sided tests against ``margin`` (fixed in the preset before the
  run): *equivalent* when the 90% interval lies inside ``(-margin, margin)`` and the 95% one
  holds 0; *different, inside the margin* when the first holds but the 95% interval excludes 0;
  *different* when only the 95% interval excludes 0; otherwise *no detectable difference* (and
  not equivalence);
* ``seeds_for_power``: the seeds a paired t-test would need to detect a difference of ``margin``
  with 80% power at the measured spread;
* NEFTune's (and each penalty's) paired effect against ``a^2``: a least-squares slope with its
  95% interval (one point per seed and level);
* practitioner's choice: each method at its best level by mean validation loss, its test-loss
  difference to the baseline, and its measured seconds per training step (the runs' own
  ``train_runtime / global_step``, mean over all its runs) against the baseline's.

Curvature (the ``measure`` stage, :mod:`fishertune.experiments.curvature`): ``Tr(F_X)``,
``Tr(H_X)``, the gap, per split measured, with their between-batch standard errors; the embedding
rms and the scale-free curvature ``rms^2 Tr`` of every measured run.

Written into the report folder: ``equivalence.md``, ``equivalence.json``,
``equivalence_pairs.png`` (the four comparisons per level with 95% intervals and the margin),
``equivalence_slope.png`` (effect vs ``a^2`` with the fitted lines), ``equivalence_choice.png``
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
    paired_difference,
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
    ``test_loss`` and ``step_s`` (training seconds per step); ``curvature`` the measured splits
    (``{split: {trace_f, trace_h, gap, *_se, rms, loss}}``; empty when not measured)."""

    name: str
    kind: str
    seed: int
    alpha: float
    values: dict[str, float] = field(default_factory=dict)
    curvature: dict[str, dict[str, float]] = field(default_factory=dict)


def _curvature(record: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Per measured split: the means and between-batch standard errors."""
    if not record:
        return {}
    splits = record.get("splits") or {record.get("split", "validation"): record["final"]}
    out = {}
    for split, entry in splits.items():
        values = {"rms": float(entry["embedding_rms"]), "loss": float(entry["loss"]["mean"])}
        for key in ("trace_f", "trace_h", "gap"):
            values[key] = float(entry[key]["mean"])
            values[f"{key}_se"] = float(entry[key].get("se_batches", math.nan))
        values["batches"] = int(entry["trace_f"].get("num_batches", 0))
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
        if spec is None or evaluation is None:
            continue
        found = run_kind(spec.get("overrides", {}))
        if found is None:
            continue
        metrics = evaluation.get("metrics", {})
        runs.append(
            StudyRun(
                name=name,
                kind=found[0],
                seed=int(spec.get("seed", 0)),
                alpha=found[1],
                values={
                    "val_loss": float(metrics.get("offline/val_loss", math.nan)),
                    "test_loss": float(metrics.get("offline/test_loss", math.nan)),
                    "step_s": _step_seconds(folder),
                },
                curvature=_curvature(folder.curvature) if folder.measured else {},
            )
        )
    return base, runs


def _cell(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    sd = pystats.stdev(finite) if len(finite) > 1 else math.nan
    return {"mean": pystats.fmean(finite), "sd": sd, "n": len(finite)}


def _paired(
    first: Sequence[StudyRun], second: Sequence[StudyRun], metric: str, margin: float
) -> dict[str, Any] | None:
    """Paired difference (95% CI), TOST against ``margin``, the seeds needed for 80% power at
    ``margin`` and the verdict, over the seeds both have; ``None`` with fewer than 2 pairs."""
    by_seed = {r.seed: r.values[metric] for r in second}
    pairs = sorted((r.seed, r.values[metric], by_seed[r.seed]) for r in first if r.seed in by_seed)
    pairs = [p for p in pairs if math.isfinite(p[1]) and math.isfinite(p[2])]
    if len(pairs) < 2:
        return None
    values, reference = [p[1] for p in pairs], [p[2] for p in pairs]
    diff = paired_difference(values, reference)
    tost = equivalence_test(values, reference, margin=margin)
    if tost.equivalent and diff.detected:
        verdict = "different, inside the margin"
    elif tost.equivalent:
        verdict = "equivalent"
    elif diff.detected:
        verdict = "different"
    else:
        verdict = "no detectable difference"
    try:
        needed = seeds_for_power(margin, diff.sd) if diff.sd > 0 else 2
    except FishertuneError:
        needed = None
    return {
        **asdict(diff),
        "tost_p": tost.p_value,
        "tost_low": tost.low,
        "tost_high": tost.high,
        "equivalent": tost.equivalent,
        "detected": diff.detected,
        "verdict": verdict,
        "seeds_for_power": needed,
        "seeds": [p[0] for p in pairs],
    }


def _slope(
    runs: Sequence[StudyRun], baseline: Sequence[StudyRun], kind: str, base: dict[str, Any]
) -> dict[str, Any] | None:
    """The paired effect ``val_loss(kind) - val_loss(baseline)`` of each seed and level against
    ``a^2`` (``a = alpha / sqrt(L d)``): least squares with the slope's 95% interval."""
    by_seed = {r.seed: r.values["val_loss"] for r in baseline}
    scale = math.sqrt(base["length"] * base["hidden_size"])
    points = [
        ((r.alpha / scale) ** 2, r.values["val_loss"] - by_seed[r.seed])
        for r in runs
        if r.kind == kind and r.seed in by_seed and math.isfinite(r.values["val_loss"])
    ]
    try:
        fit = scaling_slope([x for x, _ in points], [y for _, y in points])
    except FishertuneError:
        return None
    return {**asdict(fit), "points": points}


def summarize(base: dict[str, Any], runs: Sequence[StudyRun], *, margin: float) -> dict[str, Any]:
    """Levels, paired comparisons, slopes, the practitioner's choice and the curvature table
    (see the module docstring)."""
    baseline = [r for r in runs if r.kind == "baseline"]
    if not baseline:
        raise FishertuneError("the equivalence report needs finished baseline runs")
    scale = math.sqrt(base["length"] * base["hidden_size"])
    levels = []
    for alpha in sorted({r.alpha for r in runs if r.kind != "baseline"}):
        members = {k: [r for r in runs if r.kind == k and r.alpha == alpha] for k in REGULARIZERS}
        members["baseline"] = baseline
        rows = {
            kind: {m: _cell([r.values[m] for r in members[kind]]) for m in (*METRICS, "step_s")}
            for kind in KINDS
            if members[kind]
        }
        comparisons = []
        for first, second, cause in COMPARISONS:
            for metric in METRICS:
                result = _paired(members[first], members[second], metric, margin)
                if result is not None:
                    comparisons.append(
                        {
                            "first": first,
                            "second": second,
                            "cause": cause,
                            "metric": metric,
                            **result,
                        }
                    )
        against_baseline = {}
        for kind in REGULARIZERS:
            result = _paired(members[kind], baseline, "test_loss", margin)
            if result is not None:
                against_baseline[kind] = result
        levels.append(
            {
                "alpha": alpha,
                "a": alpha / scale,
                "ratio": alpha / scale / base["rms"],
                "lambda_eq_typical": (alpha / scale) ** 2 / 6.0,
                "rows": rows,
                "comparisons": comparisons,
                "test_vs_baseline": against_baseline,
            }
        )
    slopes = {kind: _slope(runs, baseline, kind, base) for kind in REGULARIZERS}
    choice = _choice(levels, runs)
    measured = [
        {"name": r.name, "kind": r.kind, "alpha": r.alpha, "seed": r.seed, "splits": r.curvature}
        for r in runs
        if r.curvature
    ]
    return {
        "margin": margin,
        "base": base,
        "levels": levels,
        "slopes": slopes,
        "choice": choice,
        "curvature": measured,
        "runs": [asdict(r) for r in runs],
    }


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
        "| run | split | Tr(F_X) | Tr(H_X) | gap | rms | rms²·Tr(F_X) | rms²·Tr(H_X) | batches |",
        "|" + "---|" * 9,
    ]
    entries = [{"name": "base", "splits": summary["base"]["curvature"]}, *summary["curvature"]]
    for entry in entries:
        for split, c in entry["splits"].items():
            rms2 = c["rms"] ** 2
            lines.append(
                f"| {entry['name']} | {split} | {c['trace_f']:.4g} ± {c['trace_f_se']:.2g} | "
                f"{c['trace_h']:.4g} ± {c['trace_h_se']:.2g} | {c['gap']:.4g} ± "
                f"{c['gap_se']:.2g} | {c['rms']:.4g} | {rms2 * c['trace_f']:.3g} | "
                f"{rms2 * c['trace_h']:.3g} | {c['batches']} |"
            )
    return lines


def _reading(summary: dict[str, Any]) -> list[str]:
    """Sentences computed from the verdicts: only what the intervals support."""
    lines = []
    margin = summary["margin"]
    for first, second, cause in COMPARISONS:
        verdicts = []
        for level in summary["levels"]:
            found = next(
                (
                    c
                    for c in level["comparisons"]
                    if c["first"] == first and c["second"] == second and c["metric"] == "val_loss"
                ),
                None,
            )
            if found is not None:
                verdicts.append(f"a/rms {level['ratio']:.2g}: {found['verdict']} ({_ci(found)})")
        if verdicts:
            lines.append(
                f"- {LABELS[first]} − {LABELS[second]} ({cause}), validation loss, margin "
                f"±{margin:g}: " + "; ".join(verdicts) + "."
            )
    slope = summary["slopes"].get("neftune")
    if slope is not None:
        sign = (
            "positive"
            if slope["low"] > 0
            else "negative"
            if slope["high"] < 0
            else "not distinguishable from 0"
        )
        lines.append(
            f"- NEFTune's paired effect on validation loss against a²: slope "
            f"{slope['slope']:+.4g} per unit a² (95% CI [{slope['low']:+.4g}, "
            f"{slope['high']:+.4g}], n = {slope['n']}): {sign}."
        )
    choice = summary["choice"]
    for kind in REGULARIZERS:
        pick = choice.get(kind)
        if pick is None or pick["test_vs_baseline"] is None:
            continue
        result = pick["test_vs_baseline"]
        lines.append(
            f"- {LABELS[kind]} at its best level (a/rms {pick['ratio']:.2g}, chosen on "
            f"validation): test loss − baseline {_ci(result)}, {result['verdict']} at margin "
            f"±{margin:g}; {pick['cost_vs_baseline']:.2f}x the baseline's time per step."
        )
    return lines


def format_markdown(summary: dict[str, Any], *, title: str = "Equivalence study") -> str:
    """The report's text: base, per-level tables, comparisons, slopes, choice, curvature."""
    margin = summary["margin"]
    parts = [f"# {title}\n", _base_text(summary["base"])]
    parts.append(
        f"Equivalence margin (fixed in the preset before the run): ±{margin:g} nats of loss. "
        "Verdicts: *equivalent* = the 90% CI of the paired difference lies inside the margin "
        "(two one-sided tests at 5%) and the 95% CI holds 0; *different, inside the margin* = "
        "the 90% CI inside the margin, the 95% CI excluding 0; *different* = the 95% CI "
        "excludes 0 and the 90% CI leaves the margin; otherwise *no detectable difference*. "
        "Paired differences are per seed (same base, same data order); "
        "cells are mean [95% CI]. 'seeds for 80%' = seeds a paired t-test would need to detect a "
        "difference of the margin at the measured spread.\n"
    )
    for level in summary["levels"]:
        parts.append(
            f"## a/rms = {level['ratio']:.3g} (alpha = {level['alpha']:.4g}, a = "
            f"{level['a']:.3g}, lambda at L: {level['lambda_eq_typical']:.3g})\n"
        )
        lines = [
            "| method | val loss | test loss | s / step | n |",
            "|---|---|---|---|---|",
        ]
        for kind, row in level["rows"].items():
            lines.append(
                f"| {LABELS[kind]} | {_mean_sd(row['val_loss'])} | {_mean_sd(row['test_loss'])} "
                f"| {_num(row['step_s']['mean'], '.3f')} | {row['val_loss']['n']} |"
            )
        parts.append("\n".join(lines) + "\n")
        lines = [
            "| comparison | cause | loss | difference [95% CI] | p | 90% CI | verdict | seeds "
            "for 80% |",
            "|" + "---|" * 8,
        ]
        for c in level["comparisons"]:
            lines.append(
                f"| {LABELS[c['first']]} − {LABELS[c['second']]} | {c['cause']} | "
                f"{c['metric'].removesuffix('_loss')} | {_ci(c)} | {c['p_value']:.2g} | "
                f"[{c['tost_low']:+.4f}, {c['tost_high']:+.4f}] | {c['verdict']} | "
                f"{c['seeds_for_power'] if c['seeds_for_power'] is not None else '>1000'} |"
            )
        parts.append("\n".join(lines) + "\n")
    parts.append("## Effect against a² (NEFTune's second-order prediction: linear in a²)\n")
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
        "costs are indicative.\n"
    )
    parts.append(
        "## Curvature (the base and the measured runs)\n\n± = between-batch standard error; "
        "traces per scored token as `fishertune analyze` reports them; rms²·Tr is the "
        "scale-free curvature.\n"
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
        ax.axhspan(-margin, margin, color="0.9", label=f"±margin {margin:g}")
        ax.axhline(0.0, color="0.4", lw=0.8)
        if xs:
            ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3, color=COLORS[first])
        ax.set_xscale("log")
        ax.set_xlabel("noise level a / rms(X)")
        ax.set_title(f"{LABELS[first]} − {LABELS[second]}\n({cause})", fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("paired Δ validation loss (95% CI)")
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
    margin: float,
) -> dict[str, Path]:
    """Write ``equivalence.md``, ``equivalence.json`` and the three plots into ``out_dir``.

    Returns:
        The written files by kind.
    """
    base, runs = load_study(runs_dir, names)
    summary = summarize(base, runs, margin=margin)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {
        "equivalence_md": out_dir / "equivalence.md",
        "equivalence_json": out_dir / "equivalence.json",
    }
    written["equivalence_md"].write_text(format_markdown(summary, title=title))
    written["equivalence_json"].write_text(json.dumps(_json_safe(summary), indent=1) + "\n")
    written["pairs_png"] = _plot_pairs(summary, out_dir / "equivalence_pairs.png")
    written["slope_png"] = _plot_slope(summary, out_dir / "equivalence_slope.png")
    written["choice_png"] = _plot_choice(summary, out_dir / "equivalence_choice.png")
    return written
