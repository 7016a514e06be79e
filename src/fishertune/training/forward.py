"""The model's forward for the penalty and the loss's normalizer, below :mod:`.loss`.

:func:`forward_logits` / :func:`model_outputs` run the model with dropout drawn from a fixed seed
(the fd passes must share their masks), :func:`exact_attention` picks SDPA's math kernel for
double backward, :func:`matched_position_weights` gives NEFTune's per-position coefficient, and
:func:`loss_normalizer` the ``N`` that CE and penalty share.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from fishertune.noise import NEFTuneNoise
from fishertune.training.checks import attention_implementation

__all__ = [
    "exact_attention",
    "forward_logits",
    "loss_normalizer",
    "matched_position_weights",
    "model_outputs",
    "select_rows",
]


def loss_normalizer(
    label_mask: Tensor,
    num_items_in_batch: Any,
    *,
    reduction: str,
    processes: int,
    average_tokens_across_devices: bool,
    accumulation_steps: int,
) -> Tensor:
    """``N``, shared by CE and penalty, as transformers / TRL normalize the CE.

    ``mean``: the number of scored tokens in the whole accumulated (and, with
    ``average_tokens_across_devices``, all-rank) batch, times the number of processes since DDP
    averages gradients. Without ``num_items_in_batch`` (a model that takes no loss kwargs) the
    micro-batch's own count times ``accumulation_steps``: what transformers does to a per-batch
    mean. ``sum``: ``1 / processes`` (DDP's average is then the sum), times ``accumulation_steps``
    without ``num_items_in_batch``, again as transformers would divide.
    """
    if reduction == "sum":
        count = torch.tensor(1.0 / processes, device=label_mask.device)
    elif num_items_in_batch is None:
        count = label_mask.sum().float().clamp(min=1.0)
    else:
        count = torch.as_tensor(num_items_in_batch, device=label_mask.device).float().clamp(min=1)
        if average_tokens_across_devices:
            count = count / processes
    if num_items_in_batch is None:
        count = count * accumulation_steps
    return count


def forward_logits(
    model: nn.Module, inputs: dict[str, Tensor], rng_seed: int | None = None
) -> Tensor:
    """Logits (B, L, V); with ``rng_seed``, dropout masks drawn from that seed.

    The penalty's forwards share one seed: fd differences g(X + h v) - g(X) of forwards with
    different dropout masks (LoRA's default lora_dropout=0.05, say) would be mask noise / h.
    The global RNG streams are left as they were.
    """
    return model_outputs(model, inputs, rng_seed).logits


def model_outputs(
    model: nn.Module, inputs: dict[str, Tensor], rng_seed: int | None, **extra: Any
) -> Any:
    """The model's outputs (``extra`` added to its inputs), dropout drawn from ``rng_seed``."""
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    model_inputs["use_cache"] = False
    if rng_seed is None:
        return model(**model_inputs, **extra)
    device = inputs["input_ids"].device
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(
        devices=[device] if accelerator else [],
        device_type=device.type if accelerator else "cuda",
    ):
        torch.manual_seed(rng_seed)
        return model(**model_inputs, **extra)


def exact_attention(model: nn.Module, penalty_grad: str) -> contextlib.AbstractContextManager:
    """SDPA's math kernel for double backward (the fused kernels have no second derivative)."""
    if penalty_grad == "exact" and attention_implementation(model) == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def matched_position_weights(
    alpha: float, inputs: dict[str, Tensor], hidden_size: int, length_mode: str
) -> Tensor:
    """``w_bl = a_bl^2 / 6`` (B, L): NEFTune's second-order coefficient per position.

    ``a_bl`` is the half-width the noise at ``alpha`` would use there
    (:meth:`fishertune.noise.NEFTuneNoise.scale`, so ``L_b`` is counted exactly as the noise
    counts it: per sequence from the attention mask, per packed segment from ``position_ids``, or
    the padded length), 0 on padding in ``per_sequence`` mode. The penalty
    ``sum_bl w_bl ||v_bl||^2`` (or ``Tr(w H_X)``) is then the noise's
    ``E[CE(X + eps)] - CE(X) = sum_bl (a_bl^2 / 6) Tr(H_bl,bl) + O(a^4)`` with the Fisher (or the
    Hessian itself) for ``H``: row ``b`` of an unpacked batch gets ``alpha^2 / (6 L_b d)``.
    """
    labels = inputs["labels"]
    noise = NEFTuneNoise(alpha, length_mode=length_mode)
    noise.set_batch(inputs.get("attention_mask"), inputs.get("position_ids"))
    scale = noise.scale(torch.Size((*labels.shape, hidden_size)), labels.device)[..., 0]
    return (scale.double() ** 2 / 6.0).expand(labels.shape)  # (B, L), float64


def select_rows(inputs: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    return {k: v[rows] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in inputs.items()}
