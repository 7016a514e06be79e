"""Loading causal LMs and their chat tokenizers: one loader for ``train``, ``analyze`` and
``evaluate``.

A model name is one of

* :data:`TINY_MODEL`: a randomly initialised tiny Llama built from a config (offline runs, tests);
* a folder written by ``save_pretrained`` (a full model: ``config.json`` and weights);
* a LoRA run folder (``adapter_config.json``, as ``fishertune train --use_peft`` saves it): the
  base model the adapter names is loaded, the adapter put on it, and optionally merged in;
* a hub name (``meta-llama/Llama-3.1-8B``), with ``revision`` and ``trust_remote_code`` as
  ``transformers`` takes them.

The tokenizer comes from the same folder (a run folder holds the training tokenizer), from the
adapter's base when the folder has none, or from an explicit name; it always ends up with a chat
template (:func:`fishertune.data.tokenizer.load_chat_tokenizer`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fishertune.data.tokenizer import TINY_TOKENIZER, load_chat_tokenizer, set_chat_template_file
from fishertune.errors import FishertuneError, first_line
from fishertune.files import RUN_RECORD, read_json_record

if TYPE_CHECKING:  # torch loads when a model does: the commands' --help stays fast
    import torch

__all__ = [
    "ADAPTER_CONFIG",
    "DTYPES",
    "TINY_MODEL",
    "adapter_base",
    "is_adapter_folder",
    "load_causal_lm",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "resolve_dtype",
    "set_chat_template_file",  # data.tokenizer's, where the trainer has long found it
    "tiny_llama",
]

TINY_MODEL = "builtin:tiny-llama"  # the name that selects tiny_llama (the offline preset's model)
ADAPTER_CONFIG = "adapter_config.json"  # what PEFT's save_pretrained writes next to the adapter
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
    import torch

    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` (the checkpoint's dtype) and ``None``
    pass through. An unknown name is a one-line error listing :data:`DTYPES`."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise FishertuneError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _names_a_local_path(name: str) -> bool:
    # hub names are "model" or "owner/model"; anything else with a slash, or that exists, is a path
    return (
        name.startswith((".", "/", "~"))
        or Path(name).expanduser().exists()
        or (name.count("/") != 1 and "/" in name)
    )


def _local_folder(name: str, what: str) -> Path | None:
    """The folder ``name`` names (absolute), ``None`` for a hub name; a missing path is an error."""
    if not _names_a_local_path(name):
        return None
    folder = Path(name).expanduser()
    if not folder.is_dir():
        kind = "saved model folder" if what == "model" else "tokenizer folder"
        raise FishertuneError(f"{what} {name}: not a {kind} (no such folder)")
    return folder.resolve()


def check_model_source(name_or_path: str) -> None:
    """Refuse, before anything is loaded, a local path that is not a saved model folder (one
    line naming it); hub names pass (they are checked on loading)."""
    folder = _local_folder(name_or_path, "model")
    if folder is None:
        return
    run = read_json_record(folder / RUN_RECORD)
    if isinstance(run, dict) and run.get("status") != "completed":
        # a fishertune run folder: the top-level weights (if any) are not a finished run's
        why = f": {run['error']}" if run.get("error") else ""
        raise FishertuneError(
            f"model {name_or_path}: its run has not completed (status {run.get('status')}{why}); "
            "finish it (fishertune train with the same options and --resume true) or give one "
            "of its complete checkpoints (checkpoint-N)"
        )
    if not ((folder / "config.json").is_file() or is_adapter_folder(folder)):
        raise FishertuneError(
            f"model {name_or_path}: not a saved model folder (no config.json or {ADAPTER_CONFIG})"
        )
    for weights in sorted(folder.glob("*.safetensors")):
        _check_safetensors(weights)


def _check_safetensors(path: Path) -> None:
    """A truncated or corrupt ``.safetensors`` file, refused before anything is loaded:
    opening one reads its header and checks that the file holds every tensor it lists."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise FishertuneError(
            f"{path}: not a complete safetensors file ({first_line(err)}); copy it again or "
            "save the model again"
        ) from err


def is_adapter_folder(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` is a local folder holding a PEFT adapter (a LoRA run)."""
    return (Path(name_or_path).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(folder: Path) -> tuple[str, str | None]:
    """The base model (and revision) a PEFT adapter folder names in its ``adapter_config.json``."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FishertuneError(f"{folder / ADAPTER_CONFIG}: unreadable ({err})") from err
    base = config.get("base_model_name_or_path")
    if not base:
        raise FishertuneError(
            f"{folder / ADAPTER_CONFIG}: base_model_name_or_path is empty; the adapter cannot be "
            "loaded without its base model"
        )
    if base == TINY_MODEL:
        raise FishertuneError(
            f"{folder}: an adapter on {TINY_MODEL} (a random model that is not saved) cannot be "
            "reloaded; train LoRA on a saved model folder instead"
        )
    return base, config.get("revision")


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
    adapter_trainable: bool = False,
) -> Any:
    """A causal LM from a saved folder, a LoRA run folder or a hub name.

    Args:
        name_or_path: folder or hub name (see the module docstring).
        dtype: ``"auto"`` (the checkpoint's dtype), a name from :data:`DTYPES` or a
            ``torch.dtype``; ``None`` is transformers' default.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``...; ``None`` is the
            model's default.
        revision: hub revision (branch, tag or commit) of the model, or of an adapter's base.
        trust_remote_code: allow a hub model's own modelling code to run.
        merge_adapter: for a LoRA run folder, fold the adapter into the base weights
            (``merge_and_unload``) and return a plain ``transformers`` model.
        adapter_trainable: for a LoRA run folder kept unmerged, load the adapter trainable.

    Raises:
        FishertuneError: a path that is not a model folder, a model that cannot be loaded, or
            remote code needed but not allowed (one line each).
    """
    check_model_source(name_or_path)
    folder = _local_folder(name_or_path, "model")
    if folder is not None and is_adapter_folder(folder):
        from peft import PeftModel

        base_name, base_revision = adapter_base(folder)
        base = load_causal_lm(
            base_name,
            dtype=dtype,
            attn_implementation=attn_implementation,
            revision=revision or base_revision,
            trust_remote_code=trust_remote_code,
        )
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=adapter_trainable)
        if not merge_adapter:
            return model
        # PEFT froze the base when it attached the adapter; merged, it is a plain model again,
        # trainable as any loaded one (a full fine-tune from it would otherwise train nothing)
        return model.merge_and_unload().requires_grad_(True)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(folder or name_or_path),
            dtype=resolve_dtype(dtype),
            attn_implementation=attn_implementation,
            **kwargs,
        )
    except (OSError, ValueError, ImportError) as err:
        first = first_line(err)
        if "trust_remote_code" in str(err):
            raise FishertuneError(
                f"model {name_or_path!r} needs its own code from the hub: pass "
                "--trust_remote_code true if you trust it"
            ) from err
        raise FishertuneError(f"cannot load model {name_or_path!r}: {first}") from err


def _tokenizer_source(model: str, folder: Path | None) -> str:
    if folder is None:
        return model
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return str(folder)
    if is_adapter_folder(folder):  # an adapter saved without its tokenizer: the base's
        return adapter_base(folder)[0]
    raise FishertuneError(f"model {model}: no tokenizer in the folder; pass a tokenizer name")


def load_tokenizer(
    model: str,
    tokenizer: str | None = None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    chat_template_path: str | None = None,
) -> Any:
    """The chat tokenizer of ``model``: ``tokenizer`` if given, else the model folder's own, a
    LoRA folder's base's, or the shipped tiny tokenizer for :data:`TINY_MODEL`; with the
    template of ``chat_template_path`` if given."""
    tok = _load_tokenizer(model, tokenizer, revision=revision, trust_remote_code=trust_remote_code)
    return set_chat_template_file(tok, chat_template_path) if chat_template_path else tok


def _load_tokenizer(
    model: str, tokenizer: str | None, *, revision: str | None, trust_remote_code: bool
) -> Any:
    if tokenizer is not None:
        if tokenizer == TINY_TOKENIZER:
            return load_chat_tokenizer(tokenizer)
        folder = _local_folder(tokenizer, "tokenizer")
        return load_chat_tokenizer(
            str(folder or tokenizer),
            revision=revision if folder is None and tokenizer == model else None,
            trust_remote_code=trust_remote_code,
        )
    if model == TINY_MODEL:
        return load_chat_tokenizer(TINY_TOKENIZER)
    check_model_source(model)  # a run folder without its final model is named as such
    folder = _local_folder(model, "model")
    source = _tokenizer_source(model, folder)
    return load_chat_tokenizer(
        source,
        revision=revision if folder is None else None,
        trust_remote_code=trust_remote_code,
    )


def load_model(
    model: str,
    tokenizer: Any,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
    tiny_sizes: dict[str, int] | None = None,
    seed: int = 0,
) -> Any:
    """:func:`load_causal_lm`, or for :data:`TINY_MODEL` a tiny Llama built with ``tiny_sizes``
    (``hidden_size``, ``num_layers``, ``num_heads``), the loaded ``tokenizer``'s vocabulary and
    special tokens and ``seed``, then cast to ``dtype`` (the loaded dtype of a saved model)."""
    if model == TINY_MODEL:
        lm = tiny_llama(
            len(tokenizer),
            **(tiny_sizes or {}),
            seed=seed,
            attn_implementation=attn_implementation or "sdpa",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        resolved = resolve_dtype(dtype)
        return lm if resolved is None or isinstance(resolved, str) else lm.to(resolved)
    return load_causal_lm(
        model,
        dtype=dtype,
        attn_implementation=attn_implementation,
        revision=revision,
        trust_remote_code=trust_remote_code,
        merge_adapter=merge_adapter,
    )


def load_model_and_tokenizer(
    model: str,
    tokenizer: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
    tiny_sizes: dict[str, int] | None = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """:func:`load_model` and :func:`load_tokenizer` together: what ``analyze``, ``evaluate``
    and the library example use (``train`` loads the tokenizer first and the data before the
    model, so that a bad data file fails before a large model is read)."""
    tok = load_tokenizer(model, tokenizer, revision=revision, trust_remote_code=trust_remote_code)
    lm = load_model(
        model,
        tok,
        dtype=dtype,
        attn_implementation=attn_implementation,
        revision=revision,
        trust_remote_code=trust_remote_code,
        merge_adapter=merge_adapter,
        tiny_sizes=tiny_sizes,
        seed=seed,
    )
    return lm, tok
