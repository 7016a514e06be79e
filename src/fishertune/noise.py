"""NEFTune embedding noise and embedding hooks, as forward hooks on the input-embedding module.

Torch only. NEFTune adds ``eps ~ U(-a, a)`` element-wise to the embeddings ``X`` during training,
``a = alpha / sqrt(L_b * d)``. Two length conventions exist:

* ``"per_sequence"`` (default; NEFTune's own training code): ``L_b`` is each sequence's real length
  from its attention mask (or its segment length from ``position_ids`` when packed), and padding
  gets no noise;
* ``"padded"`` (transformers / TRL): ``L_b`` is the padded length of the batch, padding included.

``distribution="gaussian"`` draws ``N(0, a^2 / 3)``, the uniform noise's variance. The noise is
added to the embedding module's *output*: for models that scale their embeddings afterwards (Gemma
multiplies by ``sqrt(d)``) the effective noise is scaled too.

An embedding hook does not see the attention mask, so the caller hands it over with
:meth:`NEFTuneNoise.set_batch` before each training forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "EmbeddingCapture",
    "NEFTuneNoise",
    "find_input_embeddings",
    "neftune",
    "segment_lengths",
]

LengthMode = Literal["per_sequence", "padded"]
Distribution = Literal["uniform", "gaussian"]


def find_input_embeddings(model: nn.Module) -> nn.Module:
    """The input-embedding module of ``model``, looking through DDP/FSDP/DeepSpeed/PEFT wrappers.

    Wrappers expose the real model as ``.module`` (DDP, DeepSpeed) or as ``.base_model.model``
    (PEFT); calling ``get_input_embeddings`` on an FSDP wrapper has crashed in the wild, so the
    wrapper chain is unwrapped first.
    """
    seen = model
    for _ in range(8):
        inner = getattr(seen, "module", None)
        if isinstance(inner, nn.Module) and not hasattr(seen, "get_input_embeddings"):
            seen = inner
            continue
        break
    getter = getattr(seen, "get_input_embeddings", None)
    if getter is None:
        raise ValueError(
            f"{type(model).__name__} has no get_input_embeddings(); fishertune needs the "
            "input-embedding module of a transformers-style model"
        )
    module = getter()
    if not isinstance(module, nn.Module):
        raise ValueError(f"{type(model).__name__}.get_input_embeddings() returned {module!r}")
    return module


def segment_lengths(
    attention_mask: Tensor | None = None, position_ids: Tensor | None = None
) -> Tensor:
    """Per-token length of the sequence the token belongs to, 0 on padding.

    With ``position_ids`` (packed rows, positions restart at 0 on each sequence) a token's length
    is that of its segment; otherwise it is the row's number of real tokens. With both, a
    segment counts only its real tokens: an ordinary padded batch may carry
    ``position_ids = arange(L)``, whose padding would otherwise join the last segment.

    Returns:
        (B, L) float32.
    """
    if position_ids is not None:
        starts = position_ids == 0  # (B, L)
        segment = starts.long().cumsum(-1)  # segment index per token
        real = (
            torch.ones_like(position_ids, dtype=torch.float32)
            if attention_mask is None
            else attention_mask.float()
        )
        lengths = torch.zeros_like(position_ids, dtype=torch.float32)
        for row in range(position_ids.shape[0]):
            counts = torch.bincount(segment[row], weights=real[row])
            lengths[row] = counts[segment[row]]
        return lengths * real
    if attention_mask is None:
        raise ValueError("segment_lengths needs attention_mask or position_ids")
    mask = attention_mask.float()
    return mask.sum(-1, keepdim=True) * mask


class NEFTuneNoise:
    """NEFTune noise as a forward hook on an embedding module; a no-op outside training mode.

    Example::

        noise = NEFTuneNoise(alpha=5.0)
        with noise.attached(model.get_input_embeddings()):
            noise.set_batch(attention_mask=batch["attention_mask"])
            loss = model(**batch).loss
    """

    def __init__(
        self,
        alpha: float,
        *,
        length_mode: LengthMode = "per_sequence",
        distribution: Distribution = "uniform",
        generator: torch.Generator | None = None,
    ) -> None:
        if alpha < 0:
            raise ValueError(f"NEFTune alpha must be >= 0, got {alpha}")
        if length_mode not in ("per_sequence", "padded"):
            raise ValueError(f"length_mode must be 'per_sequence' or 'padded', got {length_mode!r}")
        if distribution not in ("uniform", "gaussian"):
            raise ValueError(f"distribution must be 'uniform' or 'gaussian', got {distribution!r}")
        self.alpha = float(alpha)
        self.length_mode = length_mode
        self.distribution = distribution
        self.generator = generator
        self._attention_mask: Tensor | None = None
        self._position_ids: Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def set_batch(
        self, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> None:
        """Give the hook the next forward's attention mask (and ``position_ids`` when packed)."""
        self._attention_mask = attention_mask
        self._position_ids = position_ids

    def scale(self, shape: torch.Size, device: torch.device) -> Tensor:
        """Per-token half-width ``a`` (B, L, 1): 0 on padding in ``per_sequence`` mode."""
        batch, length, hidden = shape
        if self.length_mode == "padded":
            return torch.full((1, 1, 1), self.alpha / (length * hidden) ** 0.5, device=device)
        mask, positions = self._attention_mask, self._position_ids
        if mask is None and positions is None:
            raise RuntimeError(
                "NEFTune length_mode='per_sequence' needs the batch's attention mask: call "
                "set_batch(attention_mask=...) before the forward, or use length_mode='padded'"
            )
        for name, tensor in (("attention_mask", mask), ("position_ids", positions)):
            if tensor is not None and tuple(tensor.shape) != (batch, length):
                raise RuntimeError(
                    f"NEFTune {name} has shape {tuple(tensor.shape)} but the embeddings are "
                    f"({batch}, {length}, {hidden}): call set_batch with this forward's batch"
                )
        lengths = segment_lengths(
            None if mask is None else mask.to(device),
            None if positions is None else positions.to(device),
        )
        scale = self.alpha / (lengths.clamp(min=1.0) * hidden).sqrt() * (lengths > 0)
        return scale.unsqueeze(-1)

    def sample(self, embeds: Tensor) -> Tensor:
        """Noise for ``embeds`` (B, L, d), in ``embeds``' dtype, without gradient."""
        unit = torch.empty(embeds.shape, dtype=torch.float32, device=embeds.device)
        if self.distribution == "uniform":
            unit.uniform_(-1.0, 1.0, generator=self.generator)
        else:  # same variance as U(-1, 1): 1/3
            unit.normal_(0.0, 3.0**-0.5, generator=self.generator)
        return (unit * self.scale(embeds.shape, embeds.device)).to(embeds.dtype)

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not module.training or self.alpha == 0:
            return output
        return output + self.sample(output.detach())

    def attach(self, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Register the hook on ``module``; remove it with the returned handle or :meth:`detach`."""
        if self._handle is not None:
            raise RuntimeError("this NEFTuneNoise is already attached")
        self._handle = module.register_forward_hook(self._hook)
        return self._handle

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._attention_mask = self._position_ids = None

    @contextlib.contextmanager
    def attached(self, module: nn.Module) -> Iterator[NEFTuneNoise]:
        """Hook attached inside the block and removed on exit, also when the block raises."""
        self.attach(module)
        try:
            yield self
        finally:
            self.detach()


@contextlib.contextmanager
def neftune(
    model: nn.Module,
    alpha: float,
    *,
    length_mode: LengthMode = "per_sequence",
    distribution: Distribution = "uniform",
    generator: torch.Generator | None = None,
) -> Iterator[NEFTuneNoise]:
    """Attach NEFTune noise to ``model``'s input embeddings for the duration of the block."""
    noise = NEFTuneNoise(
        alpha, length_mode=length_mode, distribution=distribution, generator=generator
    )
    with noise.attached(find_input_embeddings(model)):
        yield noise


class EmbeddingCapture:
    """Forward hook that records the embedding module's output ``X`` and can shift it.

    ``X`` keeps its graph, so ``autograd.grad(g, capture.embeds)`` differentiates through the
    model, and the embedding table's gradient flows through ``X``. If the table is frozen (LoRA),
    ``X`` is made a leaf that requires grad so that the penalty's input gradient exists.

    ``shift`` (set before a forward) adds a constant tensor to ``X``: the finite-difference mode
    evaluates ``g(X + h v)`` this way, through the real embedding module.

    :meth:`holding_table_gradient` (finite differences' split backward): the forwards give ``X``
    as a leaf and sum the gradients their backwards leave there into one buffer, until
    :meth:`release` marks the last forward, whose backward adds that sum to its own gradient at
    ``X``. The table's gradient is then made once, by the last backward: where the step has none
    yet (its first micro-step, no earlier backward of other rows), none exists while the earlier
    passes run, for one ``X``-sized buffer, so the hold is taken only where the table is
    trained, has no gradient yet and is larger than ``X`` (a table tied to the output head gets
    its gradient from the head's backward anyway: the caller leaves the hold off there). A sum
    of backwards through the same embedding is the backward of the sum: the ids, weights and
    dropout masks are the same in every pass (one call of the module per forward).
    """

    def __init__(self) -> None:
        self.embeds: Tensor | None = None
        self.shift: Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._holding = False  # forwards give X as a leaf (holding_table_gradient)
        self._releasing = False  # the next forward is the last one
        self._pending = False  # leaves given out, their gradients not yet taken by a last one
        self._held: Tensor | None = None  # the held gradients at X, summed

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if self._holding and output.requires_grad and torch.is_grad_enabled():
            output = self._hold(module, output)
        if not output.requires_grad and torch.is_grad_enabled():
            output = output.detach().requires_grad_(True)
        if self.shift is not None:
            output = output + self.shift.to(output.dtype)
        self.embeds = output
        return output

    def _hold(self, module: nn.Module, output: Tensor) -> Tensor:
        if self._releasing:
            held, self._held = self._held, None
            self._holding = self._releasing = self._pending = False
            if held is not None:
                output.register_hook(lambda grad: grad + held.to(grad.dtype))
            return output
        table = getattr(module, "weight", None)
        if not self._pending and (
            table is None
            or not table.requires_grad
            or table.grad is not None
            or output.numel() >= table.numel()
        ):
            # nothing to save: a frozen table (an adapter on it), its gradient exists already,
            # or X is as large as the table
            self._holding = False
            return output
        leaf = output.detach().requires_grad_(True)
        # after a backward's accumulation only: autograd.grad(g, X) (the penalty's v) is not held
        leaf.register_post_accumulate_grad_hook(self._collect)
        self._pending = True
        return leaf

    def _collect(self, leaf: Tensor) -> None:
        """A holding forward's backward: its gradient at ``X`` into the sum, the leaf's freed."""
        if self._held is None:
            self._held = leaf.grad
        else:
            self._held.add_(leaf.grad)
        leaf.grad = None

    def release(self) -> None:
        """The next forward is the last one while holding: its backward takes the held
        gradients into the embedding table's."""
        if self._holding:
            self._releasing = True

    @contextlib.contextmanager
    def holding_table_gradient(self, enabled: bool = True) -> Iterator[None]:
        """Hold the embedding table's gradient back from the backwards of the forwards run here
        until the one after :meth:`release` (class docstring). Raises if forwards held gradients
        and none was released: their table gradient would be lost."""
        if not enabled:
            yield
            return
        self._holding, self._releasing, self._pending, self._held = True, False, False, None
        try:
            yield
            if self._pending:
                raise RuntimeError(
                    "embedding forwards held their table gradient back and no last forward "
                    "took it (EmbeddingCapture.release was not called before it)"
                )
        finally:
            self._holding, self._releasing, self._pending, self._held = False, False, False, None

    def attach(self, module: nn.Module) -> None:
        if self._handle is not None:
            raise RuntimeError("this EmbeddingCapture is already attached")
        # prepend: capture after the module, before other hooks (NEFTune noise) alter X
        self._handle = module.register_forward_hook(self._hook, prepend=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.embeds = self.shift = None
        self._holding, self._releasing, self._pending, self._held = False, False, False, None

    @contextlib.contextmanager
    def attached(self, module: nn.Module) -> Iterator[EmbeddingCapture]:
        self.attach(module)
        try:
            yield self
        finally:
            self.detach()
