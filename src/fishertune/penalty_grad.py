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

* exact (:func:`exact_penalty`): ``S`` with the graph of ``v`` kept (``create_graph``), so one
  backward of ``CE + lambda S`` differentiates it (double backward).
* finite differences (:func:`fd_penalty_loss`): with ``v`` held constant,
  ``grad_theta ||v||^2 = 2 d/dh grad_theta g(X + h v)|_0``, approximated by
  ``(2/h) [grad_theta g(X + h v) - grad_theta g(X)]`` (forward, error O(h)) or
  ``(1/h) [grad_theta g(X + h v) - grad_theta g(X - h v)]`` (central, O(h^2)); first-order autograd
  only, with ``h = h_rel ||X|| / ||v||`` (:func:`~fishertune.penalties.fd_step_size`). logit-F's
  ``p`` stays the unperturbed one in every shifted evaluation.

Penalizing ``k`` of ``B`` rows (:func:`penalty_rows`) and multiplying by ``B / k`` is unbiased for
the whole batch's penalty: the rows' penalties add up (``v`` of a row depends on that row only),
and each row is in the chosen subset with probability ``k / B``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fishertune.penalties import (
    FDScheme,
    Kind,
    fd_step_size,
    fd_surrogate,
    fisher_objective,
    label_mask_from_labels,
    penalty_from_direction,
    scored_cross_entropy,
    scored_log_probs,
)

__all__ = [
    "FDSettings",
    "Passes",
    "PenaltyLoss",
    "accumulate_gradients",
    "exact_penalty",
    "fd_penalty_loss",
    "penalty_rows",
]

Forward = Callable[[Tensor | None], tuple[Tensor, Tensor]]
"""``forward(shift) -> (logits (B, L, V), embeds (B, L, d))``: the model's logits with its input
embeddings replaced by ``X + shift`` (``shift=None``: ``X`` itself), and the embeddings the model
saw (with their graph). Every call must draw the same dropout masks, or a difference of two
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
        on_scored: called once with ``(log_probs (N, V), targets (N,), label_mask (B, L))`` at the
            unperturbed ``X``, for metrics (entropy, accuracy); log-probs in float32 or wider.
        params: the trainable parameters; only for ``FDSettings.fused``, which accumulates
            ``-(2/h) grad_theta g(X)`` into their ``.grad`` by hand.
    """

    forward: Forward
    backward: Backward | None = None
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    on_scored: Callable[[Tensor, Tensor, Tensor], None] | None = None
    params: Sequence[Tensor] = field(default_factory=list)

    def scored_ce(self, logits: Tensor, labels: Tensor, label_mask: Tensor) -> Tensor:
        """CE summed over the scored tokens (float32, with graph); reports to ``on_scored``."""
        log_probs, targets = scored_log_probs(logits, labels, label_mask)  # (N, V), (N,)
        if self.on_scored is not None:
            self.on_scored(log_probs.detach(), targets, label_mask)
        return -log_probs.gather(1, targets[:, None]).sum()


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
        squared: ``S = (1/m) sum_s ||v_s||^2`` (float32 or wider, detached).
    """

    loss: Tensor
    value: Tensor
    squared: Tensor


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


def exact_penalty(
    kind: Kind, embeds: Tensor, logits: Tensor, label_mask: Tensor, targets: Tensor
) -> Tensor:
    """``S = (1/m) sum_s ||v_s||^2`` with the graph of every ``v_s`` (double backward).

    Args:
        embeds: (B, L, d) ``X``, the input ``logits`` were computed from.
        logits: (B, L, V).
        label_mask: (B, L) bool: the penalized scored positions.
        targets: (N, m) draws at those positions (:func:`~fishertune.penalties.sample_targets`).

    Returns:
        Scalar, float32 (float64 for float64 logits): 0 without a scored position.
    """
    if targets.shape[0] == 0:
        return embeds.new_zeros((), dtype=torch.promote_types(embeds.dtype, torch.float32))
    # token-F and logit-F share v; the functions differ only by g, which fisher_objective picks
    g = fisher_objective(kind, logits, label_mask, targets)  # (m,)
    dtype = torch.promote_types(embeds.dtype, torch.float32)  # float32 at least, as g
    squared = embeds.new_zeros((), dtype=dtype)
    for s in range(g.shape[0]):
        (v,) = torch.autograd.grad(g[s], embeds, create_graph=True, retain_graph=True)
        squared = squared + v.to(dtype).pow(2).sum()
    return squared / g.shape[0]


def _directions(
    kind: Kind,
    passes: Passes,
    logits: Tensor,
    embeds: Tensor,
    label_mask: Tensor,
    targets: Tensor,
    fused: bool,
    with_params: bool,
) -> tuple[Tensor, list[Tensor], list[list[Tensor | None]]]:
    """``g(X)`` (m,), ``v_s = grad_X g_s`` (detached), and with ``with_params`` (fused forward
    differences) ``grad_theta g_s(X)`` from the same backward. The graph is freed after the
    last draw when nothing else backpropagates through it (fused)."""
    g = fisher_objective(kind, logits, label_mask, targets)  # (m,)
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
    return g, directions, g_grads


def fd_penalty_loss(
    kind: Kind,
    passes: Passes,
    labels: Tensor,
    targets_for: Callable[[Tensor, Tensor], Tensor],
    *,
    weight: float,
    normalizer: Tensor,
    settings: FDSettings,
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

    Returns:
        The loss still to backpropagate, the objective's value and ``S``.
    """
    run = _FiniteDifference(kind, passes, labels, settings, weight, normalizer)
    value, squared = run.unperturbed_pass(targets_for)
    run.shifted_passes()
    loss = sum(run.joint[1:], run.joint[0])
    return PenaltyLoss(loss - loss.detach() + value, value, squared)


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
        self.joint: list[Tensor] = []  # the parts left for the caller's backward

    def finish(self, part: Tensor, last: bool) -> None:
        if self.split and not last:
            self.passes.backward(part)
        else:
            self.joint.append(part)

    def unperturbed_pass(
        self, targets_for: Callable[[Tensor, Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The forward at ``X``: CE, draws, ``v = grad_X g`` and the steps; the ``-(2/h) g(X)``
        term (or, fused, its gradient by hand). Returns the objective's value and ``S``."""
        passes, settings, label_mask = self.passes, self.settings, self.label_mask
        with passes.no_sync() if self.split else contextlib.nullcontext():
            logits, embeds = passes.forward(None)
            ce_sum = passes.scored_ce(logits, self.labels, label_mask)
            self.targets = targets_for(logits, label_mask)
            with_params = self.fused and self.forward_scheme
            g, self.directions, g_grads = _directions(
                self.kind, passes, logits, embeds, label_mask, self.targets, self.fused, with_params
            )
            squared = penalty_from_direction(torch.stack(self.directions), label_mask, "sum")
            value = (ce_sum.detach() + self.weight * squared) / self.normalizer
            # p_ref in the dtype fisher_objective computed g(X) in (float64 stays float64): a
            # float32 p_ref at X + h v against g(X)'s own float64 one would put its rounding,
            # about 1e-7 |z|, into g(X + h v) - g(X) and so 1e-7 |z| / h into the fd gradient
            scored = logits[label_mask].detach()
            self.reference_probs = (
                torch.softmax(scored.to(torch.promote_types(scored.dtype, torch.float32)), -1)
                if self.kind == "logit"
                else None
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
            if self.fused:
                for grads, h in zip(g_grads, self.steps[: len(g_grads)], strict=True):  # forward
                    if h > 0:
                        scale = -self.draw_weight * (2.0 / h)
                        accumulate_gradients(passes.params, grads, scale)
            else:
                part = ce_sum / self.normalizer
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
            with self.passes.no_sync() if self.split and not last else contextlib.nullcontext():
                logits, _ = self.passes.forward(sign * step * self.directions[s])
                g_shift = fisher_objective(
                    self.kind,
                    logits,
                    self.label_mask,
                    self.targets[:, s : s + 1],
                    self.reference_probs,
                )
                zero = torch.zeros_like(g_shift)
                if self.forward_scheme:
                    part = self.draw_weight * fd_surrogate(g_shift, zero, step)
                else:  # central: (1/h)(g(X + h v) - g(X - h v)), one sign per pass
                    surrogate = fd_surrogate(g_shift, zero, step, scheme="central")
                    part = self.draw_weight * sign * surrogate
                if self.fused:
                    ce = scored_cross_entropy(logits, self.labels, self.label_mask)
                    part = part + ce / (self.normalizer * len(shifts))
                self.finish(part, last=last)
            del logits
