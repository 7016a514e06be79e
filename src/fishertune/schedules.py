"""Coefficient schedules and the NEFTune <-> curvature correspondence.

Pure arithmetic: no imports beyond the standard library, so it can be used anywhere.
"""

from __future__ import annotations

import math

__all__ = [
    "alpha_for_noise_ratio",
    "every_k_coefficient",
    "mean_warmup_fraction",
    "neftune_equivalent_coef",
    "neftune_scale",
    "warmup_coefficient",
]


def warmup_coefficient(step: int, coef: float, warmup_steps: int) -> float:
    """Linearly warmed-up penalty coefficient.

    ``lambda(step) = coef * min(1, step / warmup_steps)``; ``warmup_steps == 0`` means no warm-up
    (``lambda = coef`` from step 0). ``step`` counts optimizer steps already taken, so the first
    update of a warmed-up run uses ``lambda = 0``.
    """
    if coef < 0:
        raise ValueError(f"penalty coefficient must be >= 0, got {coef}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps == 0:
        return float(coef)
    return float(coef) * min(1.0, step / warmup_steps)


def mean_warmup_fraction(steps: int, warmup_steps: int) -> float:
    """Mean of ``lambda(step) / coef`` over the steps ``0 .. steps - 1`` of a run.

    Closed form of the mean of ``min(1, s / W)``: ``(steps - 1) / (2 W)`` while ``steps <= W``,
    ``(steps - (W + 1) / 2) / steps`` after. 1 without warm-up or for an empty run.
    """
    if steps < 0 or warmup_steps < 0:
        raise ValueError(f"steps and warmup_steps must be >= 0, got {steps}, {warmup_steps}")
    if warmup_steps == 0 or steps == 0:
        return 1.0
    if steps <= warmup_steps:
        return (steps - 1) / (2 * warmup_steps)
    return (steps - (warmup_steps + 1) / 2) / steps


def every_k_coefficient(step: int, coef: float, warmup_steps: int, every: int) -> float:
    """Coefficient of a penalty applied only on every ``k``-th optimizer step.

    On a penalized step ``s`` (``s % k == 0``) it is ``sum_{i=s}^{s+k-1} lambda(i)``: its own
    coefficient plus those of the ``k - 1`` steps after it, which skip the penalty (0 there). The
    coefficients summed over any block of ``k`` steps are then exactly those of penalizing every
    step, warm-up included (``k * lambda(s)`` would under-weight the warm-up: 0.995 of the total
    for ``k = 4`` over a 600-step warm-up). The update equals the every-step one in expectation
    only as far as the penalty's gradient changes little over ``k`` steps.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if step % every:
        return 0.0
    return sum(warmup_coefficient(i, coef, warmup_steps) for i in range(step, step + every))


def neftune_scale(alpha: float, seq_len: int, hidden_size: int) -> float:
    """Half-width of NEFTune's uniform noise: ``a = alpha / sqrt(L * d)``."""
    if seq_len <= 0 or hidden_size <= 0:
        raise ValueError(f"seq_len and hidden_size must be positive, got {seq_len}, {hidden_size}")
    return alpha / math.sqrt(seq_len * hidden_size)


def neftune_equivalent_coef(alpha: float, seq_len: int, hidden_size: int) -> float:
    """Explicit curvature coefficient that matches NEFTune to second order.

    ``E_eps[loss(X + eps)] ~= loss(X) + (a^2 / 6) Tr(H_X)`` with ``a = alpha / sqrt(L d)`` gives
    ``lambda_equiv = a^2 / 6 = alpha^2 / (6 L d)``.
    """
    return neftune_scale(alpha, seq_len, hidden_size) ** 2 / 6.0


def alpha_for_noise_ratio(ratio: float, rms: float, seq_len: int, hidden_size: int) -> float:
    """NEFTune alpha whose noise half-width is ``ratio`` times the embeddings' rms.

    ``a = alpha / sqrt(L d) = ratio * rms``, so ``alpha = ratio * rms * sqrt(L d)``. The Taylor
    relation ``E[loss(X + eps)] - loss(X) ~= (a^2 / 6) Tr(H_X)`` holds when ``a / rms`` is small
    (below about 0.1 in the project's measurements); at ``a / rms`` near 1 the noise is as large
    as the signal.
    """
    if ratio < 0 or rms < 0:
        raise ValueError(f"ratio and rms must be >= 0, got {ratio}, {rms}")
    if seq_len <= 0 or hidden_size <= 0:
        raise ValueError(f"seq_len and hidden_size must be positive, got {seq_len}, {hidden_size}")
    return ratio * rms * math.sqrt(seq_len * hidden_size)
