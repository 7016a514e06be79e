"""Float32 master weights under half-precision autocast, and a final save in the loaded dtype.

:class:`MasterWeights` is a mixin for a transformers ``Trainer`` subclass (it overrides
``save_model`` and ``_save``, the trainer's own saving path): ``FisherSFTTrainer`` inherits it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from fishertune.training.checks import unwrap

__all__ = ["MasterWeights", "cast_state_dict"]

logger = logging.getLogger(__name__)


def cast_state_dict(state_dict: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating tensors cast to ``dtype``; tensors that share storage (tied embeddings) stay
    shared, so ``save_pretrained`` still writes a tied weight once."""
    cast: dict[tuple[int, tuple[int, ...], tuple[int, ...]], Tensor] = {}
    out = {}
    for key, value in state_dict.items():
        if not torch.is_floating_point(value):
            out[key] = value
            continue
        ident = (value.data_ptr(), tuple(value.shape), tuple(value.stride()))
        if ident not in cast:
            cast[ident] = value.to(dtype)
        out[key] = cast[ident]
    return out


class MasterWeights:
    """Trainer mixin: float32 trainable weights, checkpoints in float32, the final model in the
    dtype it was loaded in. Call :meth:`_set_up_master_weights` after ``Trainer.__init__``."""

    _save_dtype: torch.dtype | None = None
    _final_save = False
    model: Any
    args: Any
    accelerator: Any
    is_deepspeed_enabled: bool
    is_fsdp_enabled: bool

    def _set_up_master_weights(self) -> None:
        """Keep the weights the optimizer updates in float32 (``master_weights='float32'``).

        An AdamW step at lr 5e-6 moves a weight by about 5e-6 of its scale, far below bf16's
        spacing (2^-8 relative): parameters stored in bf16 would round most updates away (85% of
        the weights changed after 20 steps in float32, 6.5% in bf16, on the tiny model). As
        everywhere in the field (torch AMP, FSDP2's MixedPrecisionPolicy, DeepSpeed's bf16
        optimizer), the parameters stay float32 and bf16 is the autocast compute dtype. Frozen
        weights (a LoRA base) keep their dtype. Under DeepSpeed the engine keeps float32 masters
        of its own (and ZeRO-3 has already partitioned the parameters), so nothing is cast here.
        """
        model = unwrap(self.model)
        half = [
            p
            for p in model.parameters()
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)
        ]
        if not half:
            return
        if self.args.master_weights == "model":
            logger.warning(
                "master_weights=model: training %d parameter tensors in %s. Updates smaller than "
                "its resolution (2^-8 of a weight for bf16) are rounded away: at small learning "
                "rates most weights never change. Use master_weights=float32 (the default) to "
                "train float32 weights with %s autocast.",
                len(half),
                half[0].dtype,
                half[0].dtype,
            )
            return
        if self.is_deepspeed_enabled:
            return
        if not hasattr(model, "peft_config"):  # PEFT saves adapters only: their dtype stays
            self._save_dtype = half[0].dtype
        # Replacing `.data` keeps each Parameter object (and so tied weights and the references
        # hooks hold) while changing its storage dtype: what PEFT's cast_adapter_dtype and
        # accelerate's FSDP2 upcast do.
        for param in half:
            param.data = param.data.float()
        logger.info(
            "master weights: %d trainable parameter tensors cast from %s to float32",
            len(half),
            self._save_dtype or "half precision",
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as transformers does; the final save (not a checkpoint) writes the weights in
        the dtype the model was loaded in. Checkpoints keep the float32 master weights, so a
        resumed run continues from exactly where it stopped."""
        self._final_save = not _internal_call
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        sharded = self.is_fsdp_enabled and plugin is not None
        sharded = sharded and "FULL_STATE_DICT" not in str(plugin.state_dict_type)
        if self._final_save and sharded:
            # transformers saves no model at all under FSDP's SHARDED_STATE_DICT (the checkpoint
            # type configs/accelerate/fsdp.yaml uses): the final model is gathered in full, the
            # switch accelerate's set_state_dict_type documents for "train sharded, save full".
            previous = plugin.state_dict_type
            plugin.set_state_dict_type("FULL_STATE_DICT")
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._final_save = False
            if not _internal_call and sharded:
                plugin.set_state_dict_type(previous)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        dtype = self._save_dtype if self._final_save else None
        if dtype is None:
            super()._save(output_dir, state_dict)
            return
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            state_dict = model.state_dict()
        state_dict = cast_state_dict(state_dict, dtype)
        super()._save(output_dir, state_dict)
        if self.args.should_save and hasattr(model, "config"):
            # save_pretrained records the in-memory dtype (float32) in config.json; the weights
            # written are `dtype`, which is what `dtype="auto"` must load them as
            in_memory = model.config.dtype
            model.config.dtype = dtype
            try:
                model.config.save_pretrained(output_dir or self.args.output_dir)
            finally:
                model.config.dtype = in_memory
