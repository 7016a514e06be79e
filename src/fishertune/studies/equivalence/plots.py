"""The study's plots: the comparisons per level, the ratios, the slope, the choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fishertune.studies.equivalence.runs import COLORS, COMPARISONS, LABELS, REGULARIZERS


def _figure(size: tuple[float, float], *, columns: int = 1) -> tuple[Any, Any]:
    """A figure and its axes (one, or a row of ``columns``), as the grid's report draws them:
    ``matplotlib.figure.Figure`` without pyplot, so no backend is switched for the process and
    no figure is left open."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(1, columns)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


def plot_pairs(summary: dict[str, Any], path: Path) -> Path:
    """The four comparisons of each level against ``a/rms`` with their 95% intervals and the
    margin."""
    comparisons = COMPARISONS[:4]
    fig, axes = _figure((4.2 * len(comparisons), 3.8), columns=len(comparisons))
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
    return _save(fig, path)


def plot_ratios(summary: dict[str, Any], path: Path) -> Path:
    """Each regularizer's effect over NEFTune's per level, with Fieller's 95% interval where it is
    bounded (an open marker where it is not), the equivalence band and the lines at 0 and 1."""
    lo, hi = 1 - summary["ratio_margin"], 1 + summary["ratio_margin"]
    fig, ax = _figure((6.4, 4.2))
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
    return _save(fig, path)


def plot_slope(summary: dict[str, Any], path: Path) -> Path:
    """NEFTune's and each regularizer's effect against ``a^2``, per seed, with the fitted lines."""
    fig, ax = _figure((6.4, 4.2))
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
    return _save(fig, path)


def plot_choice(summary: dict[str, Any], path: Path) -> Path:
    """Each regularizer at its best level: test-loss change against the baseline and its cost per
    step."""
    fig, ax = _figure((6.4, 4.2))
    ax.axhline(0.0, color="0.4", lw=0.8, label="baseline")
    if summary["margin"] is not None:
        ax.axhspan(-summary["margin"], summary["margin"], color="0.9")
    for kind in REGULARIZERS:
        pick = summary["choice"].get(kind)
        if pick is None or pick.get("ran_away") or pick["test_vs_baseline"] is None:
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
    return _save(fig, path)
