"""Penalty coefficient warm-up and the NEFTune <-> curvature coefficient correspondence."""

from __future__ import annotations

import itertools
import math

import pytest

from fishertune.schedules import (
    alpha_for_noise_ratio,
    neftune_equivalent_coef,
    neftune_scale,
    warmup_coefficient,
)


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
