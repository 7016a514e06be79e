"""The Hessian-trace penalty and NEFTune matching, against dense Hessians on float64 micro models.

``H`` is ``torch.func.hessian`` of the summed CE in ``X`` (B L d x B L d), written here from the
definition; the library's Hutchinson forms (exact HVP, second differences) and its per-position
NEFTune weights are checked against it, and the weights against the noise's own measured rise.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fishertune.hessian_grad import exact_hessian_trace, hessian_fd_loss, rademacher_probes
from fishertune.noise import NEFTuneNoise
from fishertune.penalty_grad import Passes
from fishertune.training.forward import matched_position_weights
from micro import CausalMix, label_mask

INPUT_IDS = torch.tensor([[0, 3, 1, 4, 2], [5, 2, 2, 0, 1]])
ATTENTION = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
LABELS = torch.tensor([[-100, -100, 1, 4, 2], [-100, 2, 2, -100, -100]])


def _model() -> CausalMix:
    return CausalMix(vocab=6, dim=3, hidden=4, seed=3)


def _ce_sum(model, X):
    mask = label_mask(LABELS)
    logits = model.logits(X, ATTENTION)
    targets = LABELS[:, 1:][mask[:, :-1]]
    return -torch.log_softmax(logits[mask], -1).gather(1, targets[:, None]).sum()


def _dense_hessian(model, X):
    """(B L d, B L d) Hessian of the summed CE, differentiable in the parameters."""
    hessian = torch.func.hessian(lambda inp: _ce_sum(model, inp))(X)
    size = X.numel()
    return hessian.reshape(size, size)


def _grad(model, value):
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, list(model.parameters()))])


def _probes(count: int, seed: int = 0):
    X = _model().embeddings(INPUT_IDS)
    weights = torch.rand(X.shape[:2], generator=torch.Generator().manual_seed(9), dtype=X.dtype)
    return rademacher_probes(X, count, torch.Generator().manual_seed(seed), weights), weights


def test_exact_form_is_u_h_u_in_value_and_gradient():
    probes, _ = _probes(3)
    model = _model()
    X = model.embeddings(INPUT_IDS)
    value = exact_hessian_trace(_ce_sum(model, X), X, probes)
    flat = probes.flatten(1)  # (K, BLd)
    dense = torch.einsum("ki,ij,kj->", flat, _dense_hessian(model, X), flat) / 3
    torch.testing.assert_close(value, dense, rtol=1e-12, atol=0)
    grad = _grad(model, value)
    model_ref = _model()
    X_ref = model_ref.embeddings(INPUT_IDS)
    reference = _grad(
        model_ref, torch.einsum("ki,ij,kj->", flat, _dense_hessian(model_ref, X_ref), flat) / 3
    )
    torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12 * float(reference.norm()))


def test_probes_average_to_the_weighted_trace():
    """Over every sign pattern of a one-row batch (2^(L d) probes) the mean of ``u^T H u`` is
    ``sum_i w_i H_ii`` exactly."""
    model = _model()
    X = model.embeddings(INPUT_IDS[1:, :3]).detach()
    mask = torch.tensor([[True, True, False]])
    labels = torch.tensor([[-100, 2, 2]])

    def ce(inp):
        logits = model.logits(inp, ATTENTION[1:, :3])
        targets = labels[:, 1:][mask[:, :-1]]
        return -torch.log_softmax(logits[mask], -1).gather(1, targets[:, None]).sum()

    weights = torch.tensor([[0.3, 1.1, 2.0]], dtype=X.dtype)
    size = X.numel()
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=size)), dtype=X.dtype)
    probes = signs.view(-1, *X.shape) * weights.sqrt()[None, :, :, None]
    X.requires_grad_(True)
    value = exact_hessian_trace(ce(X), X, probes)
    dense = torch.func.hessian(ce)(X.detach()).reshape(size, size)
    trace = (dense.diagonal() * weights[..., None].expand(X.shape).flatten()).sum()
    torch.testing.assert_close(value, trace, rtol=1e-12, atol=1e-14)


def _fd(model, probes, step, split):
    def forward(shift):
        X = model.embeddings(INPUT_IDS)
        if shift is not None:
            X = X + shift
        return model.logits(X, ATTENTION), X

    passes = Passes(forward, (lambda part: part.backward()) if split else None)
    return hessian_fd_loss(
        passes,
        LABELS,
        lambda X: probes,
        weight=1.0,
        normalizer=torch.tensor(1.0, dtype=torch.float64),
        relative_step=step,
    )


@pytest.mark.parametrize("split", [False, True])
def test_second_difference_converges_at_order_two(split):
    """Value and parameter gradient of the fd form are O(h^2) off the exact HVP form."""
    probes, _ = _probes(2)
    model = _model()
    X = model.embeddings(INPUT_IDS)
    ce = _ce_sum(model, X)
    exact_value = exact_hessian_trace(ce, X, probes)
    exact_grad = _grad(model, ce + exact_value)
    value_errors, grad_errors = [], []
    steps = [1e-1, 5e-2, 2.5e-2, 1.25e-2]
    for h in steps:
        model = _model()
        result = _fd(model, probes, h, split)
        result.loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        value_errors.append(abs(float(result.squared - exact_value.detach())))
        grad_errors.append(float((grad - exact_grad).norm() / exact_grad.norm()))
        torch.testing.assert_close(result.loss.detach(), result.value, rtol=0, atol=0)
    for errors in (value_errors, grad_errors):
        slope = math.log(errors[0] / errors[-1]) / math.log(steps[0] / steps[-1])
        assert abs(slope - 2.0) < 0.15, (errors, slope)
    assert grad_errors[-1] < 1e-3 and value_errors[-1] < 1e-3 * abs(float(exact_value))


@pytest.mark.parametrize("length_mode", ["per_sequence", "padded", "packed"])
def test_matched_weights_equal_the_noise_rise_row_by_row(length_mode):
    """``sum_l w_bl H_(bl, bl)`` with the library's weights equals the rise of row b's CE under
    the noise itself (antithetic Monte Carlo, a / rms = 0.01, float64), for rows of lengths 5 and
    3 (and a row packed from two segments); one lambda from the mean length does not."""
    model = _model()
    X = model.embeddings(INPUT_IDS).detach()
    alpha = 0.01 * float(X.pow(2).mean().sqrt()) * math.sqrt(4 * X.shape[-1])
    inputs = {"labels": LABELS, "attention_mask": ATTENTION}
    mode = length_mode
    if length_mode == "packed":
        inputs = {
            "labels": LABELS,
            "position_ids": torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]),
        }
        mode = "per_sequence"
    weights = matched_position_weights(alpha, inputs, X.shape[-1], mode)
    noise = NEFTuneNoise(alpha, length_mode=mode, generator=torch.Generator().manual_seed(0))
    noise.set_batch(inputs.get("attention_mask"), inputs.get("position_ids"))
    mask = label_mask(LABELS)

    def row_ce(inp):  # (..., B)
        logits = model.logits(inp, ATTENTION)
        logp = torch.log_softmax(logits, -1)
        targets = torch.zeros_like(LABELS)
        targets[:, :-1] = LABELS[:, 1:].clamp(min=0)
        picked = logp.gather(-1, targets.expand(*logits.shape[:-1]).unsqueeze(-1))[..., 0]
        return -(picked * mask).sum(-1)

    samples = 4000
    eps = torch.stack([noise.sample(X) for _ in range(samples)])  # (S, B, L, d)
    with torch.no_grad():
        rise = (row_ce(X + eps) + row_ce(X - eps)) / 2 - row_ce(X)  # (S, B)
    measured, error = rise.mean(0), rise.std(0) / math.sqrt(samples)
    size = X.numel()
    dense = torch.func.hessian(lambda inp: row_ce(inp).sum())(X).reshape(size, size)
    diagonal = dense.diagonal().view(X.shape).sum(-1)  # (B, L): sum over d of H_ii
    predicted = (weights * diagonal).sum(-1)  # (B,)
    assert ((measured - predicted).abs() < 4 * error + 1e-3 * predicted.abs()).all(), (
        measured,
        predicted,
        error,
    )
    if length_mode != "padded":  # rows of different lengths: one lambda is off on each row
        single = weights[inputs["labels"] != -100].mean() * diagonal.sum(-1)
        assert ((single - measured).abs() > 10 * error).any()
