"""Penalty coefficient warm-up and the NEFTune <-> curvature coefficient correspondence."""

from __future__ import annotations

import itertools
import math

import pytest

from fishertune.schedules import (
    alpha_for_noise_ratio,
    every_k_coefficient,
    mean_warmup_fraction,
    neftune_equivalent_coef,
    neftune_scale,
    warmup_coefficient,
)


@pytest.mark.parametrize("steps, warmup", [(30, 600), (600, 600), (601, 600), (1000, 7), (5, 0)])
def test_mean_warmup_fraction_is_the_mean_of_the_ramp(steps, warmup):
    ramp = [warmup_coefficient(s, 1.0, warmup) for s in range(steps)]
    assert mean_warmup_fraction(steps, warmup) == pytest.approx(sum(ramp) / steps, rel=1e-12)


def test_warmup_is_a_linear_ramp():
    coef, warmup = 2e-6, 600
    assert warmup_coefficient(0, coef, warmup) == 0.0
    assert warmup_coefficient(300, coef, warmup) == pytest.approx(coef / 2, rel=1e-15)
    assert warmup_coefficient(150, coef, warmup) == pytest.approx(coef / 4, rel=1e-15)
    assert warmup_coefficient(600, coef, warmup) == pytest.approx(coef, rel=1e-15)
    assert warmup_coefficient(601, coef, warmup) == pytest.approx(coef, rel=1e-15)
    assert warmup_coefficient(10**6, coef, warmup) == pytest.approx(coef, rel=1e-15)
    values = [warmup_coefficient(s, coef, warmup) for s in range(0, 800, 7)]
    assert all(b >= a for a, b in itertools.pairwise(values))  # never decreases
    assert max(values) == pytest.approx(coef, rel=1e-15)


def test_no_warmup_is_constant():
    assert [warmup_coefficient(s, 1e-6, 0) for s in (0, 1, 5, 10**5)] == [1e-6] * 4
    assert warmup_coefficient(0, 0.0, 100) == 0.0


@pytest.mark.parametrize(
    ("step", "coef", "warmup", "match"),
    [(-1, 1e-6, 10, "step"), (0, -1e-6, 10, "coefficient"), (0, 1e-6, -1, "warmup_steps")],
)
def test_negative_inputs_raise(step, coef, warmup, match):
    with pytest.raises(ValueError, match=match):
        warmup_coefficient(step, coef, warmup)


@pytest.mark.parametrize(
    ("alpha", "length", "hidden"), [(5.0, 512, 4096), (15.0, 64, 256), (1.0, 1, 1)]
)
def test_neftune_equivalent_coef(alpha, length, hidden):
    expected = alpha**2 / (6 * length * hidden)
    assert neftune_equivalent_coef(alpha, length, hidden) == pytest.approx(expected, rel=1e-14)
    assert neftune_scale(alpha, length, hidden) == pytest.approx(
        alpha / math.sqrt(length * hidden), rel=1e-14
    )
    assert neftune_equivalent_coef(alpha, length, hidden) == pytest.approx(
        neftune_scale(alpha, length, hidden) ** 2 / 6, rel=1e-14
    )


def test_neftune_scale_rejects_empty_shapes():
    with pytest.raises(ValueError, match="positive"):
        neftune_scale(5.0, 0, 16)
    with pytest.raises(ValueError, match="positive"):
        neftune_equivalent_coef(5.0, 16, 0)


def test_alpha_for_noise_ratio_inverts_the_noise_scale():
    # the tiny preset's numbers: rms 0.0506, L 25, d 128 -> a/rms = 2 at alpha 5.728
    alpha = alpha_for_noise_ratio(2.0, 0.0506, 25, 128)
    assert alpha == pytest.approx(2.0 * 0.0506 * math.sqrt(3200), rel=1e-12)
    assert neftune_scale(alpha, 25, 128) / 0.0506 == pytest.approx(2.0, rel=1e-12)
    assert neftune_equivalent_coef(alpha, 25, 128) == pytest.approx((2 * 0.0506) ** 2 / 6)
    with pytest.raises(ValueError):
        alpha_for_noise_ratio(-1.0, 0.05, 25, 128)


@pytest.mark.parametrize("every", [1, 2, 4, 7])
def test_penalty_every_k_sums_the_skipped_coefficients(every):
    """Over any block of k steps the applied coefficients add up to those of penalizing every
    step, warm-up included; k * lambda(s) on every k-th step would give 0.995 of it for k = 4
    over a 600-step warm-up."""
    coef, warmup, steps = 2e-6, 600, 1400  # a whole number of blocks for k = 1, 2, 4, 7
    applied = [every_k_coefficient(s, coef, warmup, every) for s in range(steps)]
    per_step = [warmup_coefficient(s, coef, warmup) for s in range(steps)]
    assert all(a == 0 for s, a in enumerate(applied) if s % every)
    for start in range(0, steps, every):
        block = slice(start, start + every)
        assert math.fsum(applied[block]) == pytest.approx(math.fsum(per_step[block]), rel=1e-12)
    if every == 4:
        naive = sum(every * per_step[s] for s in range(0, warmup, every))
        assert naive / math.fsum(per_step[:warmup]) == pytest.approx(0.995, abs=1e-3)
