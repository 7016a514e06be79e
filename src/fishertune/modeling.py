"""Loading causal LMs, and tiny Llama models built from a config for offline runs and tests."""

from __future__ import annotations

from typing import Any

import torch

from fishertune.errors import FishertuneError

__all__ = ["TINY_MODEL", "load_causal_lm", "tiny_llama"]

TINY_MODEL = "builtin:tiny-llama"  # the name that selects tiny_llama (the offline preset's model)


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    attn_implementation: str = "eager",
    tie_word_embeddings: bool = False,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` of the given size (float32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> Any:
    """``AutoModelForCausalLM.from_pretrained``, with a clear error for a model not found."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    except OSError as err:
        raise FishertuneError(
            f"cannot load model {name_or_path!r}: not a local directory with a config and "
            f"weights, and not reachable on the hub ({str(err).splitlines()[0]})"
        ) from err
