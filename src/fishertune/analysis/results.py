"""What ``fishertune analyze`` measures, as results: per-batch measurements, their aggregates over
batches (the estimators' own error beside the between-batch one), the per-alpha summaries, and
:func:`summarize`, which pools the batches into an :class:`AnalysisResult`. The measurements
themselves are :mod:`fishertune.analysis.measure`'s."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fishertune.estimators import Estimate
from fishertune.schedules import neftune_equivalent_coef, neftune_scale

__all__ = [
    "Z_95",
    "Aggregate",
    "AlphaSummary",
    "AnalysisResult",
    "BatchMeasurement",
    "Estimate",
    "combine_batches",
    "summarize",
]

Z_95 = 1.96


@dataclass(frozen=True, kw_only=True)  # its own fields by name: never taken for ``samples``
class Aggregate(Estimate):
    """An :class:`Estimate` pooled over batches, with the between-batch error beside its own.

    ``mean`` is the mean of the per-batch means and ``stderr`` the estimators' own standard error
    of it, ``sqrt(sum_b se_b^2) / n`` (the Monte-Carlo noise of the probes, draws and noise pairs
    on the batches seen), so code that takes an :class:`Estimate` takes an aggregate too and
    compares it by that error. The between-batch error ``std_b(mean_b) / sqrt(n)`` says instead
    how far another sample of the data could land; the two answer different questions and are
    reported side by side.

    Attributes:
        mean: mean of the per-batch values.
        stderr: the estimators' own standard error of ``mean`` (also :attr:`se_estimator`).
        samples: ``None`` (the per-batch values stay in the batches' own measurements).
        se_batches: between-batch standard error, ``std_b(value) / sqrt(n)`` (``nan`` if n < 2).
        num_batches: ``n``.
    """

    se_batches: float = math.nan
    num_batches: int = 0

    @property
    def se_estimator(self) -> float:
        """The estimators' own standard error of ``mean``: :attr:`stderr`."""
        return self.stderr

    @property
    def ci_estimator(self) -> float:
        """Half-width of the 95% interval from the estimators' own error."""
        return Z_95 * self.se_estimator

    @property
    def ci_batches(self) -> float:
        """Half-width of the 95% interval across batches."""
        return Z_95 * self.se_batches

    def scaled(self, factor: float) -> Aggregate:
        """The aggregate of ``factor`` times each batch's value: every error scales by
        ``|factor|``."""
        return Aggregate(
            factor * self.mean,
            abs(factor) * self.stderr,
            se_batches=abs(factor) * self.se_batches,
            num_batches=self.num_batches,
        )

    def to_dict(self) -> dict[str, float]:
        """The keys the analysis has always written (``se_estimator``, not ``stderr``)."""
        return {
            "mean": self.mean,
            "se_estimator": self.se_estimator,
            "se_batches": self.se_batches,
            "ci95_estimator": self.ci_estimator,
            "ci95_batches": self.ci_batches,
            "num_batches": self.num_batches,
        }


def combine_batches(estimates: Sequence[Estimate]) -> Aggregate:
    """Combine per-batch estimates (each with its own standard error) into an :class:`Aggregate`."""
    count = len(estimates)
    if count == 0:
        return Aggregate(math.nan, math.nan, se_batches=math.nan, num_batches=0)
    means = [e.mean for e in estimates]
    se_estimator = math.sqrt(sum(e.stderr**2 for e in estimates)) / count
    se_batches = statistics.stdev(means) / math.sqrt(count) if count > 1 else math.nan
    return Aggregate(
        statistics.fmean(means), se_estimator, se_batches=se_batches, num_batches=count
    )


def _agree(first: Estimate, second: Estimate) -> bool:
    """``|m1 - m2| <= 1.96 sqrt(se1^2 + se2^2)``."""
    return abs(first.mean - second.mean) <= Z_95 * math.hypot(first.stderr, second.stderr)


def _ratio(numerator: Estimate, denominator: Estimate) -> Estimate:
    """``mean_n / mean_d`` with the delta-method error of the estimators' own noise (``stderr``).

    For two aggregates of the same batches the between-batch spread is shared and left out.
    """
    if denominator.mean == 0 or math.isnan(denominator.mean):
        return Estimate(math.nan, math.nan)
    ratio = numerator.mean / denominator.mean
    relative = 0.0
    for part in (numerator, denominator):
        if part.mean != 0:
            relative += (part.stderr / part.mean) ** 2
    return Estimate(ratio, abs(ratio) * math.sqrt(relative))


@dataclass
class BatchMeasurement:
    """Everything measured on one batch.

    Attributes:
        index: batch number.
        num_sequences, num_tokens, num_scored: ``B``, real tokens, scored (assistant) tokens ``N``.
        lengths: real length of each sequence.
        embedding_rms: ``sqrt(mean X^2)`` over the real tokens.
        loss: mean CE over the scored tokens.
        trace_h: ``Tr(H_X)`` (Hutchinson).
        trace_h_weighted: ``Tr(W H_X)``, ``W = diag(a_i^2)`` at ``alpha = 1``: the prediction at
            ``alpha`` is ``alpha^2 / 6`` times it.
        trace_f: ``Tr(F_X)`` (token-F, mean over scored tokens).
        measured: alpha -> ``E[loss(X + eps)] - loss(X)`` (antithetic Monte Carlo).
    """

    index: int
    num_sequences: int
    num_tokens: int
    num_scored: int
    lengths: list[int]
    embedding_rms: float
    loss: float
    trace_h: Estimate
    trace_h_weighted: Estimate
    trace_f: Estimate
    measured: dict[float, Estimate]

    def predicted(self, alpha: float) -> Estimate:
        """``(alpha^2 / 6) Tr(W H_X)``."""
        factor = alpha**2 / 6.0
        return Estimate(factor * self.trace_h_weighted.mean, factor * self.trace_h_weighted.stderr)

    def to_dict(self) -> dict[str, Any]:
        out = {
            key: value.to_dict() if isinstance(value, Estimate) else value
            for key, value in vars(self).items()
        }
        out["measured"] = {str(alpha): value.to_dict() for alpha, value in self.measured.items()}
        out["predicted"] = {str(alpha): self.predicted(alpha).to_dict() for alpha in self.measured}
        return out


@dataclass
class AlphaSummary:
    """Measured vs predicted loss increase at one alpha, aggregated over batches.

    Attributes:
        alpha: NEFTune's alpha.
        scale_at_median: ``a = alpha / sqrt(L_med d)`` at the data's median length.
        scale_over_rms: ``a / rms(X)``: the Taylor prediction holds when this is small.
        lambda_equiv: ``alpha^2 / (6 L_med d)``
            (:func:`fishertune.schedules.neftune_equivalent_coef`).
        measured: ``E[loss(X + eps)] - loss(X)``.
        predicted: ``(1/6) Tr(A H_X A)``.
        ratio: ``measured / predicted`` (delta-method error from the estimators' noise).
        predicted_median_length: ``lambda_equiv Tr(H_X)``, the prediction if every sequence had
            the median length.
        fisher_penalty_at_lambda_equiv: ``lambda_equiv Tr(F_X)``, what a token-F penalty with the
            NEFTune-equivalent coefficient adds to the loss.
        batches_agreeing: batches whose own measured and predicted increases agree within
            1.96 of their combined standard error (the curvature's sign and size vary between
            batches, so the pooled means can hide or blur a per-batch agreement).
    """

    alpha: float
    scale_at_median: float
    scale_over_rms: float
    lambda_equiv: float
    measured: Aggregate
    predicted: Aggregate
    ratio: Estimate
    predicted_median_length: float
    fisher_penalty_at_lambda_equiv: float
    batches_agreeing: int = 0

    @property
    def agree(self) -> bool:
        """Whether measured and predicted agree within 1.96 of their combined estimator error."""
        return _agree(self.measured, self.predicted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "scale_at_median": self.scale_at_median,
            "scale_over_rms": self.scale_over_rms,
            "lambda_equiv": self.lambda_equiv,
            "measured": self.measured.to_dict(),
            "predicted": self.predicted.to_dict(),
            "ratio": self.ratio.to_dict() | {"ci95": Z_95 * self.ratio.stderr},
            "agree_within_ci95": self.agree,
            "predicted_median_length": self.predicted_median_length,
            "fisher_penalty_at_lambda_equiv": self.fisher_penalty_at_lambda_equiv,
            "batches_agreeing": self.batches_agreeing,
        }


@dataclass
class AnalysisResult:
    """Output of :func:`analyze`: per-batch measurements, per-alpha summaries and curvature totals.

    Attributes:
        config: the settings of the run (alphas, sizes, seed, dtype, length convention, ...).
        hidden_size: ``d``.
        median_length: median real length of the data's sequences (after truncation).
        batches: per-batch :class:`BatchMeasurement`.
        alphas: per-alpha :class:`AlphaSummary`.
        loss, trace_h, trace_f: aggregates over batches.
        gap: ``Tr(H_X) - Tr(F_X)`` (the residual term of the Gauss-Newton split).
        fisher_over_hessian: ``Tr(F_X) / Tr(H_X)``.
        embedding_rms: mean over batches of ``rms(X)``.
    """

    config: dict[str, Any]
    hidden_size: int
    median_length: float
    batches: list[BatchMeasurement]
    alphas: list[AlphaSummary]
    loss: Aggregate
    trace_h: Aggregate
    trace_f: Aggregate
    gap: Aggregate
    fisher_over_hessian: Estimate
    embedding_rms: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "hidden_size": self.hidden_size,
            "median_length": self.median_length,
            "embedding_rms": self.embedding_rms,
            "loss": self.loss.to_dict(),
            "trace_hessian": self.trace_h.to_dict(),
            "trace_fisher": self.trace_f.to_dict(),
            "gauss_newton_gap": self.gap.to_dict(),
            "fisher_over_hessian": self.fisher_over_hessian.to_dict(),
            "alphas": [summary.to_dict() for summary in self.alphas],
            "batches": [batch.to_dict() for batch in self.batches],
            **self.extra,
        }


def summarize(
    measurements: list[BatchMeasurement],
    config: dict[str, Any],
    hidden: int,
    median_length: float,
) -> AnalysisResult:
    """Pool the batches: the curvature traces and their gap, and per alpha (``config["alphas"]``)
    measured against predicted with ``lambda_equiv = alpha^2 / (6 L d)`` at ``L`` the data's
    median length, rounded."""
    trace_h = combine_batches([m.trace_h for m in measurements])
    trace_f = combine_batches([m.trace_f for m in measurements])
    gap = combine_batches(
        [
            Estimate(
                m.trace_h.mean - m.trace_f.mean, math.hypot(m.trace_h.stderr, m.trace_f.stderr)
            )
            for m in measurements
        ]
    )
    rms = statistics.fmean(m.embedding_rms for m in measurements)
    typical = max(1, round(median_length))
    summaries = []
    for alpha in config["alphas"]:
        measured = combine_batches([m.measured[alpha] for m in measurements])
        predicted = combine_batches([m.predicted(alpha) for m in measurements])
        coef = neftune_equivalent_coef(alpha, typical, hidden)
        scale = neftune_scale(alpha, typical, hidden)
        summaries.append(
            AlphaSummary(
                alpha=alpha,
                scale_at_median=scale,
                scale_over_rms=scale / rms if rms > 0 else math.nan,
                lambda_equiv=coef,
                measured=measured,
                predicted=predicted,
                ratio=_ratio(measured, predicted),
                predicted_median_length=coef * trace_h.mean,
                fisher_penalty_at_lambda_equiv=coef * trace_f.mean,
                batches_agreeing=sum(
                    _agree(m.measured[alpha], m.predicted(alpha)) for m in measurements
                ),
            )
        )
    return AnalysisResult(
        config=config,
        hidden_size=hidden,
        median_length=median_length,
        batches=measurements,
        alphas=summaries,
        loss=combine_batches([Estimate(m.loss, 0.0) for m in measurements]),
        trace_h=trace_h,
        trace_f=trace_f,
        gap=gap,
        fisher_over_hessian=_ratio(trace_f, trace_h),
        embedding_rms=rms,
        # the L of lambda_equiv = alpha^2 / (6 L d): the data's median length, rounded
        extra={"typical_length": typical},
    )
