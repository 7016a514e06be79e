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
* :func:`scored_softmax`: logit-F's constant ``p_ref`` (N, V) for the shifted forwards of finite
  differences; the one (N, V) tensor kept, because a shifted pass sees only its own logits.

Hand-written: ``torch.nn.functional.linear_cross_entropy`` (torch 2.13) chunks the CE over the
output projection, but it takes the hidden states and the projection's weight, which the
trainer's forward (through DDP / FSDP / PEFT wrappers, with models that post-process their logits)
does not expose, and it returns the CE alone: not the log-sum-exp that the draws and ``g`` share,
nor ``g``'s gradient. Nothing in torch or the fine-tuning libraries samples from a softmax
or forms ``g`` chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "CHUNK_BYTES",
    "ScoredTerms",
    "inverse_cdf",
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
CHUNK_BYTES = 32 * 2**20
ACCELERATOR_CHUNK_BYTES = 256 * 2**20

# index of each statistic in ScoredTerms.statistics
STAT_TOKENS, STAT_ENTROPY, STAT_CORRECT, STAT_CE = range(4)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least (half-precision logits are upcast), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def row_chunks(count: int, vocab: int, device: torch.device) -> Iterator[slice]:
    """Slices of ``range(count)`` with about :data:`CHUNK_BYTES` (on a CPU) or
    :data:`ACCELERATOR_CHUNK_BYTES` of float32 ``(rows, vocab)`` each (at least one row)."""
    budget = CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
    rows = max(1, budget // (4 * max(vocab, 1)))
    for start in range(0, count, rows):
        yield slice(start, min(start + rows, count))


def scored_rows(label_mask: Tensor) -> Tensor:
    """Indices (N,) of the scored positions in the flattened ``(B L)`` rows, in ``label_mask``
    order (the order of ``logits[label_mask]``)."""
    return label_mask.reshape(-1).nonzero().squeeze(-1)


def _flat(logits: Tensor) -> Tensor:
    return logits.reshape(-1, logits.shape[-1])


def inverse_cdf(probs: Tensor, u: Tensor, block: int) -> Tensor:
    """Draws by inverse CDF, in float64, two-level: the rows of ``probs`` (n, V), uniforms
    ``u`` (n, s) in [0, 1).

    ``u`` is scaled by the row's computed total; the block of ``block`` consecutive tokens is
    found on the float64 CDF of the block sums (n, V / block), then the token on the float64 CDF
    inside that block: the law of the increments of the computed CDF, as ``torch.multinomial``
    (about 8x faster on CPU at large V). A float32 CDF over the whole vocabulary cannot do this:
    near 1 its spacing is 6e-8, so at V = 128k thousands of tokens of probability below that (up
    to 3e-4 of mass in all) are never drawn, or their mass lands on a few of them.

    Returns:
        (n, s) int64.
    """
    n, vocab = probs.shape
    full = vocab // block
    sums = [probs[:, : full * block].reshape(n, full, block).sum(-1)]  # (n, K) float32
    if full * block < vocab:
        sums.append(probs[:, full * block :].sum(-1, keepdim=True))  # the shorter last block
    # float32 block sums are exact to 1e-7 of each block's own mass; only the running total
    # needs float64, so that a block of mass 1e-9 after a total of 0.9999 keeps its share
    block_cdf = torch.cat(sums, dim=1).double().cumsum_(-1)  # (n, K)
    blocks = block_cdf.shape[1]
    # scaling u by the computed total keeps the law the increments of the computed cdf
    u = u * block_cdf[:, -1:]
    chosen = torch.searchsorted(block_cdf, u, right=True).clamp_(max=blocks - 1)  # (n, s)
    below = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    tokens = chosen[..., None] * block + torch.arange(block, device=probs.device)  # (n, s, b)
    inside = probs.gather(1, tokens.clamp(max=vocab - 1).view(n, -1)).view(tokens.shape)
    inner_cdf = inside.double().masked_fill_(tokens >= vocab, 0.0).cumsum_(-1)  # (n, s, b)
    inner = torch.searchsorted(inner_cdf, (u - below)[..., None], right=True)[..., 0]
    return (chosen * block + inner.clamp_(max=block - 1)).clamp_(max=vocab - 1)


@torch.no_grad()
def softmax_draws(
    logits: Tensor,
    label_mask: Tensor,
    samples: int,
    generator: torch.Generator | None,
    block: int,
) -> Tensor:
    """``samples`` draws ``y' ~ softmax(z_t)`` per scored position (N, samples), chunk by chunk.

    The uniforms are one ``torch.rand((N, samples), float64)`` from ``generator`` and each row's
    probabilities ``torch.softmax(z_t.float())``, as the dense sampler takes them, so a generator
    in the same state gives the same draws.
    """
    flat, rows = _flat(logits), scored_rows(label_mask)
    n = rows.numel()
    u = torch.rand(n, samples, generator=generator, device=logits.device, dtype=torch.float64)
    draws = torch.empty(n, samples, dtype=torch.long, device=logits.device)
    for chunk in row_chunks(n, flat.shape[1], flat.device):
        probs = torch.softmax(flat[rows[chunk]].float(), dim=-1)
        draws[chunk] = inverse_cdf(probs, u[chunk], block)
    return draws


@torch.no_grad()
def scored_softmax(logits: Tensor, label_mask: Tensor) -> Tensor:
    """``softmax(z_t)`` at the scored positions (N, V), float32 or wider, filled chunk by chunk
    (logit-F's constant ``p_ref``; bit for bit ``torch.softmax(logits[label_mask].float())``
    for float32 logits)."""
    flat, rows = _flat(logits), scored_rows(label_mask)
    dtype = compute_dtype(flat.dtype)
    out = torch.empty(rows.numel(), flat.shape[1], dtype=dtype, device=flat.device)
    for chunk in row_chunks(rows.numel(), flat.shape[1], flat.device):
        out[chunk] = torch.softmax(flat[rows[chunk]].to(dtype), dim=-1)
    return out


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
    logits: Tensor,
    label_mask: Tensor,
    labels: Tensor | None = None,
    draws: Tensor | None = None,
    *,
    kind: Kind = "token",
    reference: Tensor | None = None,
    statistics: bool = False,
    row_log_likelihood: bool = False,
) -> ScoredTerms:
    """CE, the penalty's ``g`` and the metrics at the scored positions, from one log-sum-exp.

    Args:
        logits: (B, L, V), with graph.
        label_mask: (B, L) bool.
        labels: (N,) the next-token targets ``y_t`` at the scored positions, for the CE (and the
            accuracy); ``None``: no CE.
        draws: (N, m) ``y'``; ``None``: no ``g``.
        kind: ``"token"``: ``g_s = sum_t (z_t[y'_ts] - lse_t)``; ``"logit"``:
            ``g_s = sum_t (z_t[y'_ts] - <z_t, q_t>)``, ``q`` held constant: ``reference`` (N, V),
            or ``softmax(z_t)`` of these logits.
        statistics: also return the metrics (needs ``labels``).
        row_log_likelihood: also return ``l_bs = sum_{t in row b} M_t (z_t[y'_ts] - lse_t)``
            (B, m) (needs ``draws``; the model's own ``log p``, whichever ``kind``).

    Returns:
        :class:`ScoredTerms`, float32 (float64 for float64 logits).
    """
    if kind not in ("token", "logit"):
        raise ValueError(f"kind must be 'token' or 'logit', got {kind!r}")
    if statistics and labels is None:
        raise ValueError("statistics need the labels")
    if row_log_likelihood and draws is None:
        raise ValueError("the rows' log-likelihood needs the draws")
    flat, rows = _flat(logits), scored_rows(label_mask)
    # the row (in B) of each scored position, for the rows' log-likelihood
    owner = rows // label_mask.shape[1] if row_log_likelihood else None
    ce, g, stats, row_ll = _ScoredTerms.apply(
        flat, rows, labels, draws, reference, kind, statistics, owner, label_mask.shape[0]
    )
    return ScoredTerms(
        ce if labels is not None else None,
        g if draws is not None else None,
        stats if statistics else None,
        row_ll if row_log_likelihood else None,
    )


class _ScoredTerms(torch.autograd.Function):
    """``(ce, g, statistics, row_log_likelihood)`` of :func:`scored_terms` over the flattened
    logits (R, V); ``owner`` (N,) is the row of each scored position (``None``: no
    ``row_log_likelihood``), ``batch`` the number of rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        flat: Tensor,
        rows: Tensor,
        labels: Tensor | None,
        draws: Tensor | None,
        reference: Tensor | None,
        kind: str,
        statistics: bool,
        owner: Tensor | None,
        batch: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dtype = compute_dtype(flat.dtype)
        n, vocab = rows.numel(), flat.shape[1]
        # the log-sum-exp is needed by the CE, token-F's g and logit-F's own p; logit-F with a
        # given reference and no CE needs none
        need_lse = labels is not None or kind == "token" or reference is None or owner is not None
        lse = flat.new_zeros(n, dtype=dtype) if need_lse else None
        baseline = flat.new_zeros(n, dtype=dtype) if kind == "logit" and draws is not None else None
        entropy = flat.new_zeros((), dtype=torch.float64)
        correct = flat.new_zeros((), dtype=torch.float64)
        for chunk in row_chunks(n, vocab, flat.device):
            z = flat[rows[chunk]].to(dtype)  # (c, V)
            if lse is not None:
                lse[chunk] = torch.logsumexp(z, dim=-1)
            q = None
            if baseline is not None:
                q = reference[chunk] if reference is not None else torch.softmax(z, dim=-1)
                baseline[chunk] = (z * q).sum(-1)
            if statistics:
                p = q if q is not None and reference is None else torch.softmax(z, dim=-1)
                entropy += (lse[chunk] - (p * z).sum(-1)).sum().double()
                correct += (z.argmax(-1) == labels[chunk]).sum().double()
        ce = flat.new_zeros((), dtype=dtype)
        if labels is not None:
            ce = (lse - flat[rows, labels].to(dtype)).sum()
        g = flat.new_zeros(0, dtype=dtype)
        row_ll = flat.new_zeros(0, dtype=dtype)
        if draws is not None:
            picked = flat[rows[:, None], draws].to(dtype)  # (N, m)
            g = (picked - (lse if kind == "token" else baseline)[:, None]).sum(0)
            if owner is not None:  # log p_t[y'_ts] summed per row: (B, m)
                log_p = picked - lse[:, None]
                row_ll = log_p.new_zeros(batch, draws.shape[1]).index_add_(0, owner, log_p)
        stats = flat.new_zeros(4, dtype=torch.float64)
        if statistics:
            stats[STAT_TOKENS] = n
            stats[STAT_ENTROPY] = entropy
            stats[STAT_CORRECT] = correct
            stats[STAT_CE] = ce.double()
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(flat, rows, labels, draws, reference, lse, owner)
        ctx.kind, ctx.shape = kind, flat.shape
        return ce, g, stats, row_ll

    @staticmethod
    @once_differentiable
    def backward(
        ctx, grad_ce: Tensor, grad_g: Tensor, _: Tensor, grad_rows: Tensor
    ) -> tuple[Tensor | None, ...]:
        flat, rows, labels, draws, reference, lse, owner = ctx.saved_tensors
        n, vocab = rows.numel(), flat.shape[1]
        dtype = compute_dtype(flat.dtype)
        # the zeros a dense backward's index_put would also allocate: unscored rows get none
        grad = torch.zeros(ctx.shape, dtype=flat.dtype, device=flat.device)
        use_ce = labels is not None and bool(grad_ce != 0)
        use_g = draws is not None and grad_g.numel() > 0 and bool((grad_g != 0).any())
        use_rows = owner is not None and grad_rows.numel() > 0 and bool((grad_rows != 0).any())
        g_total = grad_g.sum().to(dtype) if use_g else None
        # c_{b(t)s} per scored position (N, m): row b's gradient of l_bs
        per_position = grad_rows.to(dtype)[owner] if use_rows else None
        # the coefficient of p_t: a_ce - sum_s a_s (token-F) - sum_s c_{b(t)s}
        scale: Tensor | float = (grad_ce.to(dtype) if use_ce else 0.0) - (
            g_total if use_g and ctx.kind == "token" else 0.0
        )
        for chunk in row_chunks(n, vocab, flat.device):
            z = flat[rows[chunk]].to(dtype)
            part = None
            if use_ce or (use_g and ctx.kind == "token") or use_rows:
                # p_t = exp(z_t - lse_t): LogsumexpBackward's own formula
                p = (z - lse[chunk, None]).exp_()
                chunk_scale = scale
                if use_rows:
                    chunk_scale = scale - per_position[chunk].sum(-1, keepdim=True)  # (c, 1)
                part = p.mul_(chunk_scale)
            if use_g and ctx.kind == "logit":
                q = reference[chunk] if reference is not None else torch.softmax(z, dim=-1)
                part = -g_total * q if part is None else part.sub_(q * g_total)
            if part is None:
                part = torch.zeros_like(z)
            if use_ce:
                part.scatter_add_(
                    1, labels[chunk, None], (-grad_ce.to(dtype)).expand(part.shape[0], 1)
                )
            if use_g or use_rows:
                m = draws.shape[1]
                at_draws = (
                    grad_g.to(dtype)[None, :].expand(part.shape[0], m)
                    if use_g
                    else per_position[chunk]
                )
                if use_g and use_rows:
                    at_draws = at_draws + per_position[chunk]
                part.scatter_add_(1, draws[chunk], at_draws)
            grad.index_copy_(0, rows[chunk], part.to(flat.dtype))
        return grad, None, None, None, None, None, None, None, None


def linear_scored_ce(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The CE of the output projection ``z_t = W h_t (+ b)`` at the scored positions, chunk by
    chunk, without the (N, V) logits, and the step's metrics from the same chunks.

    ``CE = sum_t (lse_t - z_t[y_t])``; its backward recomputes each chunk's ``z`` and writes
    ``dz = p - e_y`` into ``grad h = dz W`` and ``grad W = dz^T h`` chunk by chunk. The
    projection's matmul runs in the autocast dtype when autocast is on (as the model's own
    ``lm_head`` would), its softmax in float32 or wider, as :func:`scored_terms` does.

    Hand-written beside ``torch.nn.functional.linear_cross_entropy``: that returns the CE alone
    (not the entropy and accuracy that the step logs, which would cost another pass over the
    projection) and is not in every torch this package supports (>= 2.11).

    Args:
        hidden: (N, d) the final hidden states at the scored positions, with graph.
        weight: (V, d) the output projection's weight; ``bias`` (V,) or ``None``.
        targets: (N,) the next-token labels.

    Returns:
        The CE summed (float32, float64 for float64 inputs) and the statistics (4,) of
        :class:`ScoredTerms` (tokens, entropy, argmax-correct count, CE), float64, detached.
    """
    device_type = hidden.device.type
    mm_dtype = (
        torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else hidden.dtype
    )
    ce, stats = _LinearScoredCE.apply(hidden, weight, bias, targets, mm_dtype)
    return ce, stats


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, mm_dtype: torch.dtype) -> Tensor:
    z = hidden.to(mm_dtype) @ weight.to(mm_dtype).T
    if bias is not None:
        z = z + bias.to(mm_dtype)
    return z.to(compute_dtype(z.dtype))


class _LinearScoredCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, mm_dtype
    ) -> tuple[Tensor, Tensor]:
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = compute_dtype(mm_dtype)
        lse = hidden.new_zeros(n, dtype=dtype)
        ce = hidden.new_zeros((), dtype=dtype)
        entropy = hidden.new_zeros((), dtype=torch.float64)
        correct = hidden.new_zeros((), dtype=torch.float64)
        with torch.autocast(hidden.device.type, enabled=False):
            for chunk in row_chunks(n, vocab, hidden.device):
                z = _project(hidden[chunk], weight, bias, mm_dtype)
                lse[chunk] = torch.logsumexp(z, dim=-1)
                ce += (lse[chunk] - z.gather(1, targets[chunk, None])[:, 0]).sum()
                p = (z - lse[chunk, None]).exp_()
                entropy += (lse[chunk] - (p * z).sum(-1)).sum().double()
                correct += (z.argmax(-1) == targets[chunk]).sum().double()
        stats = hidden.new_zeros(4, dtype=torch.float64)
        stats[STAT_TOKENS], stats[STAT_ENTROPY], stats[STAT_CORRECT] = n, entropy, correct
        stats[STAT_CE] = ce.double()
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.mm_dtype = mm_dtype
        return ce, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        mm_dtype, n, vocab = ctx.mm_dtype, hidden.shape[0], weight.shape[0]
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(
            weight.shape, dtype=compute_dtype(weight.dtype), device=weight.device
        )
        grad_bias = None if bias is None else torch.zeros_like(grad_weight[:, 0])
        scale = grad_ce.to(lse.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for chunk in row_chunks(n, vocab, hidden.device):
                z = _project(hidden[chunk], weight, bias, mm_dtype)
                dz = (z - lse[chunk, None]).exp_()  # p
                dz.scatter_add_(1, targets[chunk, None], -torch.ones_like(dz[:, :1]))
                dz.mul_(scale)
                dz_mm = dz.to(mm_dtype)
                grad_hidden[chunk] = (dz_mm @ weight.to(mm_dtype)).to(hidden.dtype)
                grad_weight += (dz_mm.T @ hidden[chunk].to(mm_dtype)).to(grad_weight.dtype)
                if grad_bias is not None:
                    grad_bias += dz.sum(0).to(grad_bias.dtype)
        grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None
