"""The Taylor relation behind NEFTune as a curvature penalty, on a micro model in float64.

``E_eps[loss(X + eps)] - loss(X) -> (a^2 / 6) Tr(H_X)`` as ``a -> 0`` for ``eps ~ U(-a, a)`` per
entry, ``H_X`` the dense Hessian of the (mean) cross-entropy w.r.t. the embeddings. Monte Carlo
with antithetic pairs ``(eps, -eps)`` (the odd Taylor terms cancel pair by pair) and the same unit
draws ``u`` at every ``a`` (``eps = a u``), so the ratios at different ``a`` share their sampling
noise and their trend shows the O(a^2) bias. ``a`` is set relative to the embeddings' per-entry
rms: the ratio only gets near 1 once ``a`` is far below it.

Run with ``pytest -s`` to see the ratios.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from micro import CausalMix, cross_entropy, exact_fisher_trace, label_mask

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default

INPUT_IDS = torch.tensor([[0, 3, 1, 4, 2], [5, 2, 2, 0, 1]])
ATTENTION = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
LABELS = torch.tensor([[-100, -100, 1, 4, 2], [-100, 2, 2, 0, -100]])

RELATIVE_SCALES = (0.5, 0.25, 0.1, 0.02)  # a / rms(X)
PAIRS = 200_000
CHUNK = 50_000


def test_noise_effect_approaches_hessian_trace_term():
    model = CausalMix(seed=3)
    X = model.embeddings(INPUT_IDS).detach()  # (B, L, d)

    def loss(inp: torch.Tensor) -> torch.Tensor:  # (..., B, L, d) -> (...)
        return cross_entropy(model.logits(inp, ATTENTION), LABELS)

    with torch.no_grad():
        H = torch.func.hessian(loss)(X).reshape(X.numel(), X.numel())
        trace_h = H.trace().item()
        trace_f = exact_fisher_trace(
            lambda inp: model.logits(inp, ATTENTION), X, label_mask(LABELS)
        )
        rms = X.pow(2).mean().sqrt().item()
        base = loss(X)
        unit = (
            2
            * torch.rand(PAIRS, *X.shape, dtype=X.dtype, generator=torch.Generator().manual_seed(0))
            - 1
        )
        quad = 0.5 * torch.einsum("ni,ij,nj->n", unit.flatten(1), H, unit.flatten(1))  # (n,)
    # the relation is only informative if Tr(H_X) is clearly away from 0
    assert trace_h > 0.5 * H.norm().item()
    print(
        f"\nTr(H_X) = {trace_h:.5f}, ||H_X||_F = {H.norm().item():.5f}, "
        f"Tr(F_X) = {trace_f:.5f}, rms(X) = {rms:.4f}, {PAIRS} antithetic pairs"
    )

    results = []
    for rel in RELATIVE_SCALES:
        a = rel * rms
        with torch.no_grad():
            delta = torch.cat(
                [0.5 * (loss(X + a * u) + loss(X - a * u)) - base for u in unit.split(CHUNK)]
            )  # (n,)
        predicted = a * a / 6 * trace_h
        ratio = delta.mean().item() / predicted
        se = delta.std().item() / math.sqrt(PAIRS) / abs(predicted)
        # same draws, exact quadratic term: isolates the O(a^4) remainder from sampling noise
        pathwise = delta.mean().item() / (a * a * quad.mean().item())
        fisher_ratio = delta.mean().item() / (a * a / 6 * trace_f)
        results.append((rel, ratio, se, pathwise, fisher_ratio))
        print(
            f"a/rms = {rel:<5} a = {a:.4f}: ratio = {ratio:.5f} +- {se:.5f} (SE), "
            f"vs quadratic term on the same draws {pathwise:.6f}, "
            f"vs (a^2/6) Tr(F_X) {fisher_ratio:.4f}"
        )

    rel, ratio, se, pathwise, fisher_ratio = results[-1]
    assert abs(ratio - 1) < 4 * se + 2e-3
    assert abs(pathwise - 1) < 1e-3
    # Tr(F_X) is not Tr(H_X): the Fisher prediction is off by many standard errors
    se_fisher = se * abs(trace_h / trace_f)  # same numerator, other denominator
    assert abs(fisher_ratio - 1) > 10 * se_fisher
    # the bias shrinks as a decreases (it is O(a^2) relative) until it sinks below the sampling
    # noise, which the shared draws make about the same at every a
    gaps = [abs(r[1] - 1) for r in results]
    assert gaps[0] > 10 * results[0][2]
    assert gaps[0] > gaps[1] > gaps[2]
    path_gaps = [abs(r[3] - 1) for r in results]
    assert all(b < a for a, b in itertools.pairwise(path_gaps))
