"""Curvature of a loss w.r.t. the input embeddings: Hessian-vector products and Fisher traces.

Torch only. ``X`` (B, L, d) are the embeddings, ``loss(X)`` a scalar (the mean cross-entropy of
``docs/method.md``), ``H_X = d^2 loss / dX^2`` (D x D, ``D = B L d``).

* :class:`EmbeddingHVP` gives ``v -> H_X v`` by double backward (Pearlmutter's trick):
  ``H_X v = grad_X <grad_X loss(X), v>``. The first gradient is taken once with
  ``create_graph=True``; each product is then one backward pass through that graph. It needs a
  model whose operations are twice differentiable (eager attention or SDPA's math kernel).
* :func:`fisher_trace` estimates ``Tr(F_X)``, the Gauss-Newton part of ``H_X``, by the token-F
  penalty of :mod:`fishertune.penalties`: with ``y'_t ~ p_t`` and ``v = grad_X sum_t M_t log
  p_t[y'_t]``, ``E||v||^2 = sum_t M_t Tr(F_X^(t))`` (cross-position terms vanish in expectation).
  ``reduction="mean"`` divides by ``N``, which makes it comparable with the Hessian of a *mean*
  cross-entropy: ``H_X = (1/N) sum_t H_X^(t)`` and its Gauss-Newton part is
  ``(1/N) sum_t F_X^(t)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fishertune.estimators.trace import TraceEstimate
from fishertune.penalties import Reduction, sample_targets, token_fisher

__all__ = ["EmbeddingHVP", "embedding_hvp", "fisher_trace"]


class EmbeddingHVP:
    """Hessian-vector product ``v -> H_X v`` of a scalar loss with respect to its input ``X``.

    Built from a loss whose graph reaches ``embeds`` (use :meth:`from_loss` when the forward pass
    is shared with something else, e.g. :func:`fisher_trace`), or by :func:`embedding_hvp` from a
    loss function. Calling the object returns ``H_X v`` with ``v``'s shape and ``embeds``' dtype.

    Attributes:
        embeds: (B, L, d) the point ``X`` (a leaf requiring grad).
        loss: the scalar loss at ``X`` (with graph).
        gradient: (B, L, d) ``grad_X loss`` (with graph, for the second backward).
        num_matvecs: products computed so far.
    """

    def __init__(self, loss: Tensor, embeds: Tensor, gradient: Tensor) -> None:
        self.loss = loss
        self.embeds = embeds
        self.gradient = gradient
        self.num_matvecs = 0

    @classmethod
    def from_loss(cls, loss: Tensor, embeds: Tensor) -> EmbeddingHVP:
        """Take ``grad_X loss`` with ``create_graph=True``; ``loss`` must have been computed from
        ``embeds``, which must require grad."""
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        if not embeds.requires_grad:
            raise ValueError("embeds must require grad and be the input the loss was computed from")
        (gradient,) = torch.autograd.grad(loss, embeds, create_graph=True)
        return cls(loss, embeds, gradient)

    def __call__(self, vector: Tensor) -> Tensor:
        """``H_X v = grad_X <grad_X loss, v>`` for ``v`` of ``embeds``' shape."""
        if vector.shape != self.embeds.shape:
            raise ValueError(
                f"vector has shape {tuple(vector.shape)}, expected {tuple(self.embeds.shape)}"
            )
        (product,) = torch.autograd.grad(
            self.gradient,
            self.embeds,
            grad_outputs=vector.to(self.gradient.dtype),
            retain_graph=True,
            # A loss that is piecewise linear in X has no path from the gradient back to X.
            allow_unused=True,
        )
        self.num_matvecs += 1
        if product is None:
            return torch.zeros_like(self.embeds)
        return product.detach()


def embedding_hvp(loss_fn: Callable[[Tensor], Tensor], embeds: Tensor) -> EmbeddingHVP:
    """Hessian-vector product of ``loss_fn`` at ``embeds``: returns ``v -> H_X v``.

    ``H_X = d^2 loss_fn(X) / dX^2`` at ``X = embeds``, computed by double backward
    (``H v = grad_X <grad_X loss, v>``). ``embeds`` is detached and made a leaf, so any graph it
    carries is left alone.

    Args:
        loss_fn: ``X (B, L, d) -> scalar``, twice differentiable.
        embeds: (B, L, d) the point of expansion.

    Example::

        >>> X = torch.randn(2, 3, dtype=torch.float64)
        >>> hvp = embedding_hvp(lambda x: (x**3).sum(), X)
        >>> torch.allclose(hvp(torch.ones_like(X)), 6 * X)  # H = diag(6 x)
        True
    """
    leaf = embeds.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(leaf)
        return EmbeddingHVP.from_loss(loss, leaf)


def fisher_trace(
    embeds: Tensor,
    logits: Tensor,
    label_mask: Tensor,
    *,
    draws: int,
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> TraceEstimate:
    """Monte-Carlo ``Tr(F_X)`` from the token-F estimator, one model draw ``y' ~ p`` per sample.

    Sample ``k``: ``||grad_X sum_t M_t log p_t[y'_{t,k}]||^2`` divided by ``N`` for ``"mean"``.
    Its expectation is exactly ``(1/N) sum_t M_t Tr(F_X^(t))`` (``"sum"``: without ``1/N``),
    ``F_X^(t) = E_{y~p_t}[grad_X log p_t[y] grad_X log p_t[y]^T]``. Each draw costs one backward
    pass (``create_graph=False``: no graph is kept).

    Args:
        embeds: (B, L, d) embeddings requiring grad.
        logits: (B, L, V) computed from ``embeds``; the graph is retained for further use.
        label_mask: (B, L) bool, aligned with the logits.
        draws: number of samples ``K``.
        reduction: ``"mean"`` (per scored token, matching a mean CE loss) or ``"sum"``.
        generator: makes the draws reproducible (on the logits' device).
        progress: called with 1 after each draw.

    Returns:
        :class:`TraceEstimate` over the ``K`` draws.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    # All draws at once (same distribution as separate calls), then one penalty per draw so that
    # each sample is kept and the standard error can be reported.
    targets = sample_targets(logits, label_mask, samples=draws, generator=generator)  # (N, K)
    values = []
    for k in range(draws):
        value = token_fisher(
            embeds,
            logits,
            label_mask,
            reduction=reduction,
            create_graph=False,
            targets=targets[:, k : k + 1],
        )
        values.append(float(value))
        if progress is not None:
            progress(1)
    return TraceEstimate.from_samples(values)
