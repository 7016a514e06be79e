"""Stop (or skip) an optimizer step whose numbers show that training has broken down.

Checked once per optimizer step, after the gradients of all micro-steps are in and before the
optimizer applies them (transformers' ``on_pre_optimizer_step`` hook), on values that every rank
shares (gathered metrics, all-reduced gradients), so all ranks take the same decision:

* a non-finite ``loss`` (the objective), ``ce_loss``, ``penalty`` or gradient norm;
* divergence: a mean CE per token above ``max_ce`` nats (by default ``4 ln V``: a model that
  predicts uniformly scores ``ln V``, so four times that means the logits have blown up; at
  learning rate 1e3 the tiny preset reaches 3.9e5 at its third step);
* collapse: a gradient of norm exactly 0 while tokens are scored (the loss no longer depends on
  the weights, e.g. saturated logits after a divergence: CE stuck at ``ln V`` and nothing learns).

``on_nonfinite="stop"`` (default) raises :class:`TrainingDivergedError` before the update, so the
weights in memory are still those of the last good step and no later checkpoint is written;
``"skip"`` drops the gradients of a step with a non-finite value (the optimizer leaves every
parameter and its state as they were), counts it and goes on. Divergence and collapse always
stop: skipping cannot repair them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from fishertune.errors import FishertuneError

__all__ = [
    "OptimizerStepHook",
    "TrainingDivergedError",
    "check_step",
    "diagnose",
    "divergence_limit",
    "gradient_norm",
]

logger = logging.getLogger(__name__)


class TrainingDivergedError(FishertuneError):
    """Training stopped on a non-finite, diverged or collapsed step; the message says which."""


def divergence_limit(vocab_size: int, max_ce: float | None) -> float:
    """CE per token above which a step counts as diverged: ``max_ce``, else ``4 ln V``.

    ``max_ce <= 0`` switches the check off.
    """
    if max_ce is None:
        return 4.0 * math.log(max(vocab_size, 2))
    return math.inf if max_ce <= 0 else float(max_ce)


def diagnose(
    values: dict[str, float], grad_norm: float | None, *, ce_limit: float, tokens: float
) -> tuple[list[str], list[str]]:
    """``(non_finite, broken)``: names of non-finite quantities, and divergence/collapse reasons.

    Args:
        values: the step's ``loss``, ``ce_loss`` and (on penalized steps) ``penalty``.
        grad_norm: total gradient norm, ``None`` where it is not checked.
        ce_limit: see :func:`divergence_limit`.
        tokens: scored tokens in the step (collapse is only defined when some are scored).
    """
    checked = dict(values)
    if grad_norm is not None:
        checked["grad_norm"] = grad_norm
    non_finite = [name for name, value in checked.items() if not math.isfinite(value)]
    broken = []
    if not non_finite:
        ce = values.get("ce_loss", 0.0)
        if ce > ce_limit:
            broken.append(
                f"diverged: ce_loss {ce:.4g} > {ce_limit:.4g} nats per token (the logits blew up)"
            )
        elif grad_norm == 0.0 and tokens > 0 and values.get("loss", 0.0) > 0:
            broken.append(
                f"collapsed: gradient norm 0 at ce_loss {ce:.4g} (the loss no longer depends on "
                "the weights)"
            )
    return non_finite, broken


def gradient_norm(model: nn.Module) -> float:
    """Total 2-norm of the (already reduced) gradients; inf or nan if any entry is."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def check_step(
    values: dict[str, float],
    grad_norm: float | None,
    *,
    step: int,
    ce_limit: float,
    tokens: float,
    on_nonfinite: str,
    skipped_before: int,
) -> bool:
    """Whether to skip this step (``on_nonfinite="skip"`` and a non-finite value only); raises
    :class:`TrainingDivergedError` where training must stop (see :func:`diagnose`)."""
    non_finite, broken = diagnose(values, grad_norm, ce_limit=ce_limit, tokens=tokens)
    if non_finite and on_nonfinite == "skip" and not broken:
        logger.warning(
            "step %d: non-finite %s: step skipped (%d so far)",
            step,
            ", ".join(non_finite),
            skipped_before + 1,
        )
        return True
    if non_finite or broken:
        what = f"non-finite {', '.join(non_finite)}" if non_finite else broken[0]
        raise TrainingDivergedError(
            f"step {step}: {what}; training stopped before this update (checkpoints "
            "written so far are kept): lower the learning rate or the penalty coefficient"
            + ("" if broken else ", or set on_nonfinite=skip")
        )
    return False


class OptimizerStepHook(TrainerCallback):
    """Calls ``check(model)`` once per optimizer step, before the optimizer applies the gradients.

    The trainer passes its own step check (gathering the step's metrics and deciding with
    :func:`diagnose`); the callback is only the hook transformers offers at that point.
    """

    def __init__(self, check: Callable[[Any], None]) -> None:
        self.check = check

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.check(kwargs["model"])
