"""The Hessian-trace penalty's parameter gradient, exact and by second differences.

Torch only, on the same model callbacks as :mod:`fishertune.penalty_grad` (:class:`Passes`).
The Hessian-trace penalty ``(1/K) sum_k u_k^T H_X u_k`` (Hutchinson, ``u_k`` Rademacher probes
times ``sqrt(w)``, ``H_X`` the Hessian of the summed CE in ``X``) has an exact form
(:func:`exact_hessian_trace`, double backward through a Hessian-vector product) and a
finite-difference one (:func:`hessian_fd_loss`): ``(CE(X + h u) - 2 CE(X) + CE(X - h u)) / h^2``,
value and parameter gradient both O(h^2) off, first-order autograd only.

The probes are Rademacher vectors scaled by the positions' weights (:func:`rademacher_probes`):
``E[u^T H u] = Tr(w H)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from fishertune.penalties import label_mask_from_labels, scored_targets
from fishertune.penalty_grad import Passes, PenaltyLoss
from fishertune.vocab import scored_terms

__all__ = [
    "DEFAULT_HESSIAN_FD_STEP",
    "exact_hessian_trace",
    "hessian_fd_loss",
    "rademacher_probes",
]

# Relative step of the Hessian-trace second difference, h = h_rel ||X|| / ||u||. Its truncation
# error is O(h^2) and its rounding O(eps / h^2): the best h_rel is about eps^(1/4), so larger than
# the Fisher fd steps (tests/test_penalty_grad.py measures the order in float64).
DEFAULT_HESSIAN_FD_STEP: dict[torch.dtype, float] = {
    torch.float64: 1e-3,
    torch.float32: 3e-2,
    torch.bfloat16: 1e-1,
    torch.float16: 1e-1,
}


def rademacher_probes(
    embeds: Tensor,
    probes: int,
    generator: torch.Generator | None,
    position_weights: Tensor | None = None,
) -> Tensor:
    """Hutchinson probes ``u_k = sqrt(w) z_k``, ``z_k`` uniform on ``{-1, 1}^(B L d)``, so that
    ``E[u^T H u] = Tr(w H)``: (K, B, L, d) in ``embeds``' dtype, without gradient."""
    shape = (probes, *embeds.shape)
    device = generator.device if generator is not None else embeds.device
    signs = torch.randint(2, shape, generator=generator, device=device)
    unit = (2 * signs - 1).to(device=embeds.device, dtype=embeds.dtype)
    if position_weights is not None:
        unit = unit * position_weights.to(embeds.dtype).sqrt()[None, :, :, None]
    return unit


def exact_hessian_trace(loss_sum: Tensor, embeds: Tensor, probes: Tensor) -> Tensor:
    """``(1/K) sum_k u_k^T H_X u_k``, ``H_X = d^2 loss_sum / dX^2``, with its graph.

    One backward for ``grad_X loss`` (``create_graph``), one per probe for the Hessian-vector
    product ``H u = grad_X <grad_X loss, u>`` (``create_graph``): backpropagating the result
    differentiates third derivatives of the model (eager or SDPA-math attention).

    Args:
        loss_sum: scalar, computed from ``embeds`` (the CE summed over scored tokens).
        embeds: (B, L, d) ``X``.
        probes: (K, B, L, d) ``u_k`` (:func:`rademacher_probes`), zero on rows not penalized.
    """
    (grad,) = torch.autograd.grad(loss_sum, embeds, create_graph=True)
    dtype = torch.promote_types(embeds.dtype, torch.float32)
    total = embeds.new_zeros((), dtype=dtype)
    for probe in probes:
        (product,) = torch.autograd.grad(
            (grad * probe).sum(), embeds, create_graph=True, retain_graph=True
        )
        total = total + (product.to(dtype) * probe.to(dtype)).sum()
    return total / probes.shape[0]


def hessian_fd_loss(
    passes: Passes,
    labels: Tensor,
    probes_for: Callable[[Tensor], Tensor],
    *,
    weight: float,
    normalizer: Tensor,
    relative_step: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> PenaltyLoss:
    """CE plus ``weight * T`` with the Hutchinson Hessian trace ``T`` by second differences.

    For each probe ``u_k`` (``probes_for(X) -> (K, B, L, d)``) and each row ``b`` its own step
    ``h_kb = h_rel ||X_b|| / ||u_kb||``,

        ``T = (1/K) sum_k sum_b (CE_b(X + h_k u_k) - 2 CE_b(X) + CE_b(X - h_k u_k)) / h_kb^2``

    with ``CE_b`` row ``b``'s CE summed over its scored tokens and ``X = X(theta)`` keeping its
    graph. Row ``b``'s CE depends on row ``b``'s embeddings only, so ``H_X`` is block diagonal
    over rows and ``T = (1/K) sum_k u_k^T H_X u_k + O(h^2)``, and so is its parameter gradient,
    an ordinary first-order backward of the same expression. The step of a row depends on that
    row alone: the value does not change with how the rows are split over processes. The
    ``-2 CE(X)`` part joins the CE's own backward at ``X``; with ``passes.backward`` every pass
    but the last is backpropagated before the next forward (one graph in memory).

    Args:
        passes: the model (see :class:`Passes`); ``fused`` does not apply.
        labels: (B, L) with -100 on unscored tokens.
        probes_for: the probes, given ``X`` (:func:`rademacher_probes`).
        weight, normalizer: as in :func:`fd_penalty_loss`.
        relative_step: ``h_rel``; default :data:`DEFAULT_HESSIAN_FD_STEP` for ``compute_dtype``
            (``X``'s dtype if not given).

    Returns:
        The loss still to backpropagate, the objective's value (``T`` being the second
        difference) and ``T``.
    """
    split = passes.backward is not None
    label_mask = label_mask_from_labels(labels)
    next_tokens = scored_targets(labels, label_mask)
    # the rows' CE as the log-likelihood of the labels themselves: -CE_b, from the same chunks
    as_draws = next_tokens[:, None]
    joint: list[Tensor] = []
    with passes.no_sync() if split else contextlib.nullcontext():
        logits, embeds = passes.forward(None)
        terms = scored_terms(
            logits,
            label_mask,
            next_tokens,
            as_draws,
            statistics=passes.on_scored is not None,
            row_log_likelihood=True,
        )
        if passes.on_scored is not None:
            passes.on_scored(terms.statistics, logits.shape[-1])
        del logits
        row_ce = -terms.row_log_likelihood[:, 0]  # (B,)
        probes = probes_for(embeds.detach())
        if relative_step is None:
            relative_step = DEFAULT_HESSIAN_FD_STEP[compute_dtype or embeds.dtype]
        x_norms = embeds.detach().float().flatten(1).norm(dim=1)  # (B,)
        # (K, B) steps, 0 where a row's probe is 0 (a row not penalized)
        probe_norms = probes.detach().float().flatten(2).norm(dim=2)
        steps = torch.where(probe_norms > 0, relative_step * x_norms / probe_norms, 0.0)
        inverse = torch.where(steps > 0, 1.0 / steps.double().pow(2), 0.0)  # (K, B)
        inverse = inverse.to(row_ce.dtype if row_ce.dtype == torch.float64 else torch.float32)
        probe_weight = weight / (probes.shape[0] * normalizer)
        part = terms.ce / normalizer - probe_weight * 2.0 * (inverse.sum(0) * row_ce).sum()
        if split:
            passes.backward(part)
        else:
            joint.append(part)
    row_ce_value = row_ce.detach()
    trace = row_ce_value.new_zeros(())
    shifts = [(k, sign) for k in range(probes.shape[0]) for sign in (1.0, -1.0)]
    for index, (k, sign) in enumerate(shifts):
        last = index == len(shifts) - 1
        with passes.no_sync() if split and not last else contextlib.nullcontext():
            shift = sign * steps[k].to(probes.dtype)[:, None, None] * probes[k]
            logits, _ = passes.forward(shift)
            shifted = (
                scored_terms(logits, label_mask, draws=as_draws, row_log_likelihood=True)
                .row_log_likelihood[:, 0]
                .neg()
            )  # (B,) chunked, no (N, V)
            del logits
            part = probe_weight * (inverse[k] * shifted).sum()
            trace = trace + (inverse[k] * (shifted.detach() - row_ce_value)).sum()
            if split and not last:
                passes.backward(part)
            else:
                joint.append(part)
    squared = trace / probes.shape[0]
    value = (terms.ce.detach() + weight * squared) / normalizer
    loss = sum(joint[1:], joint[0])
    return PenaltyLoss(loss - loss.detach() + value, value.detach(), squared.detach())
