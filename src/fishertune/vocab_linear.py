"""The output projection fused with the CE, the penalty's draws and ``g``, gradients formed in
the forward: one projection of each chunk per pass, none in the backward.

Torch only. For ``z_t = W h_t + b`` (:class:`~fishertune.vocab_chunks.LinearLogits`) every
gradient that :func:`fishertune.vocab.scored_terms` returns has the form

    ``dZ_t = alpha_p p_t + alpha_q q_t + sparse_t``

with ``p_t = softmax(z_t)``, ``q_t`` logit-F's constant reference, scalars ``alpha`` known only
in the backward (``alpha_p = a_ce - sum_s a_s`` for token-F, ``alpha_q = -sum_s a_s`` for logit-F
against a reference) and ``sparse_t`` nonzero at the label and the draws only. So

    ``grad h_t = alpha_p (p_t W) + alpha_q (q_t W) + sum_k c_tk W[k]``
    ``grad W   = alpha_p sum_t p_t h_t^T + alpha_q sum_t q_t h_t^T + sum_{t,k} c_tk e_k h_t^T``

and one pass over the projected chunks (:func:`fishertune.vocab_pass.linear_pass`) keeps the
vocabulary's reductions ``p W`` (N, d), ``sum_t p_t h_t^T`` (V, d, the size of the weight's own
gradient) and the log-sum-exp, from which the CE, ``g``, the metrics and every backward follow by
gathers of ``W`` at the labels and draws: per pass three vocabulary-wide matmuls (the projection,
``p W`` and ``p^T H``), as a dense CE's forward and backward, where recomputing the chunks in the
backward takes four and more. The sampler draws ``y'`` in the same pass
(:func:`fishertune.vocab_pass.softmax_draws`) and leaves it on the logits, so the CE and ``g``
that follow project nothing again. Logit-F's frozen reference
(:func:`fishertune.vocab_pass.frozen_reference`) keeps ``r_t = q_t W`` (N, d): its shifted
passes need ``<z_t, q_t> = h_t . r_t + <q_t, b>`` and ``grad h_t``'s ``q`` part without any
projection, and ``sum_t q_t h_t^T`` (a projection of the reference's chunks) only when the
weight is trained.

Hand-written for the same reasons as :mod:`fishertune.vocab` (no library returns ``g``, the draws,
the reference's terms or the step's metrics from a fused projection); the eager gradient is the
scheme of Liger Kernel's fused linear CE, generalized to gradients whose coefficients are known
only in the backward. The unbiased estimator's per-row log-likelihood has a coefficient per row
in ``grad W`` (it would need ``sum_{t in row b} p_t h_t^T`` per row), so it keeps
:mod:`fishertune.vocab`'s kernel that projects the chunks again in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.autograd.graph import get_gradient_edge

from fishertune.vocab_chunks import LinearLogits, LinearPass, compute_dtype, linear_logits, will_run
from fishertune.vocab_pass import WeightSink, linear_pass, records_graph

__all__ = ["linear_scored_ce", "linear_terms"]


@dataclass
class _Request:
    """What :func:`linear_terms` computes: the CE's ``labels`` (N,) or ``None``, the draws
    (N, m) or ``None``, ``kind``, logit-F's ``reference`` (with its ``r = q W``), the metrics,
    and the pass's reductions."""

    labels: Tensor | None
    draws: Tensor | None
    kind: str
    reference: LinearLogits | None
    statistics: bool
    summary: LinearPass
    sink: WeightSink | None = None
    sink_grad: Tensor | None = None  # the weight's .grad the pass added into
    predicted: tuple[float, float] = (0.0, 0.0)  # the sink's (alpha_p, alpha_q)

    @property
    def own_softmax(self) -> bool:
        """Whether ``g``'s dense part is the pass's own ``p`` (token-F; logit-F at ``X``)."""
        return self.kind == "token" or self.reference is None

    def dense_coefficients(self, a_ce: float | Tensor, a_g: float | Tensor) -> tuple:
        """``(alpha_p, alpha_q)`` of ``dZ_t`` for the CE's gradient ``a_ce`` and the draws'
        gradients summing to ``a_g`` (module docstring)."""
        if self.own_softmax:
            return a_ce - a_g, 0.0 * a_g
        return a_ce, -a_g


def linear_terms(
    logits: LinearLogits,
    label_mask: Tensor | None,
    labels: Tensor | None,
    draws: Tensor | None,
    *,
    kind: str = "token",
    reference: LinearLogits | None = None,
    statistics: bool = False,
    sink: WeightSink | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(ce, g, statistics)`` of :func:`fishertune.vocab.scored_terms` (no rows'
    log-likelihood) for :class:`LinearLogits`, from one :func:`linear_pass` (the sampler's, when
    it ran on these logits and mask) and gathers of ``W`` at the labels and draws.

    ``label_mask=None``: ``logits.hidden`` is at the scored positions already (N, d).
    ``sink``: the weight gradient's dense part is added to the weight's ``.grad`` in this pass
    (:class:`~fishertune.vocab_pass.WeightSink`; one backward must follow). Ignored where the
    weight is not trained, has no gradient yet, or one not in the pass's compute dtype.
    """
    if reference is not None and not isinstance(reference, LinearLogits):
        raise ValueError("the reference of LinearLogits is their frozen_reference (LinearLogits)")
    summary = logits.summary
    with_reference = kind == "logit" and draws is not None and reference is not None
    request = _Request(labels, draws, kind, reference, statistics, LinearPass(label_mask))
    into = None
    if sink is not None and _sink_applies(sink, logits):
        a_g = sink.g * draws.shape[1] if draws is not None else 0.0
        request.predicted = request.dense_coefficients(sink.ce if labels is not None else 0.0, a_g)
        request.sink, request.sink_grad, summary = sink, sink.weight.grad, None  # a new pass
        into = (request.sink_grad, *request.predicted)
    if (
        summary is None
        or summary.label_mask is not label_mask
        or summary.lse is None
        or with_reference
        or (records_graph(logits) and not _keeps_gradient_sums(summary, logits))
    ):
        softmax = labels is not None or statistics or (draws is not None and not with_reference)
        summary = linear_pass(
            logits,
            label_mask,
            softmax=softmax,
            reference=reference if with_reference else None,
            into=into,
        )
    if not with_reference:
        # these terms own the weight's reductions (their backward turns them into the gradient
        # in place); the logits keep the rest, for logit-F's frozen reference
        logits.summary = replace(summary, p_outer=None)
    hidden = logits.hidden if label_mask is None else logits.scored(label_mask)
    request.summary = summary
    weight_node = get_gradient_edge(logits.weight).node if logits.weight.requires_grad else None
    return _EagerLinearTerms.apply(
        hidden, logits.weight, logits.bias, logits.mm_dtype, request, weight_node
    )


def _sink_applies(sink: WeightSink, logits: LinearLogits) -> bool:
    """Whether ``sink`` takes these logits' weight gradient: it is their weight, trained, with a
    gradient in the pass's compute dtype, and a backward will follow (a graph is recorded)."""
    weight, grad = logits.weight, sink.weight.grad
    return (
        sink.weight is weight
        and records_graph(logits)
        and weight.requires_grad
        and grad is not None
        and grad.shape == weight.shape
        and grad.dtype == compute_dtype(logits.mm_dtype)
    )


def _keeps_gradient_sums(summary: LinearPass, logits: LinearLogits) -> bool:
    """Whether ``summary`` (a pass without a graph, perhaps) has the trained weight's and
    bias's sums that a backward will need."""
    bias = logits.bias
    return (summary.p_outer is not None or not logits.weight.requires_grad) and (
        summary.p_sum is not None or bias is None or not bias.requires_grad
    )


def _picked(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, mm_dtype: torch.dtype, ids: Tensor
) -> Tensor:
    """``z_t[k] = W[k] . h_t + b[k]`` at ``ids`` (N, k), one column at a time (no (N, k, d);
    the rows gathered, then cast: no weight-sized copy), rounded to the matmul's dtype as the
    projection's output is, returned in float32 or wider."""
    dtype = compute_dtype(mm_dtype)
    h = hidden.to(mm_dtype).to(dtype)
    columns = []
    for j in range(ids.shape[1]):
        z = (weight[ids[:, j]].to(mm_dtype).to(dtype) * h).sum(-1).to(mm_dtype)
        columns.append(z if bias is None else z + bias[ids[:, j]].to(mm_dtype))
    return torch.stack(columns, 1).to(dtype)


class _EagerLinearTerms(torch.autograd.Function):
    """CE, ``g`` and the metrics from a :class:`LinearPass`; the backward combines the pass's
    reductions with the outputs' gradients (module docstring), projecting again only for a
    second backward through the weight."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden, weight, bias, mm_dtype, request: _Request, weight_node
    ):
        summary, labels, draws = request.summary, request.labels, request.draws
        dtype = compute_dtype(mm_dtype)
        h = hidden.to(mm_dtype).to(dtype)  # as the projection reads it
        ce = hidden.new_zeros((), dtype=dtype)
        if labels is not None:
            at_labels = _picked(hidden, weight, bias, mm_dtype, labels[:, None])[:, 0]
            ce = (summary.lse - at_labels).sum()
        g = hidden.new_zeros(0, dtype=dtype)
        if draws is not None:
            at_draws = _picked(hidden, weight, bias, mm_dtype, draws)  # (N, m)
            if request.kind == "token":
                g = (at_draws - summary.lse[:, None]).sum(0)
            else:  # <z_t, q_t> = h_t . q_t W + <q_t, b>, q held constant
                kept = summary if request.reference is None else request.reference.summary
                baseline = (h * kept.p_projection).sum(-1)
                if kept.p_bias is not None:
                    baseline = baseline + kept.p_bias
                g = (at_draws - baseline[:, None]).sum(0)
        stats = hidden.new_zeros(4, dtype=torch.float64)
        if request.statistics:
            expected = (h * summary.p_projection).sum(-1)  # <p_t, z_t>
            if summary.p_bias is not None:
                expected = expected + summary.p_bias
            stats[0] = hidden.shape[0]
            stats[1] = (summary.lse - expected).double().sum()
            stats[2] = (summary.argmax == labels).sum().double()
            stats[3] = ce.double()
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.request, ctx.mm_dtype, ctx.weight_node = request, mm_dtype, weight_node
        return ce, g, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: Tensor, grad_g: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias = ctx.saved_tensors
        request, mm_dtype = ctx.request, ctx.mm_dtype
        summary, labels, draws = request.summary, request.labels, request.draws
        dtype = compute_dtype(mm_dtype)
        # dZ_t = alpha_p p_t + alpha_q q_t + sum_k c_tk e_k (module docstring)
        zero = grad_ce.new_zeros((), dtype=dtype)
        a_ce = grad_ce.to(dtype) if labels is not None else zero
        a_sum = grad_g.to(dtype).sum() if draws is not None else zero
        alpha_p, alpha_q = request.dense_coefficients(a_ce, a_sum)
        ids, coefs = [], []
        if labels is not None:
            ids.append(labels[:, None])
            coefs.append((-a_ce).expand(labels.shape[0], 1))
        if draws is not None:
            ids.append(draws)
            coefs.append(grad_g.to(dtype)[None, :].expand(draws.shape))
        ids = torch.cat(ids, 1) if ids else hidden.new_zeros(hidden.shape[0], 0, dtype=torch.long)
        coefs = torch.cat(coefs, 1) if coefs else hidden.new_zeros(ids.shape, dtype=dtype)
        h = hidden.to(mm_dtype).to(dtype)  # as the projection reads it
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad = torch.zeros(h.shape, dtype=dtype, device=h.device)
            for j in range(ids.shape[1]):  # one column at a time: no (N, k, d)
                grad.add_(weight[ids[:, j]].to(mm_dtype).to(dtype) * coefs[:, j, None])
            if summary.p_projection is not None:
                grad.add_(summary.p_projection * alpha_p)
            if not request.own_softmax:
                grad.add_(request.reference.summary.p_projection * alpha_q)
            grad_hidden = grad.to(hidden.dtype)
        if ctx.needs_input_grad[1] and will_run(ctx.weight_node):
            logits = LinearLogits(hidden, weight, bias, mm_dtype)
            if request.sink is not None:
                grad = _sink_gradient(request, logits, alpha_p, alpha_q)
            else:
                grad = _weight_gradient(request, logits, alpha_p, alpha_q)
            for j in range(ids.shape[1]):
                grad.index_add_(0, ids[:, j], h * coefs[:, j, None])
            if request.sink is not None:
                request.sink = None  # used up: a second backward makes its own gradient
                # the gradient is in weight.grad already; the backward still hands one on (DDP
                # reduces the weight once its accumulation has run), a zero that takes no memory
                grad_weight = weight.new_zeros(()).expand(weight.shape)
            else:
                grad_weight = grad.to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad = torch.zeros(bias.shape, dtype=dtype, device=bias.device)
            if summary.p_sum is not None:
                grad.add_(summary.p_sum * alpha_p)
            if summary.q_sum is not None:
                grad.add_(summary.q_sum * alpha_q)
            grad.index_add_(0, ids.reshape(-1), coefs.reshape(-1))
            grad_bias = grad.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _sink_gradient(
    request: _Request, logits: LinearLogits, alpha_p: Tensor, alpha_q: Tensor
) -> Tensor:
    """The sink's gradient, its dense part (added in the forward with the predicted
    coefficients) corrected where the backward's coefficients differ by more than rounding:
    one more pass makes the reductions for the difference."""
    grad = request.sink_grad
    if request.sink.weight.grad is not grad:
        raise RuntimeError(
            "the weight's .grad was replaced between the pass that added into it and the "
            "pass's backward"
        )
    tolerance = 16 * torch.finfo(grad.dtype).eps
    deltas = []
    for actual, predicted in zip((alpha_p, alpha_q), request.predicted, strict=True):
        actual = float(actual)
        near = abs(actual - predicted) <= tolerance * max(abs(actual), abs(predicted))
        deltas.append(0.0 if near else actual - predicted)  # inf or nan: carried into grad
    if any(deltas):
        summary = request.summary
        reference = None if request.own_softmax else request.reference
        summary = linear_pass(
            logits,
            None,
            softmax=summary.p_projection is not None,
            reference=reference,
            gradients=True,
            into=(grad, *deltas),
        )
    return grad


def _weight_gradient(
    request: _Request, logits: LinearLogits, alpha_p: Tensor, alpha_q: Tensor
) -> Tensor:
    """``alpha_p sum_t p_t h_t^T + alpha_q sum_t q_t h_t^T``, formed in the buffer of the
    pass's first reduction: the gradient's own buffer is the only weight-sized one, as in a
    dense backward. The reductions are used up; a second backward through the weight (fused
    forward differences with several draws) makes them again with one more pass."""
    summary = request.summary
    if summary.p_outer is None and summary.q_outer is None:
        with_p = summary.p_projection is not None
        reference = None if request.own_softmax else request.reference
        summary = linear_pass(logits, None, softmax=with_p, reference=reference, gradients=True)
    outers = [
        (o, a) for o, a in ((summary.p_outer, alpha_p), (summary.q_outer, alpha_q)) if o is not None
    ]
    if not outers:  # neither p nor q enters the gradient (no labels, no draws)
        return torch.zeros(logits.weight.shape, dtype=alpha_p.dtype, device=alpha_p.device)
    grad = outers[0][0].mul_(outers[0][1])
    for outer, alpha in outers[1:]:
        grad.addcmul_(outer, alpha)
    request.summary.p_outer = request.summary.q_outer = None
    return grad


def linear_scored_ce(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The CE of the output projection ``z_t = W h_t (+ b)`` at the scored positions
    ``CE = sum_t (lse_t - z_t[y_t])`` and the step's metrics, from one :func:`linear_pass`
    (no (N, V) logits; the backward projects nothing), the matmul in the autocast dtype when
    autocast is on (as the model's own ``lm_head``), the softmax in float32 or wider.

    Hand-written beside ``torch.nn.functional.linear_cross_entropy``: that returns the CE alone
    (not the entropy and accuracy that the step logs) and is not in every torch this package
    supports (>= 2.11).

    Args:
        hidden: (N, d) the final hidden states at the scored positions, with graph.
        weight: (V, d) the output projection's weight; ``bias`` (V,) or ``None``.
        targets: (N,) the next-token labels.

    Returns:
        The CE summed (float32, float64 for float64 inputs) and the statistics (4,) (tokens,
        entropy, argmax-correct count, CE), float64, detached.
    """
    logits = linear_logits(hidden, weight, bias)
    ce, _, stats = linear_terms(logits, None, targets, None, statistics=True)
    return ce, stats
