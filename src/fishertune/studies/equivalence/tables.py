"""The markdown tables and numbers of the study's report, each from the summary."""

from __future__ import annotations

import math
from typing import Any

from fishertune.studies.equivalence.runs import LABELS, REGULARIZERS


def num(value: Any, fmt: str = "+.4f") -> str:
    """``value`` in ``fmt``, or a dash for a missing or non-finite number."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, fmt)


def ci(result: dict[str, Any] | None) -> str:
    """``mean [low, high]`` of a paired result, or a dash."""
    if result is None:
        return "–"
    return f"{result['mean']:+.4f} [{result['low']:+.4f}, {result['high']:+.4f}]"


def mean_sd(cell: dict[str, Any]) -> str:
    """``mean ± sd`` of a summary cell, or a dash when it holds no run."""
    if not cell["n"]:
        return "–"
    sd = "" if not math.isfinite(cell["sd"]) else f" ± {cell['sd']:.4f}"
    return f"{cell['mean']:.4f}{sd}"


def base_text(base: dict[str, Any]) -> str:
    """The paragraph on the base model: size, pretraining, losses, rms and ``L``."""
    tokens = base["tokens_seen"]
    params = base["parameters"]
    lines = [
        f"Base model: {num(params, ',d') if params else '–'} parameters (d = "
        f"{base['hidden_size']}), pretrained for {base['steps']} steps on "
        f"{num(tokens, ',.0f') if tokens else '–'} tokens of part A's text; on the chat data "
        f"(assistant tokens) validation loss {base['val_loss']:.4f}, test loss "
        f"{base['test_loss']:.4f}; embedding rms {base['rms']:.4g}, typical length L = "
        f"{base['length']} tokens.",
    ]
    return "\n".join(lines) + "\n"


def curvature_table(summary: dict[str, Any]) -> list[str]:
    """The table of ``Tr(F_X)``, ``Tr(H_X)``, the gap and ``rms^2 Tr`` of the base and the
    measured runs."""
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
                f"{num(c.get('trace_f_noise', math.nan), '.2f')} / "
                f"{num(c.get('trace_h_noise', math.nan), '.2f')} |"
            )
    return lines


def ratio_text(ratio: dict[str, Any] | None) -> str:
    """A Fieller ratio with its interval (bounded, or the unbounded forms), or a dash."""
    if ratio is None:
        return "–"
    if ratio["kind"] == "bounded":
        return f"{ratio['ratio']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"
    if ratio["kind"] == "exclusive":
        return f"{ratio['ratio']:.2f} (outside ({ratio['low']:.2f}, {ratio['high']:.2f}))"
    return f"{ratio['ratio']:.2f} (unbounded)"


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.2g}"


def excluded_seeds(result: dict[str, Any]) -> str:
    """The seeds a result left out as runaways, or a dash."""
    return ", ".join(str(s) for s in result.get("excluded") or []) or "–"


def reproduction_table(summary: dict[str, Any]) -> list[str]:
    """The table of each regularizer's share of NEFTune's effect per level, with its verdict."""
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
                ratio90 = ratio_text(entry["ratio_90"])
            else:
                tost = differ = ratio90 = "–"
            lines.append(
                f"| {level['ratio']:.2g} | {ci(entry['neftune'])} | {LABELS[kind]} | "
                f"{ci(entry['effect'])} | {ratio_text(entry['ratio'])} | {ratio90} | {tost} | "
                f"{differ} | {entry['verdict']} | {excluded_seeds(entry)} |"
            )
    return lines


def prediction_table(summary: dict[str, Any]) -> list[str]:
    """The table of the ``a^2`` law's predictions between levels against the measured effects."""
    lines = [
        "| method | level (alpha) | (a_i/a_max)² | measured | predicted | measured − predicted "
        "[95% CI] | measured / predicted [95% Fieller] | verdict (Holm) |",
        "|" + "---|" * 8,
    ]
    for kind, found in summary["predictions"].items():
        top = found["top_effect"]
        if found["status"] != "tested":
            lines.append(
                f"| {LABELS[kind]} | largest {found['top_alpha']:.4g}: {ci(top)} | – | – | – | – "
                f"| – | {found['status']} |"
            )
            continue
        for entry in found["levels"]:
            lines.append(
                f"| {LABELS[kind]} | {entry['alpha']:.4g} (from {found['top_alpha']:.4g}) | "
                f"{entry['factor']:.3g} | {entry['measured']:+.4f} | {entry['predicted']:+.4f} | "
                f"{ci(entry['difference'])} | {ratio_text(entry['ratio'])} | "
                f"{entry['verdict']} |"
            )
    return lines


def runaway_table(summary: dict[str, Any]) -> list[str]:
    """The table of the runs that ran away, per method and level."""
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


def corrections_text(summary: dict[str, Any]) -> list[str]:
    """The list of Holm's families and the verdicts the correction changed."""
    lines = []
    for family in summary["corrections"]:
        changed = "; ".join(f"{c['what']}: {c['raw']} → {c['holm']}" for c in family["changed"])
        lines.append(
            f"- {family['name']}: {family['tests']} tests; verdicts changed by the correction: "
            f"{changed or 'none'}."
        )
    return lines


def answers_table(summary: dict[str, Any]) -> list[str]:
    """The table of the generated answers' paired changes (empty: no answers)."""
    lines = [
        "| a/rms | method | mean length − baseline [95% CI] | distinct-2 − baseline [95% CI] |",
        "|---|---|---|---|",
    ]
    found = False
    for level in summary["levels"]:
        for kind, entry in level["answers"].items():
            found = True
            lines.append(
                f"| {level['ratio']:.2g} | {LABELS[kind]} | {ci(entry.get('reply_length'))} | "
                f"{ci(entry.get('distinct_2'))} |"
            )
    return lines if found else []


def along_training_table(summary: dict[str, Any]) -> list[str]:
    """The table of the last and best validation loss along training (empty: not evaluated along
    training)."""
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
                f"| {level['ratio']:.2g} | {LABELS[kind]} | {mean_sd(row['val_curve_last'])} | "
                f"{mean_sd(row['val_curve_best'])} | "
                f"{num(row['val_curve_best_step']['mean'], '.0f')} | "
                f"{ci(result) if result else '–'} | "
                f"{ratio_text(result.get('ratio')) if result else '–'} |"
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
            f"The baseline's last − best validation loss (paired over seeds): {ci(rise)} "
            "(> 0: it overfits after its best step)."
        )
    return lines


def reading_lines(summary: dict[str, Any]) -> list[str]:
    """Sentences computed from the (Holm-corrected) verdicts: only what the intervals support."""
    lines = []
    lo, hi = 1 - summary["ratio_margin"], 1 + summary["ratio_margin"]
    for level in summary["levels"]:
        effect = level["neftune_effect"]
        if effect is None:
            continue
        head = f"- a/rms {level['ratio']:.2g}: NEFTune − baseline {ci(effect)}"
        if not effect["detected"]:
            lines.append(head + ": no effect to match; nothing is called equivalent here.")
            continue
        parts = [
            f"{LABELS[kind]} {ratio_text(entry['ratio'])} of it, {entry['verdict']}"
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
                    f"  - {LABELS[c['first']]} − {LABELS[c['second']]} ({c['cause']}): {ci(c)}, "
                    f"{ratio_text(c['share'])} of NEFTune's effect (Holm: different)."
                )
    for kind, found in summary["predictions"].items():
        if found["status"] != "tested":
            lines.append(f"- a² law, {LABELS[kind]}: {found['status']}.")
            continue
        for entry in found["levels"]:
            lines.append(
                f"- a² law, {LABELS[kind]} at alpha {entry['alpha']:.4g}: measured "
                f"{entry['measured']:+.4f}, predicted {entry['predicted']:+.4f}, difference "
                f"{ci(entry['difference'])}: {entry['verdict']}."
            )
    for cell in summary["runaways"]:
        lines.append(
            f"- {LABELS[cell['kind']]} at alpha {cell['alpha']:.4g} ran away in {cell['count']} of "
            f"{cell['of']} seeds (left out of every interval above)."
        )
    choice = summary["choice"]
    for kind in REGULARIZERS:
        pick = choice.get(kind)
        if pick is None or pick.get("ran_away") or pick["test_vs_baseline"] is None:
            continue
        result = pick["test_vs_baseline"]
        lines.append(
            f"- {LABELS[kind]} at its best level (a/rms {pick['ratio']:.2g}, chosen on "
            f"validation): test loss − baseline {ci(result)}, {result['verdict']}; "
            f"{pick['cost_vs_baseline']:.2f}x the baseline's time per step."
        )
    return lines
