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
* :func:`fieller_ratio`: the ratio ``mean(x) / mean(y)`` of two paired means (e.g. a
  regularizer's effect against the baseline over NEFTune's, seed by seed) with Fieller's interval:
  every ``R`` for which the paired t-test of ``x - R y`` does not reject ``mu_x - R mu_y = 0``.
* :func:`ratio_equivalence`: TOST of ``lower < mu_x / mu_y < upper`` by two one-sided paired
  t-tests on ``x - lower y`` and ``x - upper y`` (their direction set by the sign of ``mu_y``).
* :func:`scaled_prediction`: a law's prediction between levels, tested seed by seed: the measured
  effect at one level minus ``factor`` times the effect at another (e.g. NEFTune's ``a^2`` law:
  ``factor = (a_i / a_max)^2``), with its t interval; a slope through 0 cannot tell a curve that
  is flat at small ``a`` from ``a^2``, this difference can.
* :func:`holm`: Holm's step-down adjusted p-values over a family of tests (family-wise error
  ``<= alpha`` under any dependence).

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
    "Ratio",
    "RatioEquivalence",
    "Slope",
    "equivalence_test",
    "fieller_ratio",
    "holm",
    "paired_difference",
    "ratio_equivalence",
    "scaled_prediction",
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


# ------------------------------------------------------------------------ ratios of paired means


@dataclass(frozen=True)
class Ratio:
    """``mean(x) / mean(y)`` over paired seeds with Fieller's ``confidence`` interval.

    ``kind`` says what shape the confidence set has: ``"bounded"`` (``[low, high]``; exactly
    when the paired t-test of ``y`` rejects ``mu_y = 0`` at the same level), ``"exclusive"``
    (everything outside ``(low, high)``: ``mu_y`` not distinguished from 0 but ``mu_x`` is) or
    ``"unbounded"`` (every real number; ``low = -inf``, ``high = inf``).
    """

    ratio: float
    low: float
    high: float
    kind: str
    n: int
    confidence: float

    def contains(self, value: float) -> bool:
        if self.kind == "bounded":
            return self.low <= value <= self.high
        if self.kind == "exclusive":
            return value <= self.low or value >= self.high
        return True

    def describe(self, digits: int = 2) -> str:
        if self.kind == "bounded":
            return f"{self.ratio:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        if self.kind == "exclusive":
            return (f"{self.ratio:.{digits}f} (outside ({self.low:.{digits}f}, "
                    f"{self.high:.{digits}f}): unbounded)")  # fmt: skip
        return f"{self.ratio:.{digits}f} (unbounded)"


@dataclass(frozen=True)
class RatioEquivalence:
    """TOST of ``lower < mu_x / mu_y < upper``: ``p_value`` the larger one-sided p-value;
    ``interval`` Fieller's ``1 - 2 alpha`` interval (inside ``[lower, upper]`` exactly when the
    test claims equivalence, for a bounded interval)."""

    lower: float
    upper: float
    alpha: float
    p_value: float
    interval: Ratio

    @property
    def equivalent(self) -> bool:
        return self.p_value < self.alpha


def _pairs(x: Sequence[float], y: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(x) != len(y):
        raise FishertuneError(f"a ratio of paired means needs pairs: {len(x)} and {len(y)} values")
    xs, ys = _differences(x, None), _differences(y, None)
    return xs, ys


def fieller_ratio(x: Sequence[float], y: Sequence[float], *, confidence: float = 0.95) -> Ratio:
    """Fieller's interval for ``mu_x / mu_y`` from paired observations ``(x_s, y_s)``.

    The set of ``R`` with ``(xbar - R ybar)^2 <= t^2 (s_xx - 2 R s_xy + R^2 s_yy) / n``
    (``t = t_{(1+confidence)/2, n-1}``, sample (co)variances with ``ddof=1``): the ``R`` that the
    paired t-test of ``d_s = x_s - R y_s`` does not reject. Exact under normal per-seed
    differences, whatever their correlation; a delta-method or bootstrap interval is not (with 10
    seeds the bootstrap's percentiles under-cover, and both break down as ``ybar`` nears 0, where
    Fieller's set honestly becomes unbounded).
    """
    xs, ys = _pairs(x, y)
    n = len(xs)
    xbar, ybar = math.fsum(xs) / n, math.fsum(ys) / n
    sxx = math.fsum((a - xbar) ** 2 for a in xs) / (n - 1)
    syy = math.fsum((b - ybar) ** 2 for b in ys) / (n - 1)
    sxy = math.fsum((a - xbar) * (b - ybar) for a, b in zip(xs, ys, strict=True)) / (n - 1)
    t2 = float(stats.t.ppf((1 + confidence) / 2, n - 1)) ** 2
    # a R^2 - 2 b R + c <= 0
    a = ybar * ybar - t2 * syy / n
    b = xbar * ybar - t2 * sxy / n
    c = xbar * xbar - t2 * sxx / n
    ratio = xbar / ybar if ybar else math.copysign(math.inf, xbar) if xbar else math.nan
    disc = b * b - a * c
    if a > 0:  # ybar significantly nonzero: a bounded interval around the ratio
        root = math.sqrt(max(disc, 0.0))
        return Ratio(ratio, (b - root) / a, (b + root) / a, "bounded", n, confidence)
    if a < 0 and disc > 0:
        root = math.sqrt(disc)
        low, high = sorted(((b + root) / a, (b - root) / a))
        return Ratio(ratio, low, high, "exclusive", n, confidence)
    return Ratio(ratio, -math.inf, math.inf, "unbounded", n, confidence)


def ratio_equivalence(
    x: Sequence[float],
    y: Sequence[float],
    *,
    lower: float,
    upper: float,
    alpha: float = 0.05,
) -> RatioEquivalence:
    """Two one-sided paired t-tests of ``lower < mu_x / mu_y < upper`` at level ``alpha``.

    For ``mu_y > 0`` the ratio lies above ``lower`` iff ``mu_x - lower mu_y > 0`` and below
    ``upper`` iff ``mu_x - upper mu_y < 0``; for ``mu_y < 0`` both inequalities turn round. Each is
    a one-sided t-test on the per-seed combination ``x_s - r y_s`` (exact, as in Fieller's
    interval). The sign of ``mu_y`` is taken from ``ybar``: use this only where ``y``'s effect has
    been detected (its interval excludes 0), so that the sign is established.
    """
    if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
        raise FishertuneError(f"a ratio margin needs lower < upper, got [{lower}, {upper}]")
    xs, ys = _pairs(x, y)
    positive = math.fsum(ys) >= 0

    def one_sided(r: float, alternative: str) -> float:
        diffs = [a - r * b for a, b in zip(xs, ys, strict=True)]
        if _sd(diffs) == 0.0:  # no spread: the decision is the point itself
            mean = math.fsum(diffs) / len(diffs)
            return 0.0 if (mean > 0) == (alternative == "greater") and mean != 0 else 1.0
        return float(stats.ttest_1samp(diffs, 0.0, alternative=alternative).pvalue)

    low_side, high_side = ("greater", "less") if positive else ("less", "greater")
    p_value = max(one_sided(lower, low_side), one_sided(upper, high_side))
    interval = fieller_ratio(xs, ys, confidence=1 - 2 * alpha)
    return RatioEquivalence(lower, upper, alpha, p_value, interval)


def scaled_prediction(
    measured: Sequence[float],
    source: Sequence[float],
    factor: float,
    *,
    confidence: float = 0.95,
) -> PairedDifference:
    """``measured_s - factor * source_s`` per seed: its mean, t interval and p-value of "the
    prediction ``factor * mu_source`` is right". The source's own noise enters the interval
    (scaled by ``factor``), as does any correlation between the two through shared seeds."""
    if len(measured) != len(source):
        raise FishertuneError(
            f"a prediction needs one source value per seed: {len(measured)} and {len(source)}"
        )
    return paired_difference(
        [float(m) - factor * float(s) for m, s in zip(measured, source, strict=True)],
        confidence=confidence,
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's adjusted p-values, in the order given: with ``p_(1) <= ... <= p_(m)``,
    ``adjusted_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``. Rejecting where the adjusted value
    is below ``alpha`` keeps the family-wise error at most ``alpha`` (Holm 1979)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted
