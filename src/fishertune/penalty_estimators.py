"""The penalty's estimators on one batch: each row's squared norm, the unbiased estimator's
leave-one-out score-function term, and the exact (double backward) penalty.

Torch only; :mod:`fishertune.penalty_grad` builds the finite-difference gradients on them.
The unbiased estimator adds to ``S = (1/m) sum_s sum_b S_bs`` (``S_bs`` row ``b``'s squared norm
of draw ``s``) the score-function term ``(1/m) sum_s sum_b (S_bs - mean_{k != s} S_bk)
l_bs`` with ``l_bs`` row ``b``'s log-likelihood of its draw, of value 0 (written
``l - l.detach()``): its gradient is the part of ``grad_theta E_y'[S]`` that the paper's
estimator drops; the leave-one-out mean is its baseline (``m >= 2``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fishertune.penalties import Kind, fisher_objective


def row_squared_norms(direction: Tensor, position_weights: Tensor | None = None) -> Tensor:
    """``S_b = sum_l w_bl ||v_bl||^2`` per row of one draw's ``v`` (B, L, d); ``w = 1`` if
    ``position_weights`` (B, L) is ``None``. Float32 or wider, (B,)."""
    squared = direction.to(torch.promote_types(direction.dtype, torch.float32)).pow(2).sum(-1)
    if position_weights is not None:
        squared = squared * position_weights.to(squared.dtype)
    return squared.sum(-1)


def leave_one_out(row_squared: Tensor) -> Tensor:
    """``S_bj - mean_{k != j} S_bk`` (m, B), detached."""
    samples = row_squared.shape[0]
    if samples < 2:
        raise ValueError("the leave-one-out baseline needs m >= 2 draws per position")
    squared = row_squared.detach()
    return squared - (squared.sum(0, keepdim=True) - squared) / (samples - 1)


def row_log_likelihood(draw_log_probs: Tensor, label_mask: Tensor) -> Tensor:
    """(B, m) ``sum_{t in row b} log p_t[y'_{t,j}]`` from (N, m) in ``label_mask`` order."""
    rows = label_mask.nonzero()[:, 0]  # (N,) row of each scored position
    batch = label_mask.shape[0]
    return draw_log_probs.new_zeros(batch, draw_log_probs.shape[1]).index_add(
        0, rows, draw_log_probs
    )


def score_function_term(draw_log_probs: Tensor, label_mask: Tensor, row_squared: Tensor) -> Tensor:
    """The unbiased estimator's score-function half, as a term of value 0.

    With ``m >= 2`` draws per row, row ``b``'s sampled log-likelihood of draw ``j``
    ``log p(y'_bj | X) = sum_{t in row b} M_t log p_t[y'_{t,j}]`` and its penalty
    ``S_bj = sum_l w_bl ||v_{j,bl}||^2`` (row ``b``'s part of ``||v_j||^2``), the term is

        ``T = (1/m) sum_j sum_b stopgrad(S_bj - mean_{k != j} S_bk) log p(y'_bj | X)``

    and ``E[grad_theta T] = E[S_bj grad_theta log p(y'_bj)]`` summed over rows: the baseline is
    independent of draw ``j`` and ``E[grad_theta log p(y')] = 0``. Rows are independent given
    ``X``, so row ``b``'s penalty needs only row ``b``'s likelihood (other rows' would add
    variance, not expectation). ``(1/m) sum_j grad S_j + grad T`` is unbiased for
    ``grad_theta E[S]``.

    Args:
        draw_log_probs: (N, m) ``log p_t[y'_{t,j}]`` at the scored positions of ``label_mask``
            (row-major order), with graph.
        label_mask: (B, L) bool: the positions of the rows of ``draw_log_probs``.
        row_squared: (m, B) ``S_bj`` (detached here).

    Returns:
        Scalar ``T - stopgrad(T)``: 0, with ``T``'s gradient.
    """
    return score_term(row_log_likelihood(draw_log_probs, label_mask), row_squared)


def score_term(row_log_likelihood: Tensor, row_squared: Tensor) -> Tensor:
    """:func:`score_function_term` from the rows' ``log p(y'_bj | X)`` (B, m), with graph
    (:func:`fishertune.vocab.scored_terms`' ``row_log_likelihood``)."""
    weights = leave_one_out(row_squared).to(row_log_likelihood.dtype)  # (m, B)
    term = (weights * row_log_likelihood.T).sum() / weights.shape[0]
    return term - term.detach()


def exact_penalty_parts(
    kind: Kind,
    embeds: Tensor,
    logits: Tensor,
    label_mask: Tensor,
    targets: Tensor,
    position_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``S = (1/m) sum_s sum_b S_bs`` with the graph of every ``v_s`` (double backward), and the
    rows' ``S_bs`` (m, B), detached (:func:`row_squared_norms`).

    Args:
        embeds: (B, L, d) ``X``, the input ``logits`` were computed from.
        logits: (B, L, V).
        label_mask: (B, L) bool: the penalized scored positions.
        targets: (N, m) draws at those positions (:func:`~fishertune.penalties.sample_targets`).
        position_weights: (B, L) ``w`` (``None``: 1).

    Returns:
        ``S`` (float32, float64 for float64 logits; 0 without a scored position) and (m, B).
    """
    dtype = torch.promote_types(embeds.dtype, torch.float32)  # float32 at least, as g
    samples = targets.shape[1]
    if targets.shape[0] == 0:
        rows = embeds.new_zeros((samples, embeds.shape[0]), dtype=dtype)
        return embeds.new_zeros((), dtype=dtype), rows
    # token-F and logit-F share v; the functions differ only by g, which fisher_objective picks
    g = fisher_objective(kind, logits, label_mask, targets)  # (m,)
    squared = embeds.new_zeros((), dtype=dtype)
    per_row = []
    for s in range(g.shape[0]):
        (v,) = torch.autograd.grad(g[s], embeds, create_graph=True, retain_graph=True)
        if position_weights is None:
            squared = squared + v.to(dtype).pow(2).sum()
        else:
            squared = squared + row_squared_norms(v, position_weights).sum()
        per_row.append(row_squared_norms(v.detach(), position_weights))
    return squared / g.shape[0], torch.stack(per_row)


def exact_penalty(
    kind: Kind, embeds: Tensor, logits: Tensor, label_mask: Tensor, targets: Tensor
) -> Tensor:
    """``S = (1/m) sum_s ||v_s||^2`` with the graph of every ``v_s`` (double backward); see
    :func:`exact_penalty_parts`. Scalar, float32 (float64 for float64 logits)."""
    return exact_penalty_parts(kind, embeds, logits, label_mask, targets)[0]
