"""Paired comparisons over seeds: confidence intervals, equivalence tests, a scaling slope, power.

A study compares methods run with the same seeds (same base model, data order and noise draws
where they apply), so each comparison is made on the per-seed differences
``d_s = metric(method, s) - metric(reference, s)``: the seed-to-seed variation that both runs
share cancels, and what is left is tested with Student's t on ``n - 1`` degrees of freedom.

* :func:`paired_difference`: mean difference, its ``1 - alpha`` confidence interval
  ``mean ± t_{1-alpha/2, n-1} sd / sqrt(n)`` and the two-sided p-value of "no difference".
* :func:`equivalence_test`: two one-sided tests (TOST, Schuirmann 1987) against a margin ``delta``
  fixed before the run: equivalence is claimed only when both ``H0: mu <= -delta`` and
  ``H0: mu >= delta`` are rejected at level ``alpha``, i.e. when the ``1 - 2 alpha`` interval lies
  inside ``(-delta, delta)``. A failure to find a difference is never read as equivalence.
* :func:`scaling_slope`: least-squares slope of ``y`` on ``x`` (e.g. NEFTune's paired change of
  validation loss on ``a^2``) with its t interval, so "the effect grows like a^2" is a claim with
  an interval.
* :func:`seeds_for_power`: the smallest number of seeds for which a paired t-test at level
  ``alpha`` detects a true difference ``effect`` with probability ``power``, from the noncentral t
  distribution.

scipy's distributions and tests do the arithmetic; this module only fixes which test answers
which question, and keeps the numbers together for the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

from fishertune.errors import FishertuneError

__all__ = [
    "Equivalence",
    "PairedDifference",
    "Slope",
    "equivalence_test",
    "paired_difference",
    "scaling_slope",
    "seeds_for_power",
]


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the per-seed differences with its two-sided ``confidence`` interval.

    ``p_value`` is the paired t-test of "mean difference is 0"; ``sd`` the differences' sample
    standard deviation (``ddof=1``); ``n`` the number of pairs.
    """

    mean: float
    sd: float
    n: int
    low: float
    high: float
    p_value: float
    confidence: float

    @property
    def detected(self) -> bool:
        """The interval excludes 0 (a difference at level ``1 - confidence``)."""
        return self.low > 0 or self.high < 0

    def describe(self, digits: int = 4) -> str:
        ci = f"[{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return (f"{self.mean:+.{digits}f} ({self.confidence:.0%} CI {ci}, "
                f"p = {self.p_value:.2g}, n = {self.n})")  # fmt: skip


@dataclass(frozen=True)
class Equivalence:
    """TOST of ``|mean difference| < margin``: ``p_value`` is the larger one-sided p-value;
    ``low, high`` the ``1 - 2 alpha`` interval whose inclusion in ``(-margin, margin)`` is the
    same decision."""

    margin: float
    alpha: float
    p_value: float
    low: float
    high: float

    @property
    def equivalent(self) -> bool:
        return self.p_value < self.alpha


@dataclass(frozen=True)
class Slope:
    """Least-squares line ``y = intercept + slope * x`` with the slope's two-sided interval."""

    slope: float
    intercept: float
    low: float
    high: float
    p_value: float
    n: int


def _differences(values: Sequence[float], reference: Sequence[float] | None) -> list[float]:
    if reference is None:
        diffs = [float(v) for v in values]
    else:
        if len(values) != len(reference):
            raise FishertuneError(
                f"paired comparison needs one reference value per seed: {len(values)} values, "
                f"{len(reference)} references"
            )
        diffs = [float(v) - float(r) for v, r in zip(values, reference, strict=True)]
    if len(diffs) < 2:
        raise FishertuneError(f"a paired comparison needs at least 2 seeds, got {len(diffs)}")
    if not all(math.isfinite(d) for d in diffs):
        raise FishertuneError(f"paired comparison over non-finite values: {diffs}")
    return diffs


def _sd(diffs: Sequence[float]) -> float:
    mean = math.fsum(diffs) / len(diffs)
    return math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))


def paired_difference(
    values: Sequence[float],
    reference: Sequence[float] | None = None,
    *,
    confidence: float = 0.95,
) -> PairedDifference:
    """``mean(d) ± t_{(1+confidence)/2, n-1} sd(d) / sqrt(n)`` over ``d = values - reference``
    (or ``d = values`` when no reference is given), and the paired t-test's p-value."""
    diffs = _differences(values, reference)
    n, mean, sd = len(diffs), math.fsum(diffs) / len(diffs), _sd(diffs)
    if sd == 0.0:  # every seed moved by the same amount: the interval is that point
        return PairedDifference(mean, 0.0, n, mean, mean, 0.0 if mean else 1.0, confidence)
    result = stats.ttest_1samp(diffs, 0.0)
    ci = result.confidence_interval(confidence_level=confidence)
    return PairedDifference(mean, sd, n, float(ci.low), float(ci.high), float(result.pvalue),
                            confidence)  # fmt: skip


def equivalence_test(
    values: Sequence[float],
    reference: Sequence[float] | None = None,
    *,
    margin: float,
    alpha: float = 0.05,
) -> Equivalence:
    """Two one-sided paired t-tests of ``-margin < mean(d) < margin`` at level ``alpha``.

    ``p = max(P(T >= t_low), P(T <= t_high))`` with ``t_low = (mean + margin) / se`` and
    ``t_high = (mean - margin) / se``, ``se = sd / sqrt(n)``, ``T ~ t_{n-1}``.
    """
    if not (margin > 0 and math.isfinite(margin)):
        raise FishertuneError(f"equivalence margin must be a positive number, got {margin!r}")
    diffs = _differences(values, reference)
    lower = stats.ttest_1samp(diffs, -margin, alternative="greater")
    upper = stats.ttest_1samp(diffs, margin, alternative="less")
    interval = stats.ttest_1samp(diffs, 0.0).confidence_interval(confidence_level=1 - 2 * alpha)
    p_value = max(float(lower.pvalue), float(upper.pvalue))
    if math.isnan(p_value):  # zero spread: the decision is the point itself
        mean = math.fsum(diffs) / len(diffs)
        p_value = 0.0 if abs(mean) < margin else 1.0
        return Equivalence(margin, alpha, p_value, mean, mean)
    return Equivalence(margin, alpha, p_value, float(interval.low), float(interval.high))


def scaling_slope(x: Sequence[float], y: Sequence[float], *, confidence: float = 0.95) -> Slope:
    """Ordinary least squares of ``y`` on ``x`` (one point per run) with the slope's t interval
    on ``n - 2`` degrees of freedom (scipy's ``linregress``)."""
    if len(x) != len(y) or len(x) < 3:
        raise FishertuneError(f"a slope needs at least 3 (x, y) pairs, got {len(x)} and {len(y)}")
    if len(set(x)) < 2:
        raise FishertuneError("a slope needs at least two different x values")
    fit = stats.linregress(x, y)
    half = stats.t.ppf((1 + confidence) / 2, len(x) - 2) * fit.stderr
    return Slope(float(fit.slope), float(fit.intercept), float(fit.slope - half),
                 float(fit.slope + half), float(fit.pvalue), len(x))  # fmt: skip


def seeds_for_power(
    effect: float, sd: float, *, alpha: float = 0.05, power: float = 0.8, max_seeds: int = 1000
) -> int:
    """Smallest ``n`` with ``P(|T| > t_{1-alpha/2, n-1}) >= power`` for ``T`` noncentral t with
    ``n - 1`` degrees of freedom and noncentrality ``effect / (sd / sqrt(n))``."""
    if not (effect > 0 and sd > 0):
        raise FishertuneError(f"power needs a positive effect and sd, got {effect!r}, {sd!r}")
    for n in range(2, max_seeds + 1):
        critical = stats.t.ppf(1 - alpha / 2, n - 1)
        noncentrality = effect * math.sqrt(n) / sd
        achieved = stats.nct.sf(critical, n - 1, noncentrality) + stats.nct.cdf(
            -critical, n - 1, noncentrality
        )
        if achieved >= power:
            return n
    raise FishertuneError(f"more than {max_seeds} seeds needed for effect {effect} at sd {sd}")
