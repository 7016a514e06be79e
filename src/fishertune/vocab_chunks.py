"""The chunking under :mod:`fishertune.vocab`: chunk sizes, the scored rows, the output
projection's logits never materialized (:class:`LinearLogits`, with what one pass over its
chunks keeps: :class:`LinearPass`), the sampler's inverse CDF (:func:`inverse_cdf`) and the
dense reference ``p_ref`` (:func:`scored_softmax`).

Torch only. Every function of :mod:`fishertune.vocab` reads the scored logits through
:func:`scored_chunks`: ``z_of(chunk)`` gives the (c, V) logits of a chunk of scored rows, read
from the model's logits or projected from its hidden states, in float32 or wider.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ACCELERATOR_CHUNK_BYTES",
    "CHUNK_BYTES",
    "ChunkLogits",
    "FrozenLogits",
    "LinearLogits",
    "LinearPass",
    "Logits",
    "Reference",
    "compute_dtype",
    "flat_logits",
    "inverse_cdf",
    "linear_logits",
    "project",
    "reference_of",
    "row_chunks",
    "scored_chunks",
    "scored_rows",
    "scored_softmax",
    "will_run",
]

CHUNK_BYTES = 32 * 2**20
ACCELERATOR_CHUNK_BYTES = 256 * 2**20

ChunkLogits = Callable[[slice], Tensor]
"""``z_of(chunk)``: the logits (c, V) of the scored rows ``chunk``, float32 or wider."""


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


def flat_logits(logits: Tensor) -> Tensor:
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


@dataclass(eq=False)
class LinearLogits:
    """The logits ``z = W h + b`` of the output projection, never materialized as (N, V).

    What the penalty's forward hands over instead of the model's (B, L, V) logits under
    ``ce_kernel=linear``; every function here that takes logits takes this too, and recomputes
    ``z`` chunk by chunk from ``hidden`` and ``weight``.

    Attributes:
        hidden: (B, L, d) the last hidden states, with graph; or (N, d) already at the scored
            positions (a frozen reference, :func:`fishertune.vocab_pass.frozen_reference`).
        weight: (V, d) the projection's weight; ``bias`` (V,) or ``None``.
        mm_dtype: the dtype of the projection's matmul (autocast's when on, as the model's own
            ``lm_head`` would run); its softmax runs in float32 or wider.
        summary: what the last pass over these logits' chunks kept
            (:func:`fishertune.vocab_pass.linear_pass`): the sampler's pass leaves it for the
            CE and ``g`` of the same logits, and a frozen reference carries its ``p W``.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    mm_dtype: torch.dtype
    summary: LinearPass | None = None

    @property
    def shape(self) -> torch.Size:
        """The shape the logits would have: ``(*hidden.shape[:-1], V)``."""
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def scored(self, label_mask: Tensor) -> Tensor:
        """The hidden states (N, d) at the scored positions, in ``label_mask`` order."""
        return self.hidden.reshape(-1, self.hidden.shape[-1])[scored_rows(label_mask)]

    def operands(self) -> tuple[Tensor, Tensor | None]:
        """``W`` and ``b`` in the matmul's dtype (cast once per pass, not per chunk)."""
        bias = None if self.bias is None else self.bias.to(self.mm_dtype)
        return self.weight.to(self.mm_dtype), bias


def linear_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> LinearLogits:
    """:class:`LinearLogits` with the matmul in the autocast dtype when autocast is on."""
    device_type = hidden.device.type
    mm_dtype = (
        torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else hidden.dtype
    )
    return LinearLogits(hidden, weight, bias, mm_dtype)


Logits = Tensor | LinearLogits


@dataclass(eq=False)
class LinearPass:
    """What one pass over the projected chunks of :class:`LinearLogits` keeps: the reductions
    over the vocabulary that the CE, ``g``, the metrics and all their gradients need, so that
    no chunk is projected again in the backward (:mod:`fishertune.vocab_linear`).

    With ``p_t = softmax(z_t)`` of the pass's own logits and ``q_t`` logit-F's frozen reference
    (``None`` where not asked for; (N, ...) in ``label_mask`` order):

    Attributes:
        label_mask: the mask the pass was computed for (``None``: the hidden states were given
            at the scored positions already).
        lse: (N,) ``log sum_v exp(z_tv)``.
        argmax: (N,) ``argmax_v z_tv``.
        p_projection: (N, d) ``p_t W`` (so ``<p_t, z_t> = h_t . p_t W + <p_t, b>`` and the
            gradient of the hidden state's dense part).
        p_bias: (N,) ``<p_t, b>``, with a bias.
        p_outer: (V, d) ``sum_t p_t h_t^T``, the weight gradient's dense part (when the
            weight is trained); ``p_sum`` (V,) ``sum_t p_t``, the bias's.
        q_outer, q_sum: the same for ``q`` (logit-F's shifted passes).
        draws: (N, m) the sampler's ``y' ~ p_t``, drawn in the pass.
    """

    label_mask: Tensor | None
    lse: Tensor | None = None
    argmax: Tensor | None = None
    p_projection: Tensor | None = None
    p_bias: Tensor | None = None
    p_outer: Tensor | None = None
    p_sum: Tensor | None = None
    q_outer: Tensor | None = None
    q_sum: Tensor | None = None
    draws: Tensor | None = None


def project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``z = h W^T + b`` (c, V) in ``weight``'s dtype, returned in float32 or wider."""
    with torch.autocast(hidden.device.type, enabled=False):
        z = hidden.to(weight.dtype) @ weight.T
        if bias is not None:
            z = z + bias
    return z.to(compute_dtype(z.dtype))


def scored_chunks(logits: Logits, label_mask: Tensor) -> tuple[int, int, ChunkLogits]:
    """``(N, V, z_of)``: ``z_of(chunk)`` gives the scored rows' logits (c, V) of ``chunk``, in
    float32 or wider: read from the logits, or projected from the hidden states."""
    if isinstance(logits, LinearLogits):
        hidden = logits.scored(label_mask)
        weight, bias = logits.operands()
        return hidden.shape[0], weight.shape[0], lambda c: project(hidden[c], weight, bias)
    flat, rows = flat_logits(logits), scored_rows(label_mask)
    dtype = compute_dtype(flat.dtype)
    return rows.numel(), flat.shape[1], lambda c: flat[rows[c]].to(dtype)


@torch.no_grad()
def scored_softmax(logits: Tensor, label_mask: Tensor) -> Tensor:
    """``softmax(z_t)`` at the scored positions (N, V), float32 or wider, filled chunk by chunk
    (logit-F's constant ``p_ref``; bit for bit ``torch.softmax(logits[label_mask].float())``
    for float32 logits)."""
    n, vocab, z_of = scored_chunks(logits, label_mask)
    out = torch.empty(n, vocab, dtype=compute_dtype(logits.dtype), device=logits.device)
    for chunk in row_chunks(n, vocab, logits.device):
        out[chunk] = torch.softmax(z_of(chunk), dim=-1)
    return out


@dataclass(frozen=True)
class FrozenLogits:
    """Logit-F's constant reference kept as the model's half-precision logits at the scored
    positions (N, V), its softmax taken chunk by chunk where a pass reads it: half the memory of
    the float32 ``p_ref``, and bit for bit the same ``q`` (:func:`scored_softmax` upcasts the
    same logits before its softmax)."""

    scored: Tensor


Reference = Tensor | LinearLogits | FrozenLogits


def reference_of(reference: Reference | None) -> ChunkLogits | None:
    """``q`` of the rows of a chunk (c, V), from a frozen reference
    (:func:`fishertune.vocab_pass.frozen_reference`)."""
    if reference is None:
        return None
    if isinstance(reference, FrozenLogits):
        scored, dtype = reference.scored, compute_dtype(reference.scored.dtype)
        return lambda c: torch.softmax(scored[c].to(dtype), dim=-1)
    if isinstance(reference, LinearLogits):
        hidden = reference.hidden
        weight, bias = reference.operands()
        return lambda c: torch.softmax(project(hidden[c], weight, bias), dim=-1)
    return lambda c: reference[c]


def will_run(node: object) -> bool:
    """Whether the running backward reaches ``node`` (a gradient of ``v = grad_X g`` alone
    skips the weight's gradient); ``True`` where torch cannot tell."""
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if node is None or will_execute is None:
        return node is not None
    try:
        return bool(will_execute(node))
    except RuntimeError:  # not inside a backward, or an older engine
        return True
