"""Parameter gradients of the Fisher-trace penalty: exact double backward and finite differences.

Torch and the math modules only: the functions here never see a trainer, an accelerator or a
transformers model. The caller supplies the model through :class:`Passes` (a forward that returns
the logits at the embeddings shifted by ``s``, and a backward of a partial loss), and gets back the
penalty's value with the parameter gradients either accumulated already or left in the returned
loss for the caller's own backward. So the numerics can be read and tested on any differentiable
function of the embeddings (``tests/test_penalty_grad.py`` uses float64 micro models).

Notation (``docs/method.md``, :mod:`fishertune.penalties`): embeddings ``X`` (B, L, d), ``m`` draws
``y'`` per scored position, ``g_s(X)`` the sampled log-likelihood of draw ``s``
(:func:`~fishertune.penalties.fisher_objective`), ``v_s = grad_X g_s``, and the penalty summed over
tokens ``S = (1/m) sum_s ||v_s||^2`` (the caller divides by its normalizer ``N``).

* exact (:func:`fishertune.penalty_estimators.exact_penalty`): ``S`` with the graph of ``v``
  kept (``create_graph``), so one backward of ``CE + lambda S`` differentiates it (double
  backward).
* finite differences (:func:`fd_penalty_loss`): with ``v`` held constant,
  ``grad_theta ||v||^2 = 2 d/dh grad_theta g(X + h v)|_0``, approximated by
  ``(2/h) [grad_theta g(X + h v) - grad_theta g(X)]`` (forward, error O(h)) or
  ``(1/h) [grad_theta g(X + h v) - grad_theta g(X - h v)]`` (central, O(h^2)); first-order autograd
  only, with ``h = h_rel ||X|| / ||v||`` (:func:`~fishertune.penalties.fd_step_size`). logit-F's
  ``p`` stays the unperturbed one in every shifted evaluation.

Two estimators of the penalty's gradient (``estimator``):

* ``"paper"``: ``y'`` is treated as a constant target, so the gradient is
  ``(1/m) sum_s grad_theta ||v_s||^2``. Its expectation is ``E[grad_theta ||s_y'||^2]``, which
  misses the score-function half of ``grad_theta E[||s_y'||^2] = grad_theta Tr(F_X)``.
* ``"unbiased"``: adds that half, ``E[||s_y'||^2 grad_theta log p(y'|X)]``, per row (the draws of
  different rows are independent and ``||v||^2`` is a sum of rows' terms), with a leave-one-out
  baseline over the ``m >= 2`` draws (:func:`score_function_term`). Its expectation is
  ``grad_theta E[R]`` exactly.

Per-position weights ``w`` (B, L) (``position_weights``) turn ``||v||^2`` into
``sum_{b,l} w_bl ||v_bl||^2``: the coefficient that matches NEFTune's noise row by row
(``w = a^2 / 6`` with the noise's own half-width ``a``). In fd mode the shift is then along
``u = w v``: ``d/dh g(X + h u)|_0 = <v, w v>`` and ``grad_theta <v, w v> = 2 (dv/dtheta)^T w v``.

The Hessian-trace penalty (Hutchinson probes, exact and by second differences) is in
:mod:`fishertune.hessian_grad`, on the same :class:`Passes`.

Penalizing ``k`` of ``B`` rows (:func:`penalty_rows`) and multiplying by ``B / k`` is unbiased for
the whole batch's penalty: the rows' penalties add up (``v`` of a row depends on that row only),
and each row is in the chosen subset with probability ``k / B``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from fishertune.penalties import (
    FDScheme,
    Kind,
    fd_step_size,
    fd_surrogate,
    label_mask_from_labels,
    penalty_from_direction,
    scored_targets,
)
from fishertune.penalty_estimators import leave_one_out, row_squared_norms, score_term
from fishertune.vocab import Logits, WeightSink, frozen_reference, scored_terms

__all__ = [
    "ESTIMATORS",
    "FDSettings",
    "Passes",
    "PenaltyLoss",
    "accumulate_gradients",
    "fd_penalty_loss",
    "penalty_rows",
]

Estimator = Literal["paper", "unbiased"]
ESTIMATORS = ("paper", "unbiased")

Forward = Callable[[Tensor | None], tuple[Logits, Tensor]]
"""``forward(shift) -> (logits (B, L, V), embeds (B, L, d))``: the model's logits with its input
embeddings replaced by ``X + shift`` (``shift=None``: ``X`` itself), and the embeddings the model
saw (with their graph). The logits may be :class:`fishertune.vocab.LinearLogits` (the hidden
states and the output projection, never (N, V)) for :func:`fd_penalty_loss` and
:func:`hessian_fd_loss`. Every call must draw the same dropout masks, or a difference of two
forwards would be mask noise divided by ``h``."""

Backward = Callable[[Tensor], None]
"""``backward(part)``: backpropagate this partial loss now, accumulating into the parameters'
``.grad`` (the caller applies its own loss scaling), without reducing gradients across processes:
the final part, returned by :func:`fd_penalty_loss`, carries the reduction."""


@dataclass
class Passes:
    """What the penalty engine needs from the model and the training loop.

    Attributes:
        forward: see :data:`Forward`.
        backward: see :data:`Backward`; ``None`` backpropagates nothing early (joint mode: one
            loss holding every pass is returned, and all graphs stay in memory until then).
        no_sync: a context under which forwards and backwards before the last one run (DDP's
            ``no_sync``): gradients are reduced once, by the final backward.
        on_scored: called once with ``(statistics (4,), vocab_size)`` at the unperturbed ``X``,
            for metrics (:class:`fishertune.vocab.ScoredTerms`: tokens, entropy, accuracy, CE).
        params: the trainable parameters; only for ``FDSettings.fused``, which accumulates
            ``-(2/h) grad_theta g(X)`` into their ``.grad`` by hand.
        before_last: called (split mode) before the forward of the part left to the caller, so
            that the caller can route the gradients it held back from the earlier backwards into
            that part's backward (the embedding table's, see
            :class:`~fishertune.noise.EmbeddingCapture`).
    """

    forward: Forward
    backward: Backward | None = None
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    on_scored: Callable[[Tensor, int], None] | None = None
    params: Sequence[Tensor] = field(default_factory=list)
    before_last: Callable[[], None] | None = None


@dataclass(frozen=True)
class FDSettings:
    """Finite-difference options (``FisherSFTConfig``'s ``penalty_fd_*``).

    Attributes:
        scheme: ``"forward"`` (m + 1 forwards, error O(h)) or ``"central"`` (2m + 1, O(h^2)).
        relative_step: ``h_rel``; ``None`` takes :data:`~fishertune.penalties.DEFAULT_FD_STEP`
            for ``compute_dtype``.
        compute_dtype: the dtype the model computes in (autocast's), which sets the default step.
        fused: take the CE of the penalized rows at the shifted points instead of at ``X``
            (``CE(X + h v) = CE(X) + O(h)``; the central pair's mean is O(h^2) off), so no
            backward of CE runs at ``X``: for forward differences one backward of ``g`` gives both
            ``v`` and ``grad_theta g(X)``, accumulated by hand once ``h`` (which needs ``||v||``)
            is known; for central differences only ``v`` is needed. Saves one backward pass. Needs
            ``Passes.backward`` and gradients that a hand ``p.grad += x`` accumulates as a
            backward would (no loss scaler, no sharded gradients).
    """

    scheme: FDScheme = "forward"
    relative_step: float | None = None
    compute_dtype: torch.dtype | None = None
    fused: bool = False


@dataclass
class PenaltyLoss:
    """What a penalty pass leaves to the caller.

    Attributes:
        loss: the part still to backpropagate (everything in joint mode, the last pass in split
            mode), valued at ``value``.
        value: ``(CE + weight * S) / normalizer`` at the unperturbed ``X``, detached: the
            objective of these rows, whatever the surrogate's own value.
        squared: ``S = (1/m) sum_s ||v_s||^2`` (float32 or wider, detached), weighted by the
            position weights when given.
        unweighted: with position weights, ``S`` without them (detached); else ``None``.
    """

    loss: Tensor
    value: Tensor
    squared: Tensor
    unweighted: Tensor | None = None


def penalty_rows(
    batch_size: int, fraction: float, generator: torch.Generator, device: torch.device
) -> Tensor:
    """Sorted indices of the ``ceil(fraction * B)`` rows to penalize (at least one), uniform
    over the subsets of that size; all rows for ``fraction >= 1``. Multiply the rows' penalty by
    ``B / k`` for an unbiased estimate of the whole batch's."""
    if fraction >= 1.0:
        return torch.arange(batch_size, device=device)
    count = max(1, math.ceil(fraction * batch_size))
    return torch.randperm(batch_size, generator=generator)[:count].sort().values.to(device)


@torch.no_grad()
def accumulate_gradients(
    params: Sequence[Tensor], grads: Sequence[Tensor | None], scale: float
) -> None:
    """``p.grad += scale * grad``, as a backward of ``scale * loss`` would accumulate it."""
    for param, grad in zip(params, grads, strict=True):
        if grad is None:
            continue
        if param.grad is None:
            param.grad = (grad * scale).to(param.dtype)
        else:
            param.grad.add_(grad.to(param.grad.dtype), alpha=scale)


def _directions(
    passes: Passes, g: Tensor, embeds: Tensor, fused: bool, with_params: bool
) -> tuple[list[Tensor], list[list[Tensor | None]]]:
    """``v_s = grad_X g_s`` (detached) of ``g(X)`` (m,), and with ``with_params`` (fused forward
    differences) ``grad_theta g_s(X)`` from the same backward. The graph is freed after the
    last draw when nothing else backpropagates through it (fused)."""
    directions, g_grads = [], []
    for s in range(g.shape[0]):
        last_draw = s == g.shape[0] - 1
        if with_params:
            v, *grads = torch.autograd.grad(
                g[s], [embeds, *passes.params], retain_graph=not last_draw, allow_unused=True
            )
            g_grads.append(grads)
        else:
            keep = not fused or not last_draw  # the unfused CE backward needs the graph
            (v,) = torch.autograd.grad(g[s], embeds, retain_graph=keep)
        directions.append(v.detach())  # (B, L, d)
    return directions, g_grads


def fd_penalty_loss(
    kind: Kind,
    passes: Passes,
    labels: Tensor,
    targets_for: Callable[[Tensor, Tensor], Tensor],
    *,
    weight: float,
    normalizer: Tensor,
    settings: FDSettings,
    position_weights: Tensor | None = None,
    estimator: Estimator = "paper",
) -> PenaltyLoss:
    """CE plus ``weight * S`` over a batch, with the penalty's gradient by finite differences.

    The loss is ``(CE + weight * S) / normalizer``; its parameter gradient is CE's plus
    ``weight / (m normalizer)`` times the surrogate's (:func:`~fishertune.penalties.fd_surrogate`).
    With ``passes.backward`` each pass is backpropagated before the next forward runs (one graph
    in memory at a time) and the last pass is returned; without it, one loss over all passes.

    Args:
        passes: the model (see :class:`Passes`).
        labels: (B, L) with -100 on unscored tokens.
        targets_for: ``(logits, label_mask) -> (N, m)`` draws (``sample_targets`` with the
            caller's generator).
        weight: the penalty's coefficient (times a row fraction's rescale).
        normalizer: divides CE and penalty alike (the caller's token count).
        settings: scheme, step and the fused option.
        position_weights: (B, L) ``w`` of ``S = (1/m) sum_s sum_bl w_bl ||v_{s,bl}||^2``
            (``None``: 1); the shifts are then along ``w v``.
        estimator: ``"unbiased"`` adds :func:`score_function_term` (``m >= 2``): in the CE's
            backward at ``X``, or (fused) at the shifted points, ``O(h)`` off (``O(h^2)`` for the
            central pair) as the fused CE is.

    Returns:
        The loss still to backpropagate, the objective's value and ``S``.
    """
    run = _FiniteDifference(kind, passes, labels, settings, weight, normalizer)
    run.position_weights, run.unbiased = position_weights, estimator == "unbiased"
    value, squared = run.unperturbed_pass(targets_for)
    run.shifted_passes()
    loss = sum(run.joint[1:], run.joint[0])
    return PenaltyLoss(loss - loss.detach() + value, value, squared, run.unweighted)


class _FiniteDifference:
    """The state one :func:`fd_penalty_loss` call shares between its passes."""

    def __init__(
        self,
        kind: Kind,
        passes: Passes,
        labels: Tensor,
        settings: FDSettings,
        weight: float,
        normalizer: Tensor,
    ) -> None:
        self.kind, self.passes, self.labels, self.settings = kind, passes, labels, settings
        self.weight, self.normalizer = weight, normalizer
        self.split = passes.backward is not None
        self.fused = settings.fused and self.split
        self.forward_scheme = settings.scheme == "forward"
        self.label_mask = label_mask_from_labels(labels)
        self.next_tokens = scored_targets(labels, self.label_mask)
        self.joint: list[Tensor] = []  # the parts left for the caller's backward
        self.position_weights: Tensor | None = None
        self.unbiased = False
        self.score_weights: Tensor | None = None  # (m, B) leave-one-out weights (fused)
        self.unweighted: Tensor | None = None  # S without the position weights
        self.scale: float | None = None  # what the backwards multiply a part by (loss scaling)

    def finish(self, part: Tensor, last: bool) -> None:
        if self.split and not last:
            # a zero that measures the backward's own scaling (a loss scaler, accumulation):
            # the shifted passes predict their gradients' coefficients with it (weight_sink)
            probe = torch.zeros((), dtype=part.dtype, device=part.device, requires_grad=True)
            self.passes.backward(part + probe)
            if probe.grad is not None:
                self.scale = float(probe.grad)
        else:
            self.joint.append(part)

    def weight_sink(self, logits: Logits, ce_coef: float, g_coef: float) -> WeightSink | None:
        """Split mode, once a backward has measured its scale: the output projection's weight,
        whose gradient the pass at these logits adds its dense part to in its forward
        (:class:`~fishertune.vocab_pass.WeightSink`: no second weight-sized buffer). The
        coefficients are the part's ``d part / d CE`` and ``d part / d g_s``, times that scale."""
        weight = getattr(logits, "weight", None)
        if not self.split or self.scale is None or weight is None:
            return None
        return WeightSink(weight, self.scale * ce_coef, self.scale * g_coef)

    def unperturbed_pass(
        self, targets_for: Callable[[Tensor, Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The forward at ``X``: CE, draws, ``v = grad_X g`` and the steps; the ``-(2/h) g(X)``
        term (or, fused, its gradient by hand). Returns the objective's value and ``S``.

        CE, ``g`` and the metrics share one log-sum-exp per position, read chunk by chunk
        (:func:`fishertune.vocab.scored_terms`); logit-F's ``p_ref`` is kept for the shifted
        passes (:func:`fishertune.vocab.frozen_reference`: (N, V), half-precision logits, or the
        (N, d) hidden states it is projected from again)."""
        passes, settings, label_mask = self.passes, self.settings, self.label_mask
        with passes.no_sync() if self.split else contextlib.nullcontext():
            logits, embeds = passes.forward(None)
            self.targets = targets_for(logits, label_mask)
            # logit-F's p_ref here is softmax(z) of these logits, computed by the chunks as they
            # go: bit for bit the frozen_reference kept below for the shifted passes
            terms = scored_terms(
                logits,
                label_mask,
                self.next_tokens,
                self.targets,
                kind=self.kind,
                statistics=passes.on_scored is not None,
                # the unbiased estimator's log p(y' | X) per row and draw, sharing the CE's backward
                row_log_likelihood=self.unbiased and not self.fused,
            )
            ce_sum, g = terms.ce, terms.g
            if passes.on_scored is not None:
                passes.on_scored(terms.statistics, logits.shape[-1])
            with_params = self.fused and self.forward_scheme
            self.directions, g_grads = _directions(passes, g, embeds, self.fused, with_params)
            weights = self.position_weights
            if weights is None and not self.unbiased:
                squared = penalty_from_direction(torch.stack(self.directions), label_mask, "sum")
            else:
                rows = torch.stack([row_squared_norms(v, weights) for v in self.directions])
                squared = rows.sum() / rows.shape[0]
            if weights is not None:
                # the penalty without the weights, for the logs; then shift along w v
                unweighted = sum(row_squared_norms(v).sum() for v in self.directions)
                self.unweighted = (unweighted / len(self.directions)).detach()
                self.directions = [v * weights.to(v.dtype)[..., None] for v in self.directions]
            value = (ce_sum.detach() + self.weight * squared) / self.normalizer
            # after the backward at X: its gradient buffer is freed before this one is made. p_ref
            # in the dtype g(X) was computed in (float64 stays float64): a float32 p_ref at
            # X + h v against g(X)'s own float64 one would put its rounding, about 1e-7 |z|, into
            # g(X + h v) - g(X) and so 1e-7 |z| / h into the fd gradient
            self.reference_probs = (
                frozen_reference(logits, label_mask) if self.kind == "logit" else None
            )
            self.steps = [
                fd_step_size(
                    embeds,
                    v,
                    relative_step=settings.relative_step,
                    scheme=settings.scheme,
                    dtype=settings.compute_dtype,
                )
                for v in self.directions
            ]
            self.draw_weight = self.weight / (len(self.directions) * self.normalizer)
            if self.fused and self.unbiased:
                self.score_weights = leave_one_out(rows)
            if self.fused:
                for grads, h in zip(g_grads, self.steps[: len(g_grads)], strict=True):  # forward
                    if h > 0:
                        scale = -self.draw_weight * (2.0 / h)
                        accumulate_gradients(passes.params, grads, scale)
            else:
                part = ce_sum / self.normalizer
                if self.unbiased:  # shares the CE's backward (one chunked pass)
                    score = score_term(terms.row_log_likelihood, rows)
                    part = part + self.weight / self.normalizer * score
                if self.forward_scheme:
                    # the -(2/h) g(X) half of fd_surrogate; the +(2/h) g(X + h v) half is below
                    reference = sum(2.0 / h * g[s] for s, h in enumerate(self.steps) if h > 0)
                    part = part - self.draw_weight * reference
                self.finish(part, last=False)
        return value.detach(), squared.detach()

    def shifted_passes(self) -> None:
        """Forwards at ``X + h v`` (and ``X - h v`` for central differences), one per draw and
        sign; the last one's part is left to the caller (it carries the gradient sync)."""
        signs = (1.0,) if self.forward_scheme else (1.0, -1.0)
        shifts = [(s, sign) for s in range(len(self.directions)) for sign in signs]
        for index, (s, sign) in enumerate(shifts):
            # every pass runs, even with h = 0 (v = 0), so the last one can carry the sync
            last = index == len(shifts) - 1
            step = self.steps[s]
            if last and self.split and self.passes.before_last is not None:
                self.passes.before_last()
            with self.passes.no_sync() if self.split and not last else contextlib.nullcontext():
                logits, _ = self.passes.forward(sign * step * self.directions[s])
                # d part / d g and d part / d CE of the part below, for the weight's sink
                g_coef = (
                    0.0
                    if step == 0
                    else float(self.draw_weight)
                    * (2.0 / step if self.forward_scheme else sign / step)
                )
                ce_coef = 1.0 / float(self.normalizer * len(shifts)) if self.fused else 0.0
                sink = None
                if self.score_weights is None:  # the rows' log-likelihood keeps its own kernel
                    sink = self.weight_sink(logits, ce_coef, g_coef)
                # fused: the CE of these rows at the shifted point, from the same log-sum-exp
                terms = scored_terms(
                    logits,
                    self.label_mask,
                    self.next_tokens if self.fused else None,
                    self.targets[:, s : s + 1],
                    kind=self.kind,
                    reference=self.reference_probs,
                    row_log_likelihood=self.score_weights is not None,
                    weight_sink=sink,
                )
                g_shift = terms.g
                zero = torch.zeros_like(g_shift)
                if self.forward_scheme:
                    part = self.draw_weight * fd_surrogate(g_shift, zero, step)
                else:  # central: (1/h)(g(X + h v) - g(X - h v)), one sign per pass
                    surrogate = fd_surrogate(g_shift, zero, step, scheme="central")
                    part = self.draw_weight * sign * surrogate
                if self.fused:
                    part = part + terms.ce / (self.normalizer * len(shifts))
                    if self.score_weights is not None:  # draw s's score term, at X +- h u_s
                        rows = terms.row_log_likelihood[:, 0]  # (B,)
                        term = (self.score_weights[s].to(rows.dtype) * rows).sum()
                        term = term / (len(self.directions) * len(signs))
                        part = part + self.weight / self.normalizer * (term - term.detach())
                self.finish(part, last=last)
            del logits
