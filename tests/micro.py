"""Micro models whose vocabulary can be enumerated, and exact references built on them.

Everything here is float64 and independent of ``fishertune.penalties``: the references compute the
Fisher trace, the uniform-sampling expectation and the penalty value from dense Jacobians
(``torch.func.jacrev``) over the whole embedding tensor ``X`` (B, L, d), so cross-position
Jacobians are included.

Conventions follow ``docs/method.md``: position ``t`` predicts token ``t + 1``, ``M_t`` is the
label mask aligned with the logits, ``N = sum(M)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

DTYPE = torch.float64
IGNORE_INDEX = -100

LogitsFn = Callable[[Tensor], Tensor]


class LinearSoftmax(nn.Module):
    """Position-wise linear-softmax model: ``X = E[ids]``, ``z_t = W x_t``.

    Parameters: ``embed`` (V, d), ``W`` (V, d). Logits (..., B, L, V) for ``X`` (..., B, L, d).
    """

    def __init__(self, vocab: int = 6, dim: int = 3, *, seed: int = 0, dtype=DTYPE) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, dim, generator=gen, dtype=dtype))
        self.W = nn.Parameter(torch.randn(vocab, dim, generator=gen, dtype=dtype))

    def embeddings(self, input_ids: Tensor) -> Tensor:
        return self.embed[input_ids]  # (B, L, d)

    def logits(self, X: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return X @ self.W.T  # (..., B, L, V)


class CausalMix(nn.Module):
    """Causal model with cross-position mixing and a nonlinearity that honours the attention mask.

    ``h_t = tanh(sum_{s <= t} mask_s c_{t-s} x_s U + b)``, ``z_t = W h_t``.

    The mixing weight depends on the relative position ``t - s`` only and masked positions never
    contribute, so left or right padding leaves the real positions' logits unchanged.
    Parameters: ``embed`` (V, d), ``mix`` (max_len,), ``U`` (d, k), ``b`` (k,), ``W`` (V, k).
    """

    def __init__(
        self,
        vocab: int = 6,
        dim: int = 3,
        hidden: int = 4,
        *,
        max_len: int = 16,
        seed: int = 0,
        dtype=DTYPE,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, dim, generator=gen, dtype=dtype))
        decay = torch.exp(-0.4 * torch.arange(max_len, dtype=dtype))
        self.mix = nn.Parameter(
            decay * (1.0 + 0.5 * torch.randn(max_len, generator=gen, dtype=dtype))
        )
        self.U = nn.Parameter(torch.randn(dim, hidden, generator=gen, dtype=dtype) / dim**0.5)
        self.b = nn.Parameter(0.3 * torch.randn(hidden, generator=gen, dtype=dtype))
        self.W = nn.Parameter(1.5 * torch.randn(vocab, hidden, generator=gen, dtype=dtype))

    def embeddings(self, input_ids: Tensor) -> Tensor:
        return self.embed[input_ids]  # (B, L, d)

    def mixing(self, attention_mask: Tensor) -> Tensor:
        """(B, L, L) weights ``A_bts = mask_bs c_{t-s} [s <= t]``."""
        length = attention_mask.shape[-1]
        pos = torch.arange(length, device=attention_mask.device)
        rel = pos[:, None] - pos[None, :]  # t - s
        causal = self.mix[rel.clamp(min=0)] * (rel >= 0)  # (L, L)
        return causal * attention_mask.to(self.mix.dtype)[:, None, :]

    def logits(self, X: Tensor, attention_mask: Tensor) -> Tensor:
        mixed = torch.einsum("bts,...bsd->...btd", self.mixing(attention_mask), X)
        hidden = torch.tanh(mixed @ self.U + self.b)  # (..., B, L, k)
        return hidden @ self.W.T  # (..., B, L, V)


def label_mask(labels: Tensor) -> Tensor:
    """``M_t = [labels[t + 1] != -100]`` (B, L), written independently of the library."""
    mask = torch.zeros(labels.shape, dtype=torch.bool)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            mask[b, t] = bool(labels[b, t + 1] != IGNORE_INDEX)
    return mask


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over scored positions; logits (..., B, L, V) -> (...)."""
    mask = label_mask(labels)  # (B, L)
    targets = torch.zeros_like(labels)
    targets[:, :-1] = labels[:, 1:].clamp(min=0)
    logp = torch.log_softmax(logits, dim=-1)
    index = targets.expand(*logits.shape[:-1]).unsqueeze(-1)
    picked = logp.gather(-1, index).squeeze(-1)  # (..., B, L)
    return -(picked * mask).sum((-1, -2)) / mask.sum()


def score_jacobians(logits_fn: LogitsFn, X: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Scores ``s_{n,y} = grad_X log p_n[y]`` for every scored position ``n`` and token ``y``.

    Returns:
        probs (N, V) and scores (N, V, B*L*d), scored positions in row-major ``mask`` order.
    """
    X = X.detach()

    def logp(inp: Tensor) -> Tensor:
        return torch.log_softmax(logits_fn(inp), dim=-1)

    jac = torch.func.jacrev(logp)(X)  # (B, L, V, B, L, d)
    scores = jac[mask].reshape(int(mask.sum()), jac.shape[2], -1)
    probs = torch.softmax(logits_fn(X), dim=-1)[mask]
    return probs.detach(), scores.detach()


def logit_jacobians(logits_fn: LogitsFn, X: Tensor, mask: Tensor) -> Tensor:
    """``dz_n / dX`` for every scored position: (N, V, B*L*d)."""
    jac = torch.func.jacrev(logits_fn)(X.detach())  # (B, L, V, B, L, d)
    return jac[mask].reshape(int(mask.sum()), jac.shape[2], -1).detach()


def exact_fisher_trace(logits_fn: LogitsFn, X: Tensor, mask: Tensor) -> float:
    """``(1/N) sum_t M_t Tr(F_X^(t))``, ``Tr F^(t) = sum_y p_t[y] ||grad_X log p_t[y]||^2``."""
    probs, scores = score_jacobians(logits_fn, X, mask)
    return float((probs * scores.pow(2).sum(-1)).sum() / mask.sum())


def exact_uniform_expectation(logits_fn: LogitsFn, X: Tensor, mask: Tensor) -> float:
    """``E[R]`` for one draw ``y'_t ~ Uniform(V)`` per position (mean reduction).

    ``E||sum_t s_t||^2 = sum_t E||s_t||^2 + sum_{t != t'} <E s_t, E s_t'>`` with draws independent
    across positions; unlike model sampling ``E s_t = (1/V) sum_y s_{t,y} != 0``.
    """
    _, scores = score_jacobians(logits_fn, X, mask)  # (N, V, D)
    second = scores.pow(2).sum(-1).mean(-1)  # (N,)  E||s_t||^2
    first = scores.mean(1)  # (N, D)  E s_t
    total = (second - first.pow(2).sum(-1)).sum() + first.sum(0).pow(2).sum()
    return float(total / mask.sum())


def reference_penalty(
    logits_fn: LogitsFn,
    X: Tensor,
    mask: Tensor,
    targets: Tensor,
    *,
    reference_probs: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``R = (1/m) sum_s ||sum_n J_n^T (onehot(y'_{n,s}) - p_n)||^2 / N`` from dense Jacobians.

    ``p`` is ``softmax(z(X))`` unless ``reference_probs`` (N, V) is given (logit-F with ``p`` frozen
    elsewhere). Value only (no graph).

    Args:
        targets: (N, m) token ids.
    """
    jac = logit_jacobians(logits_fn, X, mask)  # (N, V, D)
    if reference_probs is None:
        reference_probs = torch.softmax(logits_fn(X.detach()), dim=-1)[mask]
    vocab = jac.shape[1]
    onehot = torch.nn.functional.one_hot(targets, vocab).to(jac.dtype)  # (N, m, V)
    residual = onehot - reference_probs[:, None, :]  # (N, m, V)
    v = torch.einsum("nmv,nvd->md", residual, jac)  # (m, D)
    total = v.pow(2).sum(-1).mean()
    return total / mask.sum() if reduction == "mean" else total


def central_differences(
    fn: Callable[[], Tensor], params: Sequence[nn.Parameter], step: float
) -> list[Tensor]:
    """Central-difference gradient of the scalar ``fn()`` w.r.t. every entry of ``params``."""
    grads = []
    for param in params:
        grad = torch.zeros_like(param, requires_grad=False)
        flat = param.data.view(-1)  # writes through .data are invisible to autograd
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + step
            plus = float(fn().detach())
            flat[i] = old - step
            minus = float(fn().detach())
            flat[i] = old
            grad.view(-1)[i] = (plus - minus) / (2 * step)
        grads.append(grad)
    return grads


def relative_error(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm())
