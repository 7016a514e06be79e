"""Vocabulary-sized work of the CE and the penalty, chunk by chunk over the scored positions.

Torch only. The model's logits ``Z`` (B, L, V) are read as ``(B L, V)`` rows; the scored rows
(``label_mask``, :func:`fishertune.penalties.label_mask_from_labels`) are visited in chunks of
about :data:`CHUNK_BYTES`, so no (N, V) float32 copy of the scored logits, their log-softmax or
their softmax is kept beyond one chunk. At a Llama-3 vocabulary (V = 128,256) a single (N, V)
float32 tensor of 4 x 256 positions is 0.5 GB, and each dense pass over one costs about a third of
the output projection's matmul on a CPU.

* :func:`scored_terms`: at one point ``X``, from one log-sum-exp per scored position
  ``lse_t = log sum_v exp(z_tv)``, the CE ``sum_t M_t (lse_t - z_t[y_t])``, the penalty's sampled
  log-likelihood ``g_s = sum_t M_t (z_t[y'_ts] - lse_t)`` (token-F) or
  ``g_s = sum_t M_t (z_t[y'_ts] - <z_t, q_t>)`` with ``q`` held constant (logit-F), and the
  step's metrics (entropy ``lse_t - <p_t, z_t>``, argmax accuracy), and, for the unbiased
  estimator's score-function term, each row's sampled log-likelihood per draw
  ``l_bs = sum_{t in row b} M_t (z_t[y'_ts] - lse_t)``. One custom autograd function: its backward
  recomputes ``p_t = exp(z_t - lse_t)`` chunk by chunk and writes
  ``dZ_t = a_ce (p_t - e_{y_t}) + sum_s a_s (e_{y'_ts} - q_t) + sum_s c_{b(t)s} (e_{y'_ts} - p_t)``
  (``q = p`` for token-F; ``a``, ``c`` the gradients of ``g`` and ``l``) into one gradient of the
  logits, the buffer a dense backward allocates too. It is first-order only
  (``once_differentiable``): exact double backward keeps the dense
  :func:`fishertune.penalties.fisher_objective`.
* :func:`softmax_draws`: the sampler's draws ``y' ~ softmax(z_t)``, chunk by chunk, with the same
  uniforms from the same generator (one ``torch.rand((N, m), float64)``) and the same float32
  softmax per row as the dense sampler, so the same seed gives the same draws.
* :func:`frozen_reference`: logit-F's constant ``p_ref`` for the shifted forwards of finite
  differences: the (N, V) softmax for dense logits (a shifted pass sees only its own logits), or,
  for :class:`LinearLogits`, the scored hidden states (N, d) and ``r = p_ref W`` (N, d).
* :class:`LinearLogits` (``ce_kernel=linear``): the output projection ``z = W h + b`` fused into
  all of the above: the model hands over its last hidden states and ``lm_head``'s weight instead
  of its logits. :mod:`fishertune.vocab_linear` computes the CE, the draws, ``g`` and the metrics
  from one pass over projected chunks that keeps ``p W`` and ``p^T H``, from which every
  backward follows without projecting again; the rows' log-likelihood (a coefficient per row in
  ``grad W``) takes :class:`_LinearScoredTerms` here, whose backward projects each chunk again.
  No (N, V) tensor exists on this path. :func:`linear_scored_ce` is the baseline's CE through
  the same kernel.

Hand-written: ``torch.nn.functional.linear_cross_entropy`` (torch 2.13) and the fused linear CEs
of Liger Kernel or Cut Cross-Entropy chunk the CE over the output projection, but they return the
CE alone: not the log-sum-exp that the draws and ``g`` share, nor ``g``, logit-F's
``<z_t, p_ref_t>`` against a reference held constant, the rows' log-likelihood or their gradients;
nor the entropy and accuracy the step logs. Nothing in torch or the fine-tuning libraries samples
from a softmax or forms ``g`` chunk by chunk, fused with the projection or not. The dense path
stays for models whose logits are not their hidden states times the output embedding (a logit
scale, a softcap, an adapter on the head) and for exact double backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.autograd.graph import get_gradient_edge

from fishertune.vocab_chunks import (
    CHUNK_BYTES,
    ChunkLogits,
    LinearLogits,
    Logits,
    Reference,
    compute_dtype,
    flat_logits,
    inverse_cdf,
    linear_logits,
    project,
    reference_of,
    row_chunks,
    scored_rows,
    scored_softmax,
    will_run,
)
from fishertune.vocab_linear import linear_scored_ce, linear_terms
from fishertune.vocab_pass import WeightSink, frozen_reference, softmax_draws

__all__ = [
    "CHUNK_BYTES",
    "LinearLogits",
    "ScoredTerms",
    "WeightSink",
    "frozen_reference",
    "inverse_cdf",
    "linear_logits",
    "linear_scored_ce",
    "row_chunks",
    "scored_rows",
    "scored_softmax",
    "scored_terms",
    "softmax_draws",
]

# Rows per chunk: as many as fit this many bytes of float32 (65 rows at V = 128,256; 1024 at
# V = 8192). On a CPU large enough that per-chunk overhead is negligible and far below an (N, V)
# tensor; on an accelerator larger, so that a chunk's kernels are not dominated by launches (a
# few chunk-sized temporaries are live at once: 1 GB or less there).
# index of each statistic in ScoredTerms.statistics
STAT_TOKENS, STAT_ENTROPY, STAT_CORRECT, STAT_CE = range(4)

Kind = Literal["token", "logit"]


@dataclass
class ScoredTerms:
    """What :func:`scored_terms` returns.

    Attributes:
        ce: ``sum_t M_t (lse_t - z_t[y_t])`` (with graph), or ``None`` without labels.
        g: (m,) the penalty's sampled log-likelihood per draw (with graph), or ``None`` without
            draws.
        statistics: (4,) float64, detached: scored tokens, entropy summed, argmax-correct count,
            CE summed (``STAT_*`` order), or ``None`` when not asked for.
        row_log_likelihood: (B, m) ``l_bs = sum_{t in row b} M_t log p_t[y'_ts]`` (with graph),
            or ``None`` when not asked for.
    """

    ce: Tensor | None
    g: Tensor | None
    statistics: Tensor | None
    row_log_likelihood: Tensor | None = None


def scored_terms(
    logits: Logits,
    label_mask: Tensor,
    labels: Tensor | None = None,
    draws: Tensor | None = None,
    *,
    kind: Kind = "token",
    reference: Reference | None = None,
    statistics: bool = False,
    row_log_likelihood: bool = False,
    weight_sink: WeightSink | None = None,
) -> ScoredTerms:
    """CE, the penalty's ``g`` and the metrics at the scored positions, from one log-sum-exp.

    Args:
        logits: (B, L, V), with graph; or :class:`LinearLogits` (the projection fused in:
            gradients go to its hidden states, weight and bias).
        label_mask: (B, L) bool.
        labels: (N,) the next-token targets ``y_t`` at the scored positions, for the CE (and the
            accuracy); ``None``: no CE.
        draws: (N, m) ``y'``; ``None``: no ``g``.
        kind: ``"token"``: ``g_s = sum_t (z_t[y'_ts] - lse_t)``; ``"logit"``:
            ``g_s = sum_t (z_t[y'_ts] - <z_t, q_t>)``, ``q`` held constant: ``reference``
            (:func:`frozen_reference`), or ``softmax(z_t)`` of these logits.
        statistics: also return the metrics (needs ``labels``).
        row_log_likelihood: also return ``l_bs = sum_{t in row b} M_t (z_t[y'_ts] - lse_t)``
            (B, m) (needs ``draws``; the model's own ``log p``, whichever ``kind``).
        weight_sink: for :class:`LinearLogits` without the rows' log-likelihood, the weight's
            gradient to add this pass's dense part to in the forward
            (:class:`~fishertune.vocab_pass.WeightSink`); ignored otherwise.

    Returns:
        :class:`ScoredTerms`, float32 (float64 for float64 logits).
    """
    if kind not in ("token", "logit"):
        raise ValueError(f"kind must be 'token' or 'logit', got {kind!r}")
    if statistics and labels is None:
        raise ValueError("statistics need the labels")
    if row_log_likelihood and draws is None:
        raise ValueError("the rows' log-likelihood needs the draws")
    rows = scored_rows(label_mask)
    # the row (in B) of each scored position, for the rows' log-likelihood
    owner = rows // label_mask.shape[1] if row_log_likelihood else None
    terms = _Terms(labels, draws, reference, kind, statistics, owner, label_mask.shape[0])
    if isinstance(logits, LinearLogits) and not row_log_likelihood:
        # one pass keeps what every gradient needs (fishertune.vocab_linear)
        ce, g, stats = linear_terms(
            logits, label_mask, labels, draws, kind=kind, reference=reference,
            statistics=statistics, sink=weight_sink,
        )  # fmt: skip
        row_ll = None
    elif isinstance(logits, LinearLogits):
        if logits.summary is not None:  # the sampler's weight-sized reduction is not used here
            logits.summary.p_outer = None
        hidden = logits.scored(label_mask)
        ce, g, stats, row_ll = _LinearScoredTerms.apply(
            hidden, logits.weight, logits.bias, logits.mm_dtype, terms
        )
    else:
        ce, g, stats, row_ll = _ScoredTerms.apply(flat_logits(logits), rows, terms)
    return ScoredTerms(
        ce if labels is not None else None,
        g if draws is not None else None,
        stats if statistics else None,
        row_ll if row_log_likelihood else None,
    )


@dataclass
class _Terms:
    """What :func:`scored_terms` computes, shared by its two autograd functions: ``owner``
    (N,) is the row of each scored position (``None``: no rows' log-likelihood), ``batch``
    the number of rows; ``lse`` (N,) is filled by the forward for the backward."""

    labels: Tensor | None
    draws: Tensor | None
    reference: Reference | None
    kind: str
    statistics: bool
    owner: Tensor | None
    batch: int
    lse: Tensor | None = None


def _forward(terms: _Terms, n: int, vocab: int, z_of: ChunkLogits, like: Tensor, dtype):
    """``(ce, g, statistics, row_log_likelihood)`` of :func:`scored_terms`, reading each
    chunk's logits ``z_of(chunk)`` once: its log-sum-exp, ``z`` at the labels and the draws,
    logit-F's ``<z_t, q_t>`` and the metrics. Keeps ``lse`` in ``terms`` for the backward."""
    labels, draws, kind = terms.labels, terms.draws, terms.kind
    # the log-sum-exp is needed by the CE, token-F's g and logit-F's own p; logit-F with a
    # given reference and no CE needs none
    need_lse = (
        labels is not None or kind == "token" or terms.reference is None or terms.owner is not None
    )
    lse = like.new_zeros(n, dtype=dtype) if need_lse else None
    at_labels = like.new_zeros(n, dtype=dtype) if labels is not None else None
    at_draws = like.new_zeros(n, draws.shape[1], dtype=dtype) if draws is not None else None
    baseline = like.new_zeros(n, dtype=dtype) if kind == "logit" and draws is not None else None
    q_of = reference_of(terms.reference)
    entropy = like.new_zeros((), dtype=torch.float64)
    correct = like.new_zeros((), dtype=torch.float64)
    for chunk in row_chunks(n, vocab, like.device):
        z = z_of(chunk)  # (c, V)
        if lse is not None:
            lse[chunk] = torch.logsumexp(z, dim=-1)
        if at_labels is not None:
            at_labels[chunk] = z.gather(1, labels[chunk, None])[:, 0]
        if at_draws is not None:
            at_draws[chunk] = z.gather(1, draws[chunk])
        q = None
        if baseline is not None:
            q = q_of(chunk) if q_of is not None else torch.softmax(z, dim=-1)
            baseline[chunk] = (z * q).sum(-1)
        if terms.statistics:
            p = q if q is not None and q_of is None else torch.softmax(z, dim=-1)
            entropy += (lse[chunk] - (p * z).sum(-1)).sum().double()
            correct += (z.argmax(-1) == labels[chunk]).sum().double()
    ce = like.new_zeros((), dtype=dtype)
    if labels is not None:
        ce = (lse - at_labels).sum()
    g = like.new_zeros(0, dtype=dtype)
    row_ll = like.new_zeros(0, dtype=dtype)
    if draws is not None:
        g = (at_draws - (lse if kind == "token" else baseline)[:, None]).sum(0)
        if terms.owner is not None:  # log p_t[y'_ts] summed per row: (B, m)
            log_p = at_draws - lse[:, None]
            row_ll = log_p.new_zeros(terms.batch, draws.shape[1])
            row_ll.index_add_(0, terms.owner, log_p)
    stats = like.new_zeros(4, dtype=torch.float64)
    if terms.statistics:
        stats[STAT_TOKENS] = n
        stats[STAT_ENTROPY] = entropy
        stats[STAT_CORRECT] = correct
        stats[STAT_CE] = ce.double()
    terms.lse = lse
    return ce, g, stats, row_ll


def _logit_grads(
    terms: _Terms,
    n: int,
    vocab: int,
    z_of: ChunkLogits,
    grads: tuple[Tensor, Tensor, Tensor],
    like: Tensor,
    dtype: torch.dtype,
) -> Iterator[tuple[slice, Tensor]]:
    """The gradient of the logits, chunk by chunk (nothing when every output's gradient is 0):

    ``dZ_t = a_ce (p_t - e_{y_t}) + sum_s a_s (e_{y'_ts} - q_t)``
    ``+ sum_s c_{b(t)s} (e_{y'_ts} - p_t)``, with ``p_t = exp(z_t - lse_t)`` (LogsumexpBackward's
    own formula), ``q = p`` for token-F,
    ``grads = (a_ce, a, c)`` the gradients of the CE, ``g`` and the rows' log-likelihood.
    ``z_of`` is called only where ``p`` is needed."""
    grad_ce, grad_g, grad_rows = grads
    labels, draws, lse, owner = terms.labels, terms.draws, terms.lse, terms.owner
    use_ce = labels is not None and bool(grad_ce != 0)
    use_g = draws is not None and grad_g.numel() > 0 and bool((grad_g != 0).any())
    use_rows = owner is not None and grad_rows.numel() > 0 and bool((grad_rows != 0).any())
    if not (use_ce or use_g or use_rows):
        return
    q_of = reference_of(terms.reference)
    token = terms.kind == "token"
    g_total = grad_g.sum().to(dtype) if use_g else None
    # c_{b(t)s} per scored position (N, m): row b's gradient of l_bs
    per_position = grad_rows.to(dtype)[owner] if use_rows else None
    # the coefficient of p_t: a_ce - sum_s a_s (token-F) - sum_s c_{b(t)s}
    scale: Tensor | float = (grad_ce.to(dtype) if use_ce else 0.0) - (
        g_total if use_g and token else 0.0
    )
    for chunk in row_chunks(n, vocab, like.device):
        part = None
        z = None
        if use_ce or (use_g and token) or use_rows:
            z = z_of(chunk)
            p = (z - lse[chunk, None]).exp_()
            chunk_scale = scale
            if use_rows:
                chunk_scale = scale - per_position[chunk].sum(-1, keepdim=True)  # (c, 1)
            part = p.mul_(chunk_scale)
        if use_g and not token:
            if q_of is not None:
                q = q_of(chunk)
            else:
                q = torch.softmax(z_of(chunk) if z is None else z, dim=-1)
            part = -g_total * q if part is None else part.sub_(q * g_total)
        if part is None:
            part = like.new_zeros(chunk.stop - chunk.start, vocab, dtype=dtype)
        if use_ce:
            part.scatter_add_(1, labels[chunk, None], (-grad_ce.to(dtype)).expand(part.shape[0], 1))
        if use_g or use_rows:
            m = draws.shape[1]
            at_draws = (
                grad_g.to(dtype)[None, :].expand(part.shape[0], m) if use_g else per_position[chunk]
            )
            if use_g and use_rows:
                at_draws = at_draws + per_position[chunk]
            part.scatter_add_(1, draws[chunk], at_draws)
        yield chunk, part


class _ScoredTerms(torch.autograd.Function):
    """:func:`scored_terms` over the flattened logits (R, V), scored rows ``rows`` (N,)."""

    @staticmethod
    def forward(ctx, flat: Tensor, rows: Tensor, terms: _Terms):  # type: ignore[override]
        dtype = compute_dtype(flat.dtype)
        outputs = _forward(
            terms, rows.numel(), flat.shape[1], lambda c: flat[rows[c]].to(dtype), flat, dtype
        )
        ctx.mark_non_differentiable(outputs[2])
        ctx.save_for_backward(flat, rows)
        ctx.terms = terms
        return outputs

    @staticmethod
    @once_differentiable
    def backward(
        ctx, grad_ce: Tensor, grad_g: Tensor, _: Tensor, grad_rows: Tensor
    ) -> tuple[Tensor | None, ...]:
        flat, rows = ctx.saved_tensors
        dtype = compute_dtype(flat.dtype)
        # the zeros a dense backward's index_put would also allocate: unscored rows get none
        grad = torch.zeros_like(flat)
        chunks = _logit_grads(
            ctx.terms,
            rows.numel(),
            flat.shape[1],
            lambda c: flat[rows[c]].to(dtype),
            (grad_ce, grad_g, grad_rows),
            flat,
            dtype,
        )
        for chunk, part in chunks:
            grad.index_copy_(0, rows[chunk], part.to(flat.dtype))
        return grad, None, None


class _LinearScoredTerms(torch.autograd.Function):
    """:func:`scored_terms` of ``z = h W^T + b`` for the scored hidden states ``h`` (N, d):
    each chunk's ``z`` is projected in the forward and again in the backward, which writes
    ``grad h = dZ W``, ``grad W = dZ^T h`` and ``grad b = sum_t dZ_t`` chunk by chunk (used for
    the rows' log-likelihood; the rest takes :mod:`fishertune.vocab_linear`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, mm_dtype, terms: _Terms
    ):
        weight_mm, bias_mm = LinearLogits(hidden, weight, bias, mm_dtype).operands()
        outputs = _forward(
            terms,
            hidden.shape[0],
            weight.shape[0],
            lambda c: project(hidden[c], weight_mm, bias_mm),
            hidden,
            compute_dtype(mm_dtype),
        )
        ctx.mark_non_differentiable(outputs[2])
        ctx.save_for_backward(hidden, weight, bias)
        ctx.terms, ctx.mm_dtype = terms, mm_dtype
        ctx.weight_node = get_gradient_edge(weight).node if weight.requires_grad else None
        return outputs

    @staticmethod
    @once_differentiable
    def backward(
        ctx, grad_ce: Tensor, grad_g: Tensor, _: Tensor, grad_rows: Tensor
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, bias = ctx.saved_tensors
        mm_dtype, dtype = ctx.mm_dtype, compute_dtype(ctx.mm_dtype)
        weight_mm, bias_mm = LinearLogits(hidden, weight, bias, mm_dtype).operands()
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1] and will_run(ctx.weight_node):
            grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device)
        chunks = _logit_grads(
            ctx.terms,
            hidden.shape[0],
            weight.shape[0],
            lambda c: project(hidden[c], weight_mm, bias_mm),
            (grad_ce, grad_g, grad_rows),
            hidden,
            dtype,
        )
        with torch.autocast(hidden.device.type, enabled=False):
            for chunk, part in chunks:
                dz = part.to(mm_dtype)
                if grad_hidden is not None:
                    grad_hidden[chunk] = (dz @ weight_mm).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (dz.T @ hidden[chunk].to(mm_dtype)).to(dtype)
                if grad_bias is not None:
                    grad_bias += part.sum(0)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None
