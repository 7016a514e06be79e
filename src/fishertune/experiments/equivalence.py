"""The equivalence study's report: NEFTune vs its matched Fisher penalty, across noise scales.

NEFTune adds uniform noise of half-width ``a = alpha / sqrt(L d)`` to the input embeddings ``X``;
to second order ``E_eps[loss(X + eps)] = loss(X) + (a^2 / 6) Tr(H_X)``. A curvature penalty with
``lambda_eq = a^2 / 6 = alpha^2 / (6 L d)`` (in the CE's mean reduction) on ``Tr(F_X)`` -- the
Gauss-Newton part of ``Tr(H_X)`` -- should therefore train like the noise, as long as (i) the
noise is small against the embeddings (``a / rms(X)`` small: the Taylor series is cut after its
second term) and (ii) the Gauss-Newton gap ``Tr(H_X) - Tr(F_X)`` is small against ``Tr(F_X)``
(the penalty sees ``lambda_eq Tr(F_X)``, the noise ``lambda_eq Tr(H_X)``).

This module reads a grid with a ``base:`` stage and a ``measure:`` stage (the shipped
``equivalence`` preset) and writes, into the report folder:

* ``equivalence.md``: per noise level, one table (rows baseline, NEFTune, token-F, logit-F;
  columns validation loss and its change against the baseline, ``Tr(F_X)``, ``Tr(H_X)``, their
  gap, exact match; ``mean ± std`` over seeds), then the agreement statement computed from them;
* ``equivalence.json``: the same numbers;
* ``equivalence_val_loss.png``, ``equivalence_curvature.png``, ``equivalence_trajectories.png``.

Each run's noise level is computed, not read from its name: with the base model's measured
``rms``, median length ``L`` and width ``d`` (its ``curvature.json``), NEFTune's is
``alpha / sqrt(L d) / rms`` and a penalty's ``sqrt(6 lambda) / rms`` (the ``a`` whose matched
coefficient it is). Runs are grouped by that value rounded to two significant digits.

Agreement: at a level, a penalty and NEFTune *agree* on a quantity when their means over seeds
differ by at most the combined seed spread ``sqrt(sd_pen^2 + sd_nef^2)`` (the standard deviation
of the difference of two single runs). NEFTune *moves* a quantity when its mean differs from the
baseline's by more than the same kind of spread; agreement where neither moves is reported as
such, since it says nothing about the equivalence.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.experiments.report import mean_std
from fishertune.files import MEASURE_FILE, RunFolder

__all__ = [
    "KINDS",
    "QUANTITIES",
    "StudyRun",
    "format_markdown",
    "load_study",
    "summarize",
    "write_equivalence_report",
]

KINDS = ("baseline", "neftune", "token-f", "logit-f")
PENALTIES = ("token-f", "logit-f")
# (key, label): the quantities of the tables; "delta_val_loss" is derived from val_loss.
QUANTITIES = (
    ("val_loss", "val loss"),
    ("delta_val_loss", "Δ val loss"),
    ("trace_f", "Tr(F_X)"),
    ("trace_h", "Tr(H_X)"),
    ("gap", "Tr(H_X)-Tr(F_X)"),
    ("exact_match", "exact match"),
)
LABELS = {"baseline": "baseline", "neftune": "NEFTune", "token-f": "token-F", "logit-f": "logit-F"}
COLORS = {"baseline": "0.35", "neftune": "C1", "token-f": "C2", "logit-f": "C3"}


@dataclass
class StudyRun:
    """One fine-tuning run of the study.

    Attributes:
        name, kind, seed: the run's name, method (one of :data:`KINDS`) and seed.
        ratio: its noise level ``a / rms`` (0 for the baseline).
        values: final ``val_loss`` (offline evaluator, whole validation split), ``exact_match``,
            and on the measured validation batches ``ce``, ``trace_f``, ``trace_h``, ``gap``.
        trajectory: ``(step, Tr(F_X), Tr(H_X), CE)`` at each measured checkpoint, step 0 being
            the base model.
    """

    name: str
    kind: str
    seed: int
    ratio: float
    values: dict[str, float] = field(default_factory=dict)
    trajectory: list[tuple[int, float, float, float]] = field(default_factory=list)


def _curvature_values(entry: dict[str, Any]) -> dict[str, float]:
    return {
        "ce": float(entry["loss"]["mean"]),
        "trace_f": float(entry["trace_f"]["mean"]),
        "trace_h": float(entry["trace_h"]["mean"]),
        "gap": float(entry["gap"]["mean"]),
    }


def _point(step: int, entry: dict[str, Any]) -> tuple[int, float, float, float]:
    values = _curvature_values(entry)
    return (step, values["trace_f"], values["trace_h"], values["ce"])


def _significant(value: float, digits: int = 2) -> float:
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def load_study(runs_dir: str | Path, names: Sequence[str]) -> tuple[dict[str, Any], list[StudyRun]]:
    """The base model's measurement and the finished runs among ``names``.

    Returns:
        ``(base, runs)``: ``base`` holds ``rms``, ``length`` (``L``), ``hidden_size`` (``d``),
        ``val_loss``, ``exact_match`` and ``curvature`` (``ce``, ``trace_f``, ``trace_h``,
        ``gap``) of the base model; ``runs`` the runs that have both an ``evaluation.json`` and a
        ``curvature.json``.

    Raises:
        FishertuneError: when the base run has no measurement yet.
    """
    from fishertune.experiments.grid import BASE_RUN

    runs_dir = Path(runs_dir)
    base, start = _load_base(runs_dir)
    runs = []
    for name in names:
        if name == BASE_RUN:
            continue
        run = _load_run(runs_dir, name, base, start)
        if run is not None:
            runs.append(run)
    return base, runs


def _load_base(runs_dir: Path) -> tuple[dict[str, Any], tuple[int, float, float, float]]:
    """The base model's numbers (as :func:`load_study` returns them) and its trajectory point,
    step 0 of every run's trajectory."""
    from fishertune.experiments.grid import BASE_RUN

    folder = RunFolder(runs_dir / BASE_RUN)
    measured = folder.curvature
    if not folder.measured:
        raise FishertuneError(
            f"{runs_dir / BASE_RUN / MEASURE_FILE}: the base stage has no measurement yet; "
            "the equivalence report needs it (its rms, L and d give every run's noise level)"
        )
    final = measured["final"]
    base_metrics = (folder.evaluation or {}).get("metrics", {})
    base = {
        "rms": float(final["embedding_rms"]),
        "length": int(final["typical_length"]),
        "hidden_size": int(final["hidden_size"]),
        "val_loss": float(base_metrics.get("offline/val_loss", math.nan)),
        "exact_match": float(base_metrics.get("offline/exact_match", math.nan)),
        "curvature": _curvature_values(final),
        "se": {key: float(final[key]["se_estimator"]) for key in ("trace_f", "trace_h", "gap")},
    }
    return base, _point(0, final)


def _noise_scale(kind: str, overrides: dict[str, Any], base: dict[str, Any]) -> float:
    """A run's noise half-width ``a``: NEFTune's ``alpha / sqrt(L d)``, a penalty's ``a`` whose
    matched coefficient ``a^2 / 6`` it uses, 0 for the baseline."""
    if kind == "neftune":
        from fishertune.schedules import neftune_scale

        return neftune_scale(float(overrides["neftune_alpha"]), base["length"], base["hidden_size"])
    if kind in PENALTIES:
        return math.sqrt(6.0 * float(overrides["penalty_coef"]))
    return 0.0


def _load_run(
    runs_dir: Path, name: str, base: dict[str, Any], start: tuple[int, float, float, float]
) -> StudyRun | None:
    """The run ``name`` of ``runs_dir``, or ``None`` while it lacks its spec, evaluation or
    measurement (or is of a method the study does not compare)."""
    folder = RunFolder(runs_dir / name)
    spec, evaluation, curvature = folder.spec, folder.evaluation, folder.curvature
    if spec is None or evaluation is None or not folder.measured:
        return None
    overrides = spec.get("overrides", {})
    kind = overrides.get("method", "baseline")
    if kind not in KINDS:
        return None
    scale = _noise_scale(kind, overrides, base)
    metrics = evaluation.get("metrics", {})
    return StudyRun(
        name=name,
        kind=kind,
        seed=int(spec.get("seed", 0)),
        ratio=_significant(scale / base["rms"]) if scale else 0.0,
        values={
            "val_loss": float(metrics.get("offline/val_loss", math.nan)),
            "exact_match": float(metrics.get("offline/exact_match", math.nan)),
            **_curvature_values(curvature["final"]),
        },
        trajectory=[start]
        + [
            _point(int(entry["step"]), entry)
            for entry in curvature.get("trajectory", [])
            if isinstance(entry.get("step"), int)
        ],
    )


def _cell(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean ± std (:func:`~fishertune.experiments.report.mean_std`) of the finite values."""
    return asdict(mean_std([v for v in values if math.isfinite(v)]))


def _spread(*cells: dict[str, Any]) -> float:
    return math.sqrt(sum((c["std"] or 0.0) ** 2 for c in cells))


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | bool]:
    diff = a["mean"] - b["mean"]
    spread = _spread(a, b)
    return {"difference": diff, "spread": spread, "within": abs(diff) <= spread}


def _paired(first: Sequence[StudyRun], second: Sequence[StudyRun], key: str) -> dict[str, Any]:
    """Mean ± std over seeds of ``first - second`` for the seeds both have."""
    by_seed = {r.seed: r.values[key] for r in second}
    return _cell([r.values[key] - by_seed[r.seed] for r in first if r.seed in by_seed])


def _row(members: list[StudyRun], base_val: float) -> dict[str, Any]:
    """One table row: mean ± std over the seeds of ``members`` for every quantity."""
    cells: dict[str, Any] = {
        key: _cell([r.values[key] for r in members])
        for key in ("val_loss", "trace_f", "trace_h", "gap", "exact_match")
    }
    cells["delta_val_loss"] = _cell([r.values["val_loss"] - base_val for r in members])
    cells["ce"] = _cell([r.values["ce"] for r in members])
    cells["seeds"] = sorted(r.seed for r in members)
    return cells


def _level(
    ratio: float,
    runs: Sequence[StudyRun],
    baseline: list[StudyRun],
    baseline_row: dict[str, Any],
    base: dict[str, Any],
    base_val: float,
) -> dict[str, Any]:
    """The table, paired differences and agreements of the noise level ``a / rms = ratio``."""
    length, hidden, rms = base["length"], base["hidden_size"], base["rms"]
    members = {k: [r for r in runs if r.kind == k and r.ratio == ratio] for k in KINDS[1:]}
    rows = {"baseline": baseline_row}
    rows.update({k: _row(m, base_val) for k, m in members.items() if m})
    scale = ratio * rms
    lam = scale**2 / 6.0
    level: dict[str, Any] = {
        "ratio": ratio,
        "alpha": scale * math.sqrt(length * hidden),
        "lambda_eq": lam,
        "rows": rows,
        # the second-order loss terms at the base model: what the penalty adds and what the
        # noise adds beyond it (the Gauss-Newton gap's share)
        "penalty_term_base": lam * base["curvature"]["trace_f"],
        "gap_term_base": lam * base["curvature"]["gap"],
    }
    # Paired by seed: runs of the same seed share the data order and start from the same base
    # model, so per-seed differences remove the variation the methods have in common.
    level["paired_vs_baseline"] = {
        kind: _paired(m, baseline, "val_loss") for kind, m in members.items() if m
    }
    if members.get("neftune"):
        level["paired_vs_neftune"] = {
            pen: _paired(members[pen], members["neftune"], "val_loss")
            for pen in PENALTIES
            if members.get(pen)
        }
    if "neftune" in rows:
        nef = rows["neftune"]
        level["neftune_moves"] = {
            key: not _compare(nef[key], baseline_row[key])["within"]
            for key in ("val_loss", "trace_f", "trace_h")
        }
        level["agreement"] = {
            pen: {
                key: _compare(rows[pen][key], nef[key])
                for key in ("val_loss", "trace_f", "trace_h", "exact_match")
            }
            for pen in PENALTIES
            if pen in rows
        }
    return level


def _agree_up_to(levels: list[dict[str, Any]], pen: str, key: str) -> float | None:
    """The largest level up to which ``pen`` agrees with NEFTune on ``key`` at every level."""
    last = None
    for level in levels:
        verdict = level.get("agreement", {}).get(pen, {}).get(key)
        if verdict is None or not verdict["within"]:
            break
        last = level["ratio"]
    return last


def summarize(base: dict[str, Any], runs: Sequence[StudyRun]) -> dict[str, Any]:
    """Per-level tables, agreements and the Gauss-Newton terms (see the module docstring)."""
    baseline = [r for r in runs if r.kind == "baseline"]
    if not baseline:
        raise FishertuneError("the equivalence report needs finished baseline runs")
    levels_found = sorted({r.ratio for r in runs if r.kind != "baseline"})
    base_val = _cell([r.values["val_loss"] for r in baseline])["mean"]
    baseline_row = _row(baseline, base_val)
    levels = [_level(ratio, runs, baseline, baseline_row, base, base_val) for ratio in levels_found]
    return {
        "base": base,
        "baseline": baseline_row,
        "levels": levels,
        "agree_up_to": {
            pen: {key: _agree_up_to(levels, pen, key) for key in ("val_loss", "trace_f", "trace_h")}
            for pen in PENALTIES
        },
        "runs": [asdict(r) for r in runs],
    }


def _fmt(cell: dict[str, Any], key: str) -> str:
    """Losses and rates with 3 decimals (paired differences 4); traces with 4 significant digits
    (their std with 2)."""
    if cell["n"] == 0 or not math.isfinite(cell["mean"]):
        return "–"
    if key in ("trace_f", "trace_h", "gap"):
        mean, std = f"{cell['mean']:.4g}", "{:.2g}"
    else:
        places = 4 if key == "paired" else 3
        mean, std = f"{cell['mean']:.{places}f}", f"{{:.{places}f}}"
    return mean if cell["std"] is None else f"{mean} ± {std.format(cell['std'])}"


def _verdict_text(summary: dict[str, Any]) -> list[str]:
    lines = []
    levels = summary["levels"]
    for pen in PENALTIES:
        upto = summary["agree_up_to"][pen]
        if not any(pen in lv.get("agreement", {}) for lv in levels):
            lines.append(f"- {LABELS[pen]}: no finished runs to compare with NEFTune.")
            continue
        first_bad = next(
            (
                lv
                for lv in levels
                if not lv.get("agreement", {})
                .get(pen, {})
                .get("val_loss", {"within": True})["within"]
            ),
            None,
        )
        if upto["val_loss"] is None:
            head = f"- {LABELS[pen]} vs NEFTune, validation loss: they do not agree even at the "
            head += f"smallest level (a/rms = {levels[0]['ratio']:g})" if levels else "no levels"
        elif first_bad is None:
            head = (
                f"- {LABELS[pen]} vs NEFTune, validation loss: they agree within the seed spread "
                f"at every level measured (up to a/rms = {upto['val_loss']:g})"
            )
        else:
            comp = first_bad["agreement"][pen]["val_loss"]
            head = (
                f"- {LABELS[pen]} vs NEFTune, validation loss: they agree within the seed spread "
                f"up to a/rms = {upto['val_loss']:g}; at a/rms = {first_bad['ratio']:g} they do "
                f"not agree (difference {comp['difference']:+.4f}, spread {comp['spread']:.4f})"
            )
        tf, th = upto["trace_f"], upto["trace_h"]
        head += (
            f"; Tr(F_X) agrees up to a/rms = {tf:g}" if tf is not None else "; Tr(F_X) never agrees"
        )
        head += f", Tr(H_X) up to {th:g}." if th is not None else ", Tr(H_X) never agrees."
        lines.append(head)
    moved = [lv["ratio"] for lv in levels if lv.get("neftune_moves", {}).get("val_loss")]
    if moved:
        lines.append(
            "- NEFTune moves the validation loss away from the baseline by more than the seed "
            f"spread at a/rms = {', '.join(f'{r:g}' for r in moved)}; at the other levels its "
            "effect is within the seed noise, so agreement there does not test the equivalence."
        )
    else:
        lines.append(
            "- NEFTune never moves the validation loss away from the baseline by more than the "
            "seed spread: the agreements above do not test the equivalence."
        )
    base = summary["base"]["curvature"]
    ratio = base["gap"] / base["trace_f"] if base["trace_f"] else math.nan
    lines.append(
        f"- Gauss-Newton gap at the base model: Tr(H_X) = {base['trace_h']:.4g}, Tr(F_X) = "
        f"{base['trace_f']:.4g}, gap = {base['gap']:.4g} ({ratio:+.2f} x Tr(F_X)). To second order "
        "the noise adds lambda_eq Tr(H_X) = lambda_eq (Tr(F_X) + gap) to the loss, the penalty "
        "lambda_eq Tr(F_X): the gap is the part of the noise's regularizer the penalty lacks."
    )
    return lines


def format_markdown(summary: dict[str, Any], *, title: str = "Equivalence study") -> str:
    """The report's text: setup, one table per noise level, the agreement statement."""
    base = summary["base"]
    parts = [
        f"# {title}\n",
        f"Base model: rms(X) = {base['rms']:.4g}, L = {base['length']}, d = "
        f"{base['hidden_size']}, val loss {base['val_loss']:.4f}, exact match "
        f"{base['exact_match']:.3f}; on the measured validation batches Tr(F_X) = "
        f"{base['curvature']['trace_f']:.4g} ± {base['se']['trace_f']:.2g}, Tr(H_X) = "
        f"{base['curvature']['trace_h']:.4g} ± {base['se']['trace_h']:.2g} (± 1 standard error "
        "of the estimators, over probes and draws).\n",
        "Cells: mean ± std over seeds (sample std). Δ val loss is against the baseline's mean. "
        "Tr(F_X), Tr(H_X) and their gap are measured on the same validation batches for every "
        "run (fishertune analyze's estimators).\n",
    ]
    header = "| method | " + " | ".join(label for _, label in QUANTITIES) + " | n |"
    rule = "|" + "---|" * (len(QUANTITIES) + 2)
    for level in summary["levels"]:
        parts.append(
            f"## a/rms = {level['ratio']:g} (alpha = {level['alpha']:.4g}, lambda_eq = "
            f"{level['lambda_eq']:.4g})\n"
        )
        lines = [header, rule]
        for kind, cells in level["rows"].items():
            values = " | ".join(_fmt(cells[key], key) for key, _ in QUANTITIES)
            lines.append(f"| {LABELS[kind]} | {values} | {cells['val_loss']['n']} |")
        parts.append("\n".join(lines) + "\n")
        parts.append(
            f"Second-order terms at the base model: penalty lambda_eq Tr(F_X) = "
            f"{level['penalty_term_base']:.3g}, gap term lambda_eq (Tr(H_X) - Tr(F_X)) = "
            f"{level['gap_term_base']:.3g}.\n"
        )
    parts.append("## Agreement by level\n")
    lines = [
        "| a/rms | penalty | Δ val loss (pen − NEFTune) | spread | agree | Δ Tr(F_X) | spread "
        "| agree | Δ Tr(H_X) | spread | agree |",
        "|" + "---|" * 11,
    ]
    for level in summary["levels"]:
        for pen, comps in level.get("agreement", {}).items():
            cells = []
            for key in ("val_loss", "trace_f", "trace_h"):
                comp = comps[key]
                number = "{:+.4f}" if key == "val_loss" else "{:+.4g}"
                spread = "{:.4f}" if key == "val_loss" else "{:.3g}"
                cells += [
                    number.format(comp["difference"]),
                    spread.format(comp["spread"]),
                    "yes" if comp["within"] else "**no**",
                ]
            lines.append(f"| {level['ratio']:g} | {LABELS[pen]} | " + " | ".join(cells) + " |")
    parts.append("\n".join(lines) + "\n")
    parts.append(
        "## Paired by seed\n\nValidation-loss change against the run of the same seed (same data "
        "order, same base model), mean ± std over seeds: the noise and the penalties against the "
        "baseline, and each penalty against NEFTune.\n"
    )
    lines = [
        "| a/rms | NEFTune − baseline | token-F − baseline | logit-F − baseline "
        "| token-F − NEFTune | logit-F − NEFTune |",
        "|" + "---|" * 6,
    ]
    for level in summary["levels"]:
        against = level.get("paired_vs_baseline", {})
        versus = level.get("paired_vs_neftune", {})
        cells = [_fmt(against[k], "paired") if k in against else "–" for k in KINDS[1:]] + [
            _fmt(versus[k], "paired") if k in versus else "–" for k in PENALTIES
        ]
        lines.append(f"| {level['ratio']:g} | " + " | ".join(cells) + " |")
    parts.append("\n".join(lines) + "\n")
    parts.append("## Reading\n")
    parts.append(
        "Agreement: the means of a penalty and NEFTune differ by at most the combined seed "
        "spread sqrt(sd_1^2 + sd_2^2).\n"
    )
    parts.append("\n".join(_verdict_text(summary)) + "\n")
    return "\n".join(parts)


def _level_axis(ax: Any, summary: dict[str, Any]) -> None:
    ax.set_xscale("log")
    ratios = [lv["ratio"] for lv in summary["levels"]]
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.minorticks_off()
    ax.set_xlabel("noise level a / rms(X)")


def _plot_val_loss(summary: dict[str, Any], path: Path) -> Path:
    """Per-seed differences to the baseline run of the same seed (paired), mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(0.0, color=COLORS["baseline"], lw=0.8, label="baseline")
    for offset, kind in zip((-0.03, 0.0, 0.03), KINDS[1:], strict=True):
        points = [
            (lv["ratio"], lv["paired_vs_baseline"][kind])
            for lv in summary["levels"]
            if kind in lv.get("paired_vs_baseline", {})
        ]
        # side by side, not on top of each other
        _mean_std_points(ax, kind, [(x * 10**offset, cell) for x, cell in points])
    _level_axis(ax, summary)
    ax.set_ylabel("val loss − baseline val loss (same seed)")
    ax.set_title("Validation loss change vs baseline (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mean_std_points(ax: Any, kind: str, points: list[tuple[float, dict[str, Any]]]) -> None:
    """One method's (x, {mean, std}) cells as points with ±1 std bars, in its colour."""
    if points:
        ax.errorbar(
            [x for x, _ in points],
            [cell["mean"] for _, cell in points],
            yerr=[cell["std"] or 0.0 for _, cell in points],
            marker="o",
            capsize=3,
            color=COLORS[kind],
            label=LABELS[kind],
        )


def _plot_curvature(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in zip(axes, ("trace_f", "trace_h"), ("Tr(F_X)", "Tr(H_X)"), strict=True):
        cell = summary["baseline"][key]
        sd = cell["std"] or 0.0
        ax.axhspan(cell["mean"] - sd, cell["mean"] + sd, color="0.88", label="baseline ± std")
        ax.axhline(cell["mean"], color=COLORS["baseline"], lw=0.8)
        for kind in KINDS[1:]:
            points = [
                (lv["ratio"], lv["rows"][kind][key])
                for lv in summary["levels"]
                if kind in lv["rows"]
            ]
            _mean_std_points(ax, kind, points)
        _level_axis(ax, summary)
        ax.set_ylabel(f"{label} (validation, final model)")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _trajectory_band(members: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    by_step: dict[int, list[float]] = {}
    for run in members:
        for step, trace_f, _, _ in run["trajectory"]:
            by_step.setdefault(int(step), []).append(trace_f)
    steps = sorted(by_step)
    cells = [_cell(by_step[s]) for s in steps]
    return steps, [c["mean"] for c in cells], [c["std"] or 0.0 for c in cells]


def _plot_trajectories(summary: dict[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = summary["levels"]
    if not levels:
        return None
    chosen = [levels[0]] if len(levels) == 1 else [levels[0], levels[-1]]
    fig, axes = plt.subplots(1, len(chosen), figsize=(5.6 * len(chosen), 4.2), squeeze=False)
    for ax, level in zip(axes[0], chosen, strict=True):
        for kind in KINDS:
            members = [
                r
                for r in summary["runs"]
                if r["kind"] == kind and (kind == "baseline" or r["ratio"] == level["ratio"])
            ]
            if not members:
                continue
            steps, means, stds = _trajectory_band(members)
            ax.plot(steps, means, marker="o", color=COLORS[kind], label=LABELS[kind])
            ax.fill_between(
                steps,
                [m - s for m, s in zip(means, stds, strict=True)],
                [m + s for m, s in zip(means, stds, strict=True)],
                color=COLORS[kind],
                alpha=0.15,
            )
        ax.set_xlabel("fine-tuning step (0 = base model)")
        ax.set_ylabel("Tr(F_X) on validation batches")
        ax.set_title(f"a/rms = {level['ratio']:g}")
        ax.legend(fontsize=8)
    fig.suptitle("Curvature along training (mean ± std over seeds)")
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
    runs_dir: str | Path, names: Sequence[str], out_dir: str | Path, *, title: str
) -> dict[str, Path]:
    """Write ``equivalence.md``, ``equivalence.json`` and the three plots into ``out_dir``.

    Returns:
        The written files by kind.
    """
    base, runs = load_study(runs_dir, names)
    summary = summarize(base, runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {
        "equivalence_md": out_dir / "equivalence.md",
        "equivalence_json": out_dir / "equivalence.json",
    }
    written["equivalence_md"].write_text(format_markdown(summary, title=title))
    written["equivalence_json"].write_text(json.dumps(_json_safe(summary), indent=1) + "\n")
    written["val_loss_png"] = _plot_val_loss(summary, out_dir / "equivalence_val_loss.png")
    written["curvature_png"] = _plot_curvature(summary, out_dir / "equivalence_curvature.png")
    trajectories = _plot_trajectories(summary, out_dir / "equivalence_trajectories.png")
    if trajectories is not None:
        written["trajectories_png"] = trajectories
    return written
