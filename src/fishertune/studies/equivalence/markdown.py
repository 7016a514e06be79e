"""The study's report as markdown (``equivalence.md``), section by section."""

from __future__ import annotations

from typing import Any

from fishertune.studies.equivalence.runs import LABELS, REGULARIZERS
from fishertune.studies.equivalence.tables import (
    along_training_table,
    answers_table,
    base_text,
    ci,
    corrections_text,
    curvature_table,
    excluded_seeds,
    mean_sd,
    num,
    prediction_table,
    ratio_text,
    reading_lines,
    reproduction_table,
    runaway_table,
)


def _level_tables(level: dict[str, Any]) -> list[str]:
    """One level's heading, its methods' table and its cause chain's table."""
    parts = [
        f"### a/rms = {level['ratio']:.3g} (alpha = {level['alpha']:.4g}, a = "
        f"{level['a']:.3g}, lambda at L: {level['lambda_eq_typical']:.3g})\n"
    ]
    lines = [
        "| method | val loss | test loss | s / step | n | ran away |",
        "|---|---|---|---|---|---|",
    ]
    for kind, row in level["rows"].items():
        lines.append(
            f"| {LABELS[kind]} | {mean_sd(row['val_loss'])} | {mean_sd(row['test_loss'])} "
            f"| {num(row['step_s']['mean'], '.3f')} | {row['val_loss']['n']} | "
            f"{row['runaway']} |"
        )
    parts.append("\n".join(lines) + "\n")
    lines = [
        "| comparison | cause | loss | difference [95% CI] | p (Holm) | share of NEFTune's "
        "effect | 90% CI | verdict (Holm) | uncorrected | seeds left out |",
        "|" + "---|" * 10,
    ]
    for c in level["comparisons"]:
        tost = "–" if c["tost_low"] is None else f"[{c['tost_low']:+.4f}, {c['tost_high']:+.4f}]"
        lines.append(
            f"| {LABELS[c['first']]} − {LABELS[c['second']]} | {c['cause']} | "
            f"{c['metric'].removesuffix('_loss')} | {ci(c)} | {c['p_value']:.2g} "
            f"({c['p_value_holm']:.2g}) | {ratio_text(c.get('share'))} | {tost} | "
            f"{c['verdict']} | {c['verdict_raw']} | {excluded_seeds(c)} |"
        )
    parts.append("\n".join(lines) + "\n")
    return parts


def _slopes_and_choice(summary: dict[str, Any]) -> list[str]:
    """The slopes on ``a^2`` and the practitioner's choice with its costs."""
    parts = ["## Effect against a² (least squares; a slope alone does not test a²)\n"]
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
        if pick.get("ran_away"):
            lines.append(f"| {LABELS[kind]} | every run ran away | – | – | – | – | – | – |")
            continue
        result = pick["test_vs_baseline"]
        lines.append(
            f"| {LABELS[kind]} | {pick['ratio']:.2g} | {mean_sd(pick['val_loss'])} | "
            f"{mean_sd(pick['test_loss'])} | {ci(result)} | "
            f"{result['verdict'] if result else '–'} | {num(pick['step_s'], '.3f')} | "
            f"{num(pick['cost_vs_baseline'], '.2f')} |"
        )
    parts.append("\n".join(lines) + "\n")
    parts.append(
        f"Baseline: {num(choice['baseline_step']['mean'], '.3f')} s / step. s / step is the mean "
        "over all of a method's runs (every level); runs shared the machine with other jobs, so "
        "costs are indicative. One comparison per method, uncorrected.\n"
    )
    return parts


def format_markdown(summary: dict[str, Any], *, title: str = "Equivalence study") -> str:
    """The report's text: base, reproduction of NEFTune's effect, per-level tables and the cause
    chain, the a² predictions, runaways, Holm's corrections, slopes, choice, curvature."""
    margin, ratio_margin = summary["margin"], summary["ratio_margin"]
    lo, hi = 1 - ratio_margin, 1 + ratio_margin
    parts = [f"# {title}\n", base_text(summary["base"])]
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
    parts.append("\n".join(reproduction_table(summary)) + "\n")
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
        parts += _level_tables(level)
    parts.append(
        "## The a² law as a prediction between levels\n\n"
        "Each method's effect at its largest level, scaled by (a_i/a_max)², against the effect "
        "measured at level i, seed by seed (the interval holds both levels' noise). *reproduces "
        f"the a² prediction* = measured/predicted within [{lo:g}, {hi:g}] (TOST); *different* = "
        "measured − predicted excludes 0 (Holm); *inconclusive* = neither. Tested only where the "
        "largest level's effect is detected.\n"
    )
    parts.append("\n".join(prediction_table(summary)) + "\n")
    parts.append(
        "## Runaway runs\n\nA run whose last logged penalty is negative (from the step it turned "
        "negative for good) or whose training diverged: its own outcome, left out of every "
        "interval and test above.\n"
    )
    parts.append("\n".join(runaway_table(summary)) + "\n")
    parts.append("## Multiple comparisons (Holm, family-wise error 5% per family)\n")
    parts.append("\n".join(corrections_text(summary)) + "\n")
    along = along_training_table(summary)
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
    answers = answers_table(summary)
    if answers:
        parts.append(
            "## Generated answers (greedy, test prompts)\n\nPaired change against the baseline "
            "of the answers' mean length (tokens) and distinct-2 (distinct word bigrams over all "
            "bigrams of the run's answers); uncorrected 95% CIs.\n"
        )
        parts.append("\n".join(answers) + "\n")
    parts += _slopes_and_choice(summary)
    parts.append(
        "## Curvature (the base and the measured runs)\n\n± = between-batch standard error; "
        "traces per scored token as `fishertune analyze` reports them; rms²·Tr is the "
        "scale-free curvature. The estimators' noise: the relative standard deviation of a "
        "one-direction estimate (one Rademacher probe, one target draw per position) on one "
        "measured batch, from the measurement's own standard error; an arm with K directions "
        "per position (`penalty_samples`) has 1/√K of it on a batch of that size.\n"
    )
    parts.append("\n".join(curvature_table(summary)) + "\n")
    parts.append("## Reading (computed from the intervals above)\n")
    parts.append("\n".join(reading_lines(summary)) + "\n")
    return "\n".join(parts)
