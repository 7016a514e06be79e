"""Fisher-trace penalties on the token embeddings: token-F and logit-F.

Torch only. Notation (``docs/method.md``): embeddings ``X`` (B, L, d), logits ``Z = f(X)``
(B, L, V), ``p_t = softmax(z_t)``, a label mask ``M`` (B, L) aligned with the logits (position
``t`` predicts token ``t + 1``), ``N = sum(M)``. For ``m`` draws ``y'_t ~ p_t`` (or
``~ Uniform(V)``) at the scored positions:

* token-F:  ``g(X) = sum_t M_t log p_t[y'_t]``
* logit-F:  ``g(X) = sum_t M_t <z_t(X), onehot(y'_t) - stopgrad(p_t)>``

Both have ``grad_z g = onehot(y') - p`` at the drawn targets, so ``v = grad_X g`` is the same for
both; their parameter gradients differ (logit-F holds ``p`` constant). The penalty is

    ``R = (1/m) sum_samples ||v||^2 / N``      (``reduction="mean"``; ``"sum"`` drops ``/ N``)

and with model sampling ``E[R] = (1/N) sum_t M_t Tr(F_X^(t))``: the cross-position terms of
``||sum_t s_t||^2`` vanish because ``E_{y~p}[grad log p_y] = 0``.

Two ways to get the parameter gradient of ``R``:

* exact (:func:`token_fisher`, :func:`logit_fisher` with ``create_graph=True``): double backward;
* finite difference (:func:`fisher_objective` + :func:`fd_surrogate`): with ``v`` held constant,
  ``grad_theta ||v||^2 ~= (2/h) [grad_theta g(X + h v) - grad_theta g(X)]`` (forward) or
  ``(1/h) [grad_theta g(X + h v) - grad_theta g(X - h v)]`` (central); first-order autograd only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from fishertune.vocab import inverse_cdf, softmax_draws

__all__ = [
    "DEFAULT_FD_STEP",
    "fd_step_size",
    "fd_surrogate",
    "fisher_objective",
    "float64_throughout",
    "label_mask_from_labels",
    "logit_fisher",
    "penalty_from_direction",
    "sample_targets",
    "scored_cross_entropy",
    "scored_log_probs",
    "scored_targets",
    "token_fisher",
]

Kind = Literal["token", "logit"]
Sampling = Literal["model", "uniform"]
Reduction = Literal["mean", "sum"]
FDScheme = Literal["forward", "central"]

IGNORE_INDEX = -100

# Relative fd step ``h = h_rel * ||X|| / ||v||`` by the dtype the model computes in. Forward
# differences in float32 reach ~6e-3 relative gradient error at 1e-4 and the central scheme ~5e-4
# at 3e-4 (benchmarks/overhead.py, 4-layer 256-wide Llama). In half precision a too-small step
# drowns in rounding, so the step is larger there, and only the central scheme is accurate
# enough (forward differences in bfloat16 lose the direction: cosine ~0.6 to the exact gradient).
# float64 (a model that computes in float64 throughout; tests/test_penalty_grad.py measures the
# curve): truncation error h_rel and rounding eps / h_rel cross near sqrt(eps) ~ 1e-8 (forward)
# and eps^(1/3) ~ 1e-6 (central); the steps sit 10x above, on the truncation side, where the
# error is 2e-7 (forward) and 5e-10 (central) on the float64 micro model. A model that rounds to
# float32 inside (transformers' RMSNorm, eager softmax) needs the float32 steps instead: the
# trainer measures which (float64_throughout).
DEFAULT_FD_STEP: dict[tuple[torch.dtype, str], float] = {
    (torch.float64, "forward"): 1e-7,
    (torch.float64, "central"): 1e-5,
    (torch.float32, "forward"): 1e-4,
    (torch.float32, "central"): 3e-4,
    (torch.bfloat16, "forward"): 1e-2,
    (torch.bfloat16, "central"): 3e-2,
    (torch.float16, "forward"): 3e-3,
    (torch.float16, "central"): 1e-2,
}


def label_mask_from_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Scored-position mask aligned with the logits: ``M_t = [labels[t + 1] != ignore_index]``.

    Args:
        labels: (B, L) token ids with ``ignore_index`` on prompt and padding tokens.

    Returns:
        (B, L) bool; the last position is never scored.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def scored_targets(labels: Tensor, label_mask: Tensor) -> Tensor:
    """(N,) the CE's targets ``labels[t + 1]`` at the scored positions, in ``label_mask`` order
    (the order of ``logits[label_mask]``)."""
    return labels[:, 1:][label_mask[:, :-1]]


def scored_log_probs(
    logits: Tensor, labels: Tensor, label_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Log-probabilities at the scored positions and their targets: the next-token CE's inputs.

    Args:
        logits: (B, L, V).
        labels: (B, L) with ``-100`` on unscored tokens.
        label_mask: (B, L) from :func:`label_mask_from_labels` (computed when not given).

    Returns:
        ``log softmax(z_t)`` (N, V) in float32 or wider, and ``labels[t + 1]`` (N,), one row per
        scored position in ``label_mask`` order.
    """
    if label_mask is None:
        label_mask = label_mask_from_labels(labels)
    targets = scored_targets(labels, label_mask)
    scored = logits[label_mask]
    return torch.log_softmax(scored.to(_compute_dtype(scored.dtype)), dim=-1), targets


def scored_cross_entropy(
    logits: Tensor, labels: Tensor, label_mask: Tensor | None = None
) -> Tensor:
    """``CE = -sum_t M_t log p_t[labels_{t+1}]``, summed (not averaged) over scored tokens."""
    log_probs, targets = scored_log_probs(logits, labels, label_mask)
    return -log_probs.gather(1, targets[:, None]).sum()


def sample_targets(
    logits: Tensor,
    label_mask: Tensor,
    *,
    samples: int = 1,
    sampling: Sampling = "model",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``y'_t`` at the scored positions, without gradient.

    ``sampling="model"`` draws ``y' ~ softmax(z_t)`` (computed in float32 whatever the logits'
    dtype); ``"uniform"`` draws ``y' ~ Uniform(V)`` (the paper's ablation).

    Args:
        logits: (B, L, V).
        label_mask: (B, L) bool.

    Returns:
        (N, samples) int64 token ids, one row per scored position in ``label_mask`` order.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not label_mask.any():
        return torch.empty(0, samples, dtype=torch.long, device=logits.device)
    if sampling == "model":
        # chunk by chunk over the scored positions: no (N, V) softmax (fishertune.vocab)
        return softmax_draws(logits, label_mask, samples, generator, _CDF_BLOCK)
    if sampling == "uniform":
        n, vocab = int(label_mask.sum()), logits.shape[-1]
        return torch.randint(vocab, (n, samples), generator=generator, device=logits.device)
    raise ValueError(f"sampling must be 'model' or 'uniform', got {sampling!r}")


_CDF_BLOCK = 256


def _inverse_cdf_draws(
    probs: Tensor, samples: int, generator: torch.Generator | None, block: int = _CDF_BLOCK
) -> Tensor:
    """``samples`` draws per row of ``probs`` (N, V) by inverse CDF
    (:func:`fishertune.vocab.inverse_cdf`), uniforms from ``generator``.

    Returns:
        (N, samples) int64.
    """
    n = probs.shape[0]
    u = torch.rand(n, samples, generator=generator, device=probs.device, dtype=torch.float64)
    return inverse_cdf(probs, u, block)


def fisher_objective(
    kind: Kind,
    logits: Tensor,
    label_mask: Tensor,
    targets: Tensor,
    reference_probs: Tensor | None = None,
) -> Tensor:
    """The sampled log-likelihood ``g(X)`` of token-F or logit-F, one value per draw.

    token-F: ``g_s = sum_t M_t log p_t[y'_{t,s}]``; logit-F:
    ``g_s = sum_t M_t (z_t[y'_{t,s}] - <z_t, p_ref_t>)`` with ``p_ref`` held constant
    (``reference_probs``, or ``softmax(z)`` of these logits, detached). Arithmetic in at least
    float32 (half-precision logits are upcast, float64 ones stay float64). Never builds a
    (B, L, V) one-hot.

    Args:
        logits: (B, L, V) computed from ``X``.
        label_mask: (B, L) bool.
        targets: (N, m) draws from :func:`sample_targets`.
        reference_probs: (N, V) probabilities for logit-F's constant ``p``; pass the unperturbed
            ones when evaluating at a perturbed ``X`` (finite differences).

    Returns:
        (m,) float32 (float64 for float64 logits).
    """
    scored = logits[label_mask]
    scored = scored.to(_compute_dtype(scored.dtype))  # (N, V)
    picked = scored.gather(1, targets)  # (N, m)
    if kind == "token":
        return (picked - torch.logsumexp(scored, dim=-1, keepdim=True)).sum(0)
    if kind == "logit":
        if reference_probs is None:
            reference_probs = torch.softmax(scored.detach(), dim=-1)
        baseline = (scored * reference_probs.detach()).sum(-1, keepdim=True)  # (N, 1)
        return (picked - baseline).sum(0)
    raise ValueError(f"kind must be 'token' or 'logit', got {kind!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 at least, so that half-precision models get a stable penalty; never downcast
    # float64, so that exact checks in float64 stay exact.
    return torch.promote_types(dtype, torch.float32)


def _normalizer(label_mask: Tensor, reduction: Reduction) -> Tensor:
    n = label_mask.sum().to(torch.float32)
    if reduction == "mean":
        return n.clamp(min=1.0)
    if reduction == "sum":
        return torch.ones((), device=label_mask.device)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _check_shapes(embeds: Tensor, logits: Tensor, label_mask: Tensor) -> None:
    if logits.dim() != 3 or embeds.dim() != 3:
        raise ValueError(
            f"expected embeds (B, L, d) and logits (B, L, V), got {tuple(embeds.shape)} "
            f"and {tuple(logits.shape)}"
        )
    if label_mask.shape != logits.shape[:2] or embeds.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"embeds {tuple(embeds.shape)}, logits {tuple(logits.shape)} and label_mask "
            f"{tuple(label_mask.shape)} must agree on (B, L)"
        )
    if label_mask.dtype != torch.bool:
        raise ValueError(f"label_mask must be bool, got {label_mask.dtype}")


def _fisher_penalty(
    kind: Kind,
    embeds: Tensor,
    logits: Tensor,
    label_mask: Tensor,
    *,
    samples: int,
    sampling: Sampling,
    reduction: Reduction,
    generator: torch.Generator | None,
    create_graph: bool,
    targets: Tensor | None,
) -> Tensor:
    _check_shapes(embeds, logits, label_mask)
    normalizer = _normalizer(label_mask, reduction)
    if not embeds.requires_grad:
        raise ValueError("embeds must require grad and be the input the logits were computed from")
    if targets is None:
        targets = sample_targets(
            logits, label_mask, samples=samples, sampling=sampling, generator=generator
        )
    if targets.shape[0] == 0:
        # No scored position: R = 0, still attached to the graph so that a distributed backward
        # sees every parameter.
        return embeds.sum().float() * 0.0
    g = fisher_objective(kind, logits, label_mask, targets)  # (m,)
    total = embeds.new_zeros((), dtype=g.dtype)
    for s in range(g.shape[0]):
        (v,) = torch.autograd.grad(
            g[s], embeds, create_graph=create_graph, retain_graph=True
        )  # (B, L, d)
        total = total + v.to(g.dtype).pow(2).sum()
    return total / (g.shape[0] * normalizer)


def token_fisher(
    embeds: Tensor,
    logits: Tensor,
    label_mask: Tensor,
    *,
    samples: int = 1,
    sampling: Sampling = "model",
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    targets: Tensor | None = None,
) -> Tensor:
    """token-F penalty ``R = (1/m) sum_s ||grad_X sum_t M_t log p_t[y'_{t,s}]||^2 / N``.

    Args:
        embeds: (B, L, d) input embeddings ``X``, requiring grad.
        logits: (B, L, V) computed from ``embeds``.
        label_mask: (B, L) bool, aligned with the logits (see :func:`label_mask_from_labels`).
        samples: ``m``, draws per scored position.
        sampling: ``"model"`` (``y' ~ p``, unbiased for ``Tr(F_X)``) or ``"uniform"``.
        reduction: ``"mean"`` divides by ``N``, ``"sum"`` does not (match the CE loss).
        generator: makes the draws reproducible.
        create_graph: keep the graph of ``v`` so ``R`` backpropagates to the parameters.
        targets: (N, m) explicit draws instead of sampling.

    Returns:
        Scalar ``R``, float32 (float64 for float64 logits); 0 when no position is scored.
    """
    return _fisher_penalty(
        "token",
        embeds,
        logits,
        label_mask,
        samples=samples,
        sampling=sampling,
        reduction=reduction,
        generator=generator,
        create_graph=create_graph,
        targets=targets,
    )


def logit_fisher(
    embeds: Tensor,
    logits: Tensor,
    label_mask: Tensor,
    *,
    samples: int = 1,
    sampling: Sampling = "model",
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    targets: Tensor | None = None,
) -> Tensor:
    """logit-F penalty ``R = (1/m) sum_s ||J^T (onehot(y'_s) - stopgrad(p))||^2 / N``.

    ``J = dZ/dX``; computed as one vector-Jacobian product of
    ``g = sum_t M_t <z_t, onehot(y'_t) - stopgrad(p_t)>``. Same value as :func:`token_fisher`
    for the same draws; its parameter gradient treats ``p`` as a constant. Arguments as in
    :func:`token_fisher`.
    """
    return _fisher_penalty(
        "logit",
        embeds,
        logits,
        label_mask,
        samples=samples,
        sampling=sampling,
        reduction=reduction,
        generator=generator,
        create_graph=create_graph,
        targets=targets,
    )


def penalty_from_direction(direction: Tensor, label_mask: Tensor, reduction: Reduction) -> Tensor:
    """Penalty value ``||v||^2 / N`` (or ``||v||^2`` for ``"sum"``) from ``v`` (m, B, L, d)."""
    squared = direction.to(_compute_dtype(direction.dtype)).pow(2).flatten(1).sum(1).mean()
    return squared / _normalizer(label_mask, reduction)


def fd_step_size(
    embeds: Tensor,
    direction: Tensor,
    *,
    relative_step: float | None = None,
    scheme: FDScheme = "forward",
    dtype: torch.dtype | None = None,
) -> float:
    """Finite-difference step ``h = h_rel * ||X|| / ||v||``.

    The step is relative to the embeddings' scale because RMSNorm makes the model invariant to
    the scale of ``X``: an absolute ``h`` means a different perturbation on every model.
    ``h_rel`` defaults to :data:`DEFAULT_FD_STEP` for ``dtype`` (the model's compute dtype,
    ``embeds.dtype`` if not given) and ``scheme``.
    """
    if relative_step is None:
        key = (dtype or embeds.dtype, scheme)
        if key not in DEFAULT_FD_STEP:
            raise ValueError(f"no default fd step for {key}; pass relative_step")
        relative_step = DEFAULT_FD_STEP[key]
    x_norm = embeds.detach().float().norm()
    v_norm = direction.detach().float().norm()
    if v_norm == 0:
        return 0.0
    return float(relative_step * x_norm / v_norm)


@torch.no_grad()
def float64_throughout(
    forward: Callable[[Tensor | None], tuple[Tensor, Tensor]], relative_shift: float = 1e-9
) -> bool:
    """Whether a model given float64 embeddings keeps float64 arithmetic up to its logits.

    A shift ``delta`` of relative size ``1e-9`` (below float32's resolution, 6e-8) moves the logits
    of a float64 model linearly: ``z(X + 2 delta) - z(X) = 2 (z(X + delta) - z(X))`` to about
    ``1e-6`` relative. A model that rounds to float32 on the way (transformers' ``LlamaRMSNorm``
    and eager softmax upcast to float32 and back) loses the shift, or moves by rounding steps
    that are not linear in it. Finite differences at float64 steps would measure that rounding,
    so such a model takes the float32 steps. ``forward(shift) -> (logits, embeds)`` as
    :data:`fishertune.penalty_grad.Forward` (dense logits); three forwards, no gradient.
    """
    logits, embeds = forward(None)
    if embeds.dtype != torch.float64 or logits.dtype != torch.float64:
        return False
    base = logits.detach()
    del logits
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(2, embeds.shape, generator=generator).to(embeds) * 2 - 1
    shift = signs * (relative_shift * float(embeds.detach().norm()) / float(signs.norm()))
    once = forward(shift)[0].detach() - base
    twice = forward(2 * shift)[0].detach() - base
    moved = float(once.norm())
    return moved > 0 and float((twice - 2 * once).norm()) <= 1e-3 * moved


def fd_surrogate(
    g_plus: Tensor,
    g_reference: Tensor,
    step: float,
    *,
    scheme: FDScheme = "forward",
) -> Tensor:
    """Surrogate whose parameter gradient approximates that of ``sum_s ||v_s||^2``.

    forward: ``S = (2/h) (g(X + h v) - g(X))``; central: ``S = (1/h) (g(X + h v) - g(X - h v))``
    (pass ``g(X - h v)`` as ``g_reference``). Both follow from
    ``d/dh g(X + h v)|_0 = <grad_X g, v> = ||v||^2`` and
    ``grad_theta ||v||^2 = 2 (dv/dtheta)^T v = 2 d/dh grad_theta g(X + h v)|_0``.
    The value of ``S`` approximates ``2 ||v||^2`` and is not the penalty: report
    :func:`penalty_from_direction`. Sum over draws; divide by ``m`` and ``N`` as the penalty does.
    """
    if step == 0:
        return g_plus.sum() * 0.0
    if scheme == "forward":
        return (2.0 / step) * (g_plus - g_reference).sum()
    if scheme == "central":
        return (1.0 / step) * (g_plus - g_reference).sum()
    raise ValueError(f"scheme must be 'forward' or 'central', got {scheme!r}")
