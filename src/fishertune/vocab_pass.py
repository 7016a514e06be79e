"""One pass over the projected chunks of the output projection: what the fused kernel of
:mod:`fishertune.vocab_linear` keeps (:class:`~fishertune.vocab_chunks.LinearPass`), the
sampler's draws from that pass, and logit-F's frozen reference.

Torch only. ``z_t = W h_t + b`` is projected chunk by chunk over the scored rows and reduced over
the vocabulary at once: ``lse_t``, ``argmax_t``, ``p_t W`` and ``sum_t p_t h_t^T`` (with
``p_t = softmax(z_t)``), and for logit-F's shifted passes ``sum_t q_t h_t^T`` of its constant
reference ``q``. No (N, V) tensor is kept beyond one chunk. Hand-written for the reasons given in
:mod:`fishertune.vocab_linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fishertune.vocab_chunks import (
    FrozenLogits,
    LinearLogits,
    LinearPass,
    Logits,
    Reference,
    compute_dtype,
    flat_logits,
    inverse_cdf,
    project,
    row_chunks,
    scored_chunks,
    scored_rows,
    scored_softmax,
)

__all__ = [
    "Sampler",
    "WeightSink",
    "frozen_reference",
    "linear_pass",
    "records_graph",
    "softmax_draws",
]


@dataclass(frozen=True)
class Sampler:
    """The sampler's uniforms ``u`` (N, m) float64 and the inverse CDF's block
    (:func:`fishertune.vocab_chunks.inverse_cdf`)."""

    uniforms: Tensor
    block: int


@dataclass
class WeightSink:
    """The trained weight whose existing gradient a pass adds the dense part of its own to, as
    it goes.

    A pass of :func:`fishertune.vocab_linear.linear_terms` that runs after an earlier backward
    has formed ``W.grad`` (finite differences' shifted passes, split mode) would otherwise keep
    its ``sum_t p_t h_t^T`` (V, d) beside that gradient until its backward. Instead, the pass adds
    ``alpha_p sum_t p_t h_t^T + alpha_q sum_t q_t h_t^T`` to ``weight.grad`` chunk by chunk with
    the coefficients its backward is predicted to bring, and the backward adds the sparse part
    in place. The prediction is ``ce`` and ``g``, the gradients the backward will give the
    terms' CE and each column of ``g`` (the caller's loss scale included, e.g. measured by an
    earlier backward); the backward checks it to a few rounding errors and, where it is off,
    adds the difference with one more pass, so the gradient is exact either way. The weight's
    own gradient hooks then see a zero: its gradient was written in place.

    Attributes:
        weight: the output projection's weight (V, d), a parameter with a ``.grad`` in the pass's
            compute dtype (float32 or wider).
        ce: the predicted ``d loss / d CE`` (0 without labels).
        g: the predicted ``d loss / d g_s``, the same for every draw ``s``.
    """

    weight: Tensor
    ce: float
    g: float


def _matmul(a: Tensor, b: Tensor, mm_dtype: torch.dtype, dtype: torch.dtype) -> Tensor:
    """``a @ b`` in the projection's matmul dtype, returned in ``dtype``."""
    return (a.to(mm_dtype) @ b.to(mm_dtype)).to(dtype)


def linear_pass(
    logits: LinearLogits,
    label_mask: Tensor | None,
    *,
    softmax: bool = True,
    reference: LinearLogits | None = None,
    sampler: Sampler | None = None,
    gradients: bool | None = None,
    into: tuple[Tensor, float, float] | None = None,
) -> LinearPass:
    """One pass over the projected chunks of the scored rows: what :class:`LinearPass` keeps.

    ``softmax``: the pass's own ``lse``, ``argmax``, ``p W`` (and ``<p_t, b>``) and, when the
    weight (bias) is trained, ``sum_t p_t h_t^T`` (``sum_t p_t``); with ``sampler`` the draws
    ``y' ~ p_t`` too, each row's probabilities ``torch.softmax(z_t.float())`` as the dense
    sampler's, so the same uniforms give the same draws. ``reference`` (logit-F's frozen
    :func:`frozen_reference`): ``sum_t q_t h_t^T`` (``sum_t q_t``) when the weight (bias) is
    trained, ``q_t`` projected again from the reference's hidden states. ``gradients``: whether
    a backward may follow, so that the trained weight's and bias's reductions are kept
    (``None``: :func:`records_graph`). ``into``: ``(grad, alpha_p, alpha_q)``, the weight's
    reductions added to ``grad`` with these coefficients instead of kept (:class:`WeightSink`).
    """
    if gradients is None:
        gradients = records_graph(logits)
    with torch.no_grad():
        return _pass(logits, label_mask, softmax, reference, sampler, gradients, into)


def _pass(
    logits: LinearLogits,
    label_mask: Tensor | None,
    softmax: bool,
    reference: LinearLogits | None,
    sampler: Sampler | None,
    gradients: bool,
    into: tuple[Tensor, float, float] | None,
) -> LinearPass:
    """:func:`linear_pass`, without a graph."""
    hidden = logits.hidden if label_mask is None else logits.scored(label_mask)
    weight, bias = logits.operands()
    dtype = compute_dtype(logits.mm_dtype)
    n, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
    trained = gradients and logits.weight.requires_grad
    outer = trained and into is None
    sink = (into[0], {"p": into[1], "q": into[2]}) if trained and into is not None else None
    bias_sum = gradients and logits.bias is not None and logits.bias.requires_grad
    result = LinearPass(label_mask)
    if softmax:
        result.lse = hidden.new_empty(n, dtype=dtype)
        result.argmax = torch.empty(n, dtype=torch.long, device=device)
        result.p_projection = hidden.new_empty(n, weight.shape[1], dtype=dtype)
        result.p_bias = None if bias is None else hidden.new_empty(n, dtype=dtype)
        result.p_outer = hidden.new_zeros(weight.shape, dtype=dtype) if outer else None
        result.p_sum = hidden.new_zeros(vocab, dtype=dtype) if bias_sum else None
        if sampler is not None:
            result.draws = torch.empty(sampler.uniforms.shape, dtype=torch.long, device=device)
    q_hidden = None
    if reference is not None and (trained or bias_sum):
        q_hidden = reference.hidden
        result.q_outer = hidden.new_zeros(weight.shape, dtype=dtype) if outer else None
        result.q_sum = hidden.new_zeros(vocab, dtype=dtype) if bias_sum else None
    with torch.autocast(device.type, enabled=False):
        for chunk in row_chunks(n, vocab, device):
            rows = hidden[chunk]
            if softmax:
                z = project(rows, weight, bias)  # (c, V)
                result.lse[chunk] = torch.logsumexp(z, dim=-1)
                result.argmax[chunk] = z.argmax(-1)
                p = torch.softmax(z, dim=-1)
                del z
                if sampler is not None:
                    probs = (
                        p
                        if p.dtype == torch.float32
                        else torch.softmax(project(rows, weight, bias).float(), dim=-1)
                    )
                    result.draws[chunk] = inverse_cdf(probs, sampler.uniforms[chunk], sampler.block)
                _accumulate(result, "p", p, rows, weight, bias, chunk, logits.mm_dtype, sink)
            if q_hidden is not None:
                q = torch.softmax(project(q_hidden[chunk], weight, bias), dim=-1)
                _accumulate(result, "q", q, rows, None, None, chunk, logits.mm_dtype, sink)
    return result


def records_graph(logits: LinearLogits) -> bool:
    """Whether terms of these logits computed now record a graph: grad mode is on (not
    evaluation under ``torch.no_grad``) and the hidden states, weight or bias require grad."""
    tensors = (logits.hidden, logits.weight, logits.bias)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _accumulate(
    result: LinearPass,
    name: str,
    probs: Tensor,
    rows: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    chunk: slice,
    mm_dtype: torch.dtype,
    sink: tuple[Tensor, dict[str, float]] | None,
) -> None:
    """A chunk's ``probs W``, ``<probs, b>``, ``probs^T h`` and ``sum probs`` into ``result``
    (``probs^T h`` times its coefficient into the sink's gradient instead, with a sink)."""
    dtype = probs.dtype
    if weight is not None:
        result.p_projection[chunk] = _matmul(probs, weight, mm_dtype, dtype)
        if bias is not None:
            result.p_bias[chunk] = probs @ bias.to(dtype)
    outer, alpha = getattr(result, f"{name}_outer"), 1.0
    if sink is not None:
        outer, alpha = sink[0], sink[1][name]
    if outer is not None and alpha != 0.0:
        if mm_dtype == dtype:  # accumulated in place: no (V, d) temporary per chunk
            outer.addmm_(probs.T, rows.to(dtype), alpha=alpha)
        else:
            outer.add_(_matmul(probs.T, rows, mm_dtype, dtype), alpha=alpha)
    total = getattr(result, f"{name}_sum")
    if total is not None:
        total += probs.sum(0)


def softmax_draws(
    logits: Logits,
    label_mask: Tensor,
    samples: int,
    generator: torch.Generator | None,
    block: int,
) -> Tensor:
    """``samples`` draws ``y' ~ softmax(z_t)`` per scored position (N, samples), chunk by chunk.

    The uniforms are one ``torch.rand((N, samples), float64)`` from ``generator`` and each row's
    probabilities ``torch.softmax(z_t.float())``, as the dense sampler takes them, so a generator
    in the same state gives the same draws. For :class:`LinearLogits` the draws come from the
    pass that also keeps the CE's and ``g``'s reductions (:func:`linear_pass`), left in
    ``logits.summary`` for :func:`linear_terms` on the same logits and mask.
    """
    n, vocab, z_of = scored_chunks(logits, label_mask)
    u = torch.rand(n, samples, generator=generator, device=logits.device, dtype=torch.float64)
    if isinstance(logits, LinearLogits):
        logits.summary = linear_pass(logits, label_mask, sampler=Sampler(u, block))
        return logits.summary.draws
    draws = torch.empty(n, samples, dtype=torch.long, device=logits.device)
    with torch.no_grad():
        for chunk in row_chunks(n, vocab, logits.device):
            probs = torch.softmax(z_of(chunk).float(), dim=-1)
            draws[chunk] = inverse_cdf(probs, u[chunk], block)
    return draws


def frozen_reference(logits: Logits, label_mask: Tensor) -> Reference:
    """logit-F's constant ``p_ref = softmax(z_t)`` at the scored positions, for ``reference``.

    Dense logits: the (N, V) softmax (:func:`~fishertune.vocab_chunks.scored_softmax`); for
    half-precision logits the scored logits themselves (:class:`FrozenLogits`, half that memory),
    their softmax taken where a pass reads a chunk.
    :class:`LinearLogits`: the scored hidden states (N, d) and the weight, detached, from which
    a pass projects its chunks of ``p_ref`` again where it needs them, and ``r_t = p_ref_t W``
    from the pass at these logits (``summary``; one pass if none ran): storage that does not
    grow with V, and bit for bit the ``p W`` the pass at ``X`` used.
    """
    if isinstance(logits, LinearLogits):
        summary = logits.summary
        if summary is None or summary.label_mask is not label_mask or summary.p_projection is None:
            summary = logits.summary = linear_pass(logits, label_mask)
        bias = None if logits.bias is None else logits.bias.detach()
        hidden = logits.scored(label_mask).detach()
        kept = LinearPass(None, p_projection=summary.p_projection, p_bias=summary.p_bias)
        return LinearLogits(hidden, logits.weight.detach(), bias, logits.mm_dtype, kept)
    if logits.element_size() < 4:  # half precision: the logits are half the float32 softmax
        return FrozenLogits(flat_logits(logits.detach())[scored_rows(label_mask)])
    return scored_softmax(logits.detach(), label_mask)
