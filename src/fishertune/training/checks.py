"""Set-up checks of ``FisherSFTTrainer``: launch and option combinations refused up front."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from fishertune.errors import FishertuneError
from fishertune.schedules import mean_warmup_fraction, warmup_coefficient
from fishertune.training.config import PENALTY_METHODS

logger = logging.getLogger(__name__)

__all__ = [
    "TWICE_DIFFERENTIABLE_ATTENTION",
    "WEAK_WARMUP_FRACTION",
    "WarmupCheck",
    "attention_implementation",
    "check_launch",
    "check_supported",
    "unwrap",
    "warmup_warning",
]

# below this mean fraction of its target over the run, the penalty is too weak to be the method
# that was asked for (a run with a 600-step warm-up and max_steps=30 averages 2.4%)
WEAK_WARMUP_FRACTION = 0.5

TWICE_DIFFERENTIABLE_ATTENTION = ("eager", "sdpa")


def unwrap(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def attention_implementation(model: nn.Module) -> str | None:
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None)


def check_launch(accelerator: Any) -> None:
    """Refuse a torchrun launch that accelerate did not turn into one distributed run."""
    # accelerate 1.15 leaves torchrun-launched processes undistributed when use_cpu=false on
    # a machine without an accelerator: each would train alone on the whole data (measured)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise FishertuneError(
            f"launched as {launched} processes but accelerate runs "
            f"{accelerator.num_processes} ({accelerator.distributed_type}): on CPU "
            "set use_cpu=true so the processes train together over gloo"
        )


def _fsdp(accelerator: Any) -> bool:
    return getattr(accelerator, "distributed_type", None) == "FSDP"


def linear_ce_problem(args: Any, accelerator: Any, model: nn.Module, deepspeed: bool) -> str | None:
    """Why ``ce_kernel=linear`` cannot apply to this run (``None``: it can; its first step
    still checks that the logits are the projection of the hidden states)."""
    if args.method in PENALTY_METHODS and args.penalty_grad == "exact":
        return "penalty_grad=exact differentiates the logits twice"
    if deepspeed or _fsdp(accelerator):
        return "FSDP and DeepSpeed shard the output projection's weight"
    getter = getattr(unwrap(model), "get_output_embeddings", None)
    problem = head_problem(getter() if callable(getter) else None)
    if problem is not None:
        return problem
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # PEFT
    parameters = inspect.signature(base.forward).parameters.values()
    if not any(p.name == "logits_to_keep" or p.kind is p.VAR_KEYWORD for p in parameters):
        return "its forward takes no logits_to_keep"
    return None


def head_problem(head: nn.Module | None) -> str | None:
    """Why the linear kernel cannot project with this output embedding (``None``: it can): it
    needs one, a plain ``nn.Linear`` (no adapter on it)."""
    if head is None:
        return "the model has no output embedding"
    if type(head) is not nn.Linear:
        return f"its output embedding is a {type(head).__name__}, not a plain Linear"
    return None


def take_chunked(args: Any, precision: dict[str, bool], problem: str) -> None:
    """The linear kernel does not apply (``problem``): ``ce_kernel=auto`` takes the chunked one
    for the rest of the run (``precision["linear_ce"]``, logged); ``linear`` is refused."""
    if args.ce_kernel != "auto":
        raise FishertuneError(f"ce_kernel=linear: {problem}; use ce_kernel=chunked")
    precision["linear_ce"] = False
    logger.info("ce_kernel=auto: the chunked kernel, as %s", problem)


def holds_table_gradient(model: nn.Module, kind: str | None, split: bool, fused: bool) -> bool:
    """Whether fd's passes before the last hold the input embedding table's gradient back for
    the last backward (:meth:`fishertune.noise.EmbeddingCapture.holding_table_gradient`): split
    backward, not fused (it takes ``X``'s parameter gradients by hand), not the Hessian trace,
    and a table that is not the output head too (tied: the head's backward at ``X`` makes the
    table's gradient anyway, and holding would only add a buffer)."""
    if not split or fused or kind == "hessian":
        return False
    inner = unwrap(model)
    table, head = (
        getattr(getattr(inner, name, lambda: None)(), "weight", None)
        for name in ("get_input_embeddings", "get_output_embeddings")
    )
    return table is not None and head is not table


def check_supported(args: Any, accelerator: Any, model: nn.Module, deepspeed: bool) -> None:
    """Refuse, with the reason, option combinations known to fail or to be wrong (measured)."""
    if getattr(args, "ce_kernel", None) == "linear" and (deepspeed or _fsdp(accelerator)):
        # the projection's weight is used outside its module's forward: FSDP and ZeRO-3 gather
        # a sharded weight only inside it
        raise FishertuneError(
            "ce_kernel=linear needs the output projection's whole weight outside its forward, "
            "which FSDP and DeepSpeed shard: use ce_kernel=chunked"
        )
    if args.method not in PENALTY_METHODS:
        return
    if deepspeed and args.penalty_fd_backward == "split":
        # split calls accelerator.backward inside compute_loss: DeepSpeed's engine would
        # scale by the accumulation steps again and may step the optimizer mid-micro-step
        raise FishertuneError(
            "penalty_fd_backward=split does not work under DeepSpeed (its engine owns backward "
            "and the optimizer step): use penalty_fd_backward=joint or auto"
        )
    if getattr(args, "penalty_fd_fused_ce", False):
        if args.penalty_grad != "fd" or args.method not in ("token-f", "logit-f"):
            raise FishertuneError(
                "penalty_fd_fused_ce applies to penalty_grad=fd with token-f or logit-f only"
            )
        if deepspeed or getattr(args, "fp16", False) or _fsdp(accelerator):
            # the fused step adds grad_theta g(X) into p.grad by hand, which neither a loss
            # scaler nor sharded (FSDP) or engine-owned (DeepSpeed) gradients allow
            raise FishertuneError(
                "penalty_fd_fused_ce needs gradients accumulated in place (one process or DDP, "
                "no fp16 loss scaler): set penalty_fd_fused_ce=false"
            )
        logger.warning(
            "penalty_fd_fused_ce: the CE is taken at X + h v, its gradient off by about h_rel "
            "times its own: accurate only while the penalty's gradient is far larger than that"
        )
    half = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))
    fisher = args.method in ("token-f", "logit-f")
    if fisher and args.penalty_grad == "fd" and args.penalty_fd_scheme == "forward" and half:
        # one half-precision backward holds the CE and -(2/h) g(X): the CE's rounding lands in
        # the penalty's part (tests/test_fd_coefficients.py measures it)
        logger.warning(
            "penalty_fd_scheme=forward under half precision: the penalty's gradient shares a "
            "backward with the CE's, whose rounding (about 4e-3 of it) hides a small penalty; "
            "central (the default here) keeps them apart"
        )
    if deepspeed and args.on_nonfinite == "skip":
        raise FishertuneError(
            "on_nonfinite=skip does not work under DeepSpeed (its engine owns the gradients): "
            "use on_nonfinite=stop"
        )
    ddp_static = getattr(args, "ddp_static_graph", None)
    if ddp_static:
        raise FishertuneError(
            "ddp_static_graph=true gives wrong gradients for the penalty (measured); set "
            "ddp_static_graph=false"
        )
    if args.penalty_grad == "exact":
        attention = attention_implementation(model)
        if attention not in TWICE_DIFFERENTIABLE_ATTENTION:
            raise FishertuneError(
                f"penalty_grad=exact needs twice-differentiable attention, but the model uses "
                f"attn_implementation={attention!r}: load it with attn_implementation='eager' "
                "or 'sdpa' (run with the math kernel), or use penalty_grad=fd"
            )
        if args.torch_compile:
            raise FishertuneError(
                "penalty_grad=exact does not work with torch_compile (no double backward "
                "through compiled graphs); use penalty_grad=fd"
            )
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if deepspeed and plugin is not None and plugin.zero_stage == 3:
            raise FishertuneError(
                "DeepSpeed ZeRO-3 does not support second-order autograd: use penalty_grad=fd"
            )


def warmup_warning(args: Any, total_steps: int) -> str | None:
    """One line when the penalty's warm-up keeps its coefficient far below its target over a
    run of ``total_steps`` optimizer steps: the warm-up is longer than the run, or the
    coefficient's mean over the run is below :data:`WEAK_WARMUP_FRACTION` of the target."""
    warmup = args.penalty_warmup_steps
    if args.method not in PENALTY_METHODS or not args.penalty_coef or total_steps <= 0:
        return None
    mean = mean_warmup_fraction(total_steps, warmup)
    if warmup <= total_steps and mean >= WEAK_WARMUP_FRACTION:
        return None
    last = warmup_coefficient(total_steps - 1, 1.0, warmup)
    return (
        f"penalty_warmup_steps={warmup} against a run of {total_steps} optimizer steps: the "
        f"penalty's coefficient reaches {last:.1%} of its target and averages {mean:.1%} over "
        f"the run (below {WEAK_WARMUP_FRACTION:.0%}); set penalty_warmup_steps well below "
        f"{total_steps} (0: no warm-up)"
    )


class WarmupCheck(TrainerCallback):
    """Warns once per ``train()`` (main process) with :func:`warmup_warning`, when the run's
    length is known: ``state.max_steps`` counts the optimizer steps of an epoch-based run too."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        message = warmup_warning(args, state.max_steps)
        if message and state.is_world_process_zero:
            logger.warning("%s", message)


def linear_projection_problem(
    logits: Tensor, hidden: Tensor, head: nn.Module, mm_dtype: torch.dtype
) -> str | None:
    """Why the linear kernel cannot take this model (``None``: it can): it needs
    ``logits = W h + b``, a plain ``nn.Linear`` head (:func:`head_problem`) and no logit scale
    or softcap (Gemma 2, Cohere), compared at one position."""
    problem = head_problem(head)
    if problem is None:
        with torch.no_grad():
            # by hand, not head(): a hook on the head (or a softcap after it) must show
            bias = None if head.bias is None else head.bias.to(mm_dtype)
            projected = nn.functional.linear(
                hidden.detach().to(mm_dtype), head.weight.to(mm_dtype), bias
            ).float()
            scale = logits.detach().float().abs().max().clamp(min=1e-6)
            if float((logits.detach().float() - projected).abs().max() / scale) > 1e-2:
                problem = "its logits are not its last hidden state times its output embedding"
    return problem


def sharded(tensor: Tensor) -> bool:
    """A DTensor (FSDP2's sharded parameters); imported here, as torch builds without
    distributed support have none."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
