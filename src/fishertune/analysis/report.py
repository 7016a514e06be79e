"""Reports of an :class:`~fishertune.analysis.results.AnalysisResult`: table, JSON, CSV and plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from fishertune.analysis.results import Z_95, AnalysisResult

__all__ = ["format_table", "write_csv", "write_json", "write_plot", "write_reports"]

CSV_COLUMNS = [
    "batch",
    "alpha",
    "sequences",
    "scored_tokens",
    "loss",
    "measured",
    "measured_se",
    "measured_ci95_batches",
    "predicted",
    "predicted_se",
    "predicted_ci95_batches",
    "ratio",
    "ratio_ci95",
    "trace_hessian",
    "trace_hessian_se",
    "trace_fisher",
    "trace_fisher_se",
    "lambda_equiv",
]


def _pm(mean: float, half_width: float) -> str:
    if math.isnan(half_width):
        return f"{mean:+.3e}"
    return f"{mean:+.3e} ± {half_width:.1e}"


def format_table(result: AnalysisResult) -> str:
    """A plain-text report: per-alpha measured vs predicted loss increase, then the curvature.

    Intervals are ``± 1.96 SE``: ``mc`` from the estimators' own noise on the batches seen,
    ``batches`` from the spread between batches.
    """
    config = result.config
    lines = [
        f"model: {config.get('model', '?')}   data: {config.get('data', '?')}   "
        f"dtype: {config.get('dtype', '?')}   NEFTune L: {config.get('length_mode', '?')}",
        f"{result.trace_h.num_batches} batches x {config.get('batch_size')} sequences, "
        f"{config.get('probes')} probes, {config.get('fisher_draws')} Fisher draws, "
        f"{config.get('noise_samples')} antithetic noise pairs; d = {result.hidden_size}, "
        f"median length = {result.median_length:g}, rms(X) = {result.embedding_rms:.3e}",
        "",
        "loss increase E[loss(X+eps)] - loss(X): measured vs (a^2/6) Tr(H_X), ± 1.96 SE",
    ]
    header = (
        f"{'alpha':>6} {'a(med)':>9} {'a/rms':>7} {'lambda_eq':>9}  "
        f"{'measured ± mc':>22} {'±batches':>8}  {'predicted ± mc':>22} {'±batches':>8}  "
        f"{'ratio ± CI':>15} {'ok':>3} {'batches ok':>10}"
    )
    lines += [header, "-" * len(header)]
    for row in result.alphas:
        ratio = row.ratio
        lines.append(
            f"{row.alpha:>6g} {row.scale_at_median:>9.2e} {row.scale_over_rms:>7.3f} "
            f"{row.lambda_equiv:>9.2e}  "
            f"{_pm(row.measured.mean, row.measured.ci_estimator):>22} "
            f"{row.measured.ci_batches:>8.1e}  "
            f"{_pm(row.predicted.mean, row.predicted.ci_estimator):>22} "
            f"{row.predicted.ci_batches:>8.1e}  "
            f"{ratio.mean:>7.3f} ± {Z_95 * ratio.stderr:<5.3f} {'yes' if row.agree else 'no':>3} "
            f"{f'{row.batches_agreeing}/{row.measured.num_batches}':>10}"
        )
    gn = result.fisher_over_hessian
    lines += [
        "a(med) = alpha / sqrt(L d) at the median length L; lambda_eq = a(med)^2 / 6; ok: the "
        "pooled means agree within 1.96 SE (mc);",
        "batches ok: batches whose own measured and predicted increases agree within 1.96 SE.",
        "",
        "curvature w.r.t. the embeddings (mean CE; ± 1.96 SE mc, batches)",
        f"  CE loss            {result.loss.mean:.4f} ± {result.loss.ci_batches:.1e}",
        f"  Tr(H_X)            {_pm(result.trace_h.mean, result.trace_h.ci_estimator)}, "
        f"{result.trace_h.ci_batches:.1e}",
        f"  Tr(F_X)            {_pm(result.trace_f.mean, result.trace_f.ci_estimator)}, "
        f"{result.trace_f.ci_batches:.1e}",
        f"  Tr(H_X) - Tr(F_X)  {_pm(result.gap.mean, result.gap.ci_estimator)}, "
        f"{result.gap.ci_batches:.1e}",
        f"  Tr(F_X) / Tr(H_X)  {gn.mean:.3f} ± {Z_95 * gn.stderr:.3f}",
    ]
    return "\n".join(lines)


def write_json(result: AnalysisResult, path: Path) -> None:
    """All numbers: config, aggregates, per-alpha summaries and per-batch measurements.

    ``nan`` (an interval from a single batch) is written as ``null``.
    """
    path.write_text(json.dumps(_finite_or_none(result.to_dict()), indent=2) + "\n")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def write_csv(result: AnalysisResult, path: Path) -> None:
    """One row per (batch, alpha), then one ``batch=all`` row per alpha with the aggregates."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        coefs = {row.alpha: row.lambda_equiv for row in result.alphas}
        for batch in result.batches:
            for alpha, measured in batch.measured.items():
                predicted = batch.predicted(alpha)
                writer.writerow(
                    {
                        "batch": batch.index,
                        "alpha": alpha,
                        "sequences": batch.num_sequences,
                        "scored_tokens": batch.num_scored,
                        "loss": batch.loss,
                        "measured": measured.mean,
                        "measured_se": measured.stderr,
                        "predicted": predicted.mean,
                        "predicted_se": predicted.stderr,
                        "ratio": measured.mean / predicted.mean if predicted.mean else "",
                        "trace_hessian": batch.trace_h.mean,
                        "trace_hessian_se": batch.trace_h.stderr,
                        "trace_fisher": batch.trace_f.mean,
                        "trace_fisher_se": batch.trace_f.stderr,
                        "lambda_equiv": coefs[alpha],
                    }
                )
        for row in result.alphas:
            writer.writerow(
                {
                    "batch": "all",
                    "alpha": row.alpha,
                    "sequences": sum(b.num_sequences for b in result.batches),
                    "scored_tokens": sum(b.num_scored for b in result.batches),
                    "loss": result.loss.mean,
                    "measured": row.measured.mean,
                    "measured_se": row.measured.se_estimator,
                    "measured_ci95_batches": row.measured.ci_batches,
                    "predicted": row.predicted.mean,
                    "predicted_se": row.predicted.se_estimator,
                    "predicted_ci95_batches": row.predicted.ci_batches,
                    "ratio": row.ratio.mean,
                    "ratio_ci95": Z_95 * row.ratio.stderr,
                    "trace_hessian": result.trace_h.mean,
                    "trace_hessian_se": result.trace_h.se_estimator,
                    "trace_fisher": result.trace_f.mean,
                    "trace_fisher_se": result.trace_f.se_estimator,
                    "lambda_equiv": row.lambda_equiv,
                }
            )


def write_plot(result: AnalysisResult, path: Path) -> None:
    """Measured vs predicted loss increase over alpha (error bars: 1.96 SE), and their ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [row.alpha for row in result.alphas]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    left.errorbar(
        alphas,
        [row.measured.mean for row in result.alphas],
        yerr=[row.measured.ci_estimator for row in result.alphas],
        fmt="o-",
        capsize=3,
        label="measured  E[loss(X+eps)] - loss(X)",
    )
    left.errorbar(
        alphas,
        [row.predicted.mean for row in result.alphas],
        yerr=[row.predicted.ci_estimator for row in result.alphas],
        fmt="s--",
        capsize=3,
        label="predicted  (a²/6) Tr(H_X)",
    )
    left.axhline(0.0, color="grey", linewidth=0.5)
    left.set_xlabel("NEFTune alpha")
    left.set_ylabel("loss increase")
    left.set_title("NEFTune loss increase (± 1.96 SE)")
    left.legend(fontsize=8)
    right.errorbar(
        alphas,
        [row.ratio.mean for row in result.alphas],
        yerr=[Z_95 * row.ratio.stderr for row in result.alphas],
        fmt="o-",
        capsize=3,
    )
    right.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    positive = [alpha for alpha in alphas if alpha > 0]
    if len(positive) == len(alphas) and max(positive) > 10 * min(positive):
        # Alphas spread over decades (0.25 ... 15): the increase grows like alpha^2, so a linear
        # axis would flatten the small-alpha points, where the second-order prediction holds.
        values = [abs(v) for row in result.alphas for v in (row.measured.mean, row.predicted.mean)]
        nonzero = [v for v in values if v > 0 and math.isfinite(v)]
        for axis in (left, right):
            axis.set_xscale("log")
        if nonzero:
            left.set_yscale("symlog", linthresh=min(nonzero))
    right.set_xlabel("NEFTune alpha")
    right.set_ylabel("measured / predicted")
    right.set_title("second-order accuracy")
    fig.suptitle(f"{result.config.get('model', '')}", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(result: AnalysisResult, output: Path) -> dict[str, Path]:
    """Write ``analysis.json``, ``analysis.csv`` and ``analysis.png`` into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output / "analysis.json",
        "csv": output / "analysis.csv",
        "plot": output / "analysis.png",
    }
    write_json(result, paths["json"])
    write_csv(result, paths["csv"])
    write_plot(result, paths["plot"])
    return paths
