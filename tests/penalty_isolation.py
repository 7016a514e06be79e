"""The penalty's part of one micro-step's gradient, isolated, through the trainer's own objective.

A step's gradient is the CE's plus ``lambda`` times the penalty's. At the coefficients users run
(the paper presets' 1e-6 and 2e-6, NEFTune-matched ones) the penalty is a small part of it, so an
error of fd that is small against the CE can be large against the penalty: it must be measured
relative to the penalty's own gradient.

* ``penalty_reference``: ``grad R`` by exact double backward in float32 (no autocast) at
  ``lambda = 1``, where the penalty dominates and rounding of the CE cannot hide it:
  ``(grad(CE + R) - grad CE)``, both through :class:`~fishertune.training.loss.MicroStepLoss`.
* ``fd_penalty_part``: fd's step gradient at ``lambda`` minus the CE's gradient at ``X`` computed
  by the same kernels in the same precision (the fd objective at ``lambda = 0``, whose passes add
  exact zeros; checked against the dense CE in float32 by the tests). Under bf16 autocast that
  keeps the CE's own rounding out of the difference.

Every call uses the same fixed draws ``y'`` (uniform tokens per position, independent of the
logits, so float32 and bf16 draw the same and any split of the rows over processes too).

The float32 floor: the parameter gradients are accumulated in float32 (master weights), so a part
``lambda grad R`` added to ``grad CE`` is resolved only to about ``eps_32 ||grad CE||``; relative
to the penalty that is ``eps_32 ||grad CE|| / (lambda ||grad R||)``, the same for every method
(exact too). :func:`float32_floor` returns it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from fishertune.penalties import label_mask_from_labels
from fishertune.training.loss import MicroStepLoss

EPS_32 = float(torch.finfo(torch.float32).eps)


def fixed_batch(trainer, size: int = 4) -> dict[str, Tensor]:
    """The first ``size`` training rows, collated: the same in every process."""
    rows = [trainer.train_dataset[i] for i in range(size)]
    return dict(trainer.data_collator(rows))


def fixed_draws(labels: Tensor, vocab_size: int, seed: int = 11) -> Tensor:
    """(B, L) uniform tokens: draw ``y'_t`` for every position, read at the scored ones."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, labels.shape, generator=generator)


def step_loss(trainer, draws: Tensor) -> MicroStepLoss:
    """The trainer's micro-step objective with the draws fixed (``draws`` (B, L) for the rows
    the call sees)."""

    def draw(logits: Tensor, label_mask: Tensor) -> Tensor:
        return draws.to(label_mask.device)[label_mask][:, None]  # (N, 1)

    return MicroStepLoss(
        trainer.args,
        trainer.accelerator,
        trainer._capture,
        trainer._sums,
        trainer._stream,
        draw,
        trainer.draw_probes,
    )


@contextlib.contextmanager
def attached(trainer) -> Iterator[None]:
    with trainer._capture.attached(trainer.model.get_input_embeddings()):
        yield


def micro_step_gradient(
    trainer,
    model: torch.nn.Module,
    batch: dict[str, Tensor],
    draws: Tensor,
    coef: float,
    mode: str,
    normalizer: Tensor,
    autocast: bool = False,
) -> Tensor:
    """The flattened parameter gradient of one micro-step: ``mode`` ``"fd"``, ``"exact"`` or
    ``"plain"`` (dense CE, no penalty), with the penalty on every row."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss_of = step_loss(trainer, draws)
    rows = torch.arange(batch["labels"].shape[0])
    context = trainer.accelerator.autocast() if autocast else contextlib.nullcontext()
    with attached(trainer), context:
        if mode == "plain":
            loss = loss_of.plain(model, batch, normalizer)
        else:
            loss = getattr(loss_of, mode)(model, batch, normalizer, coef, rows)
        trainer.accelerator.backward(loss)
    return torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])


def token_count(batch: dict[str, Tensor]) -> Tensor:
    return label_mask_from_labels(batch["labels"]).sum().float()


def penalty_reference(
    trainer, batch: dict[str, Tensor], draws: Tensor, normalizer: Tensor | None = None
) -> Tensor:
    """``grad R`` by exact double backward, float32, on ``trainer``'s current weights, divided by
    ``normalizer`` (default: the batch's scored tokens, the mean reduction)."""
    normalizer = token_count(batch) if normalizer is None else normalizer
    model = trainer.model
    with_penalty = micro_step_gradient(trainer, model, batch, draws, 1.0, "exact", normalizer)
    ce = micro_step_gradient(trainer, model, batch, draws, 0.0, "exact", normalizer)
    return with_penalty - ce


def float32_floor(ce_gradient: Tensor, penalty_part: Tensor) -> float:
    """``eps_32 ||grad CE|| / ||lambda grad R||``: what float32 gradients resolve of the penalty."""
    return EPS_32 * float(ce_gradient.norm() / penalty_part.norm())


def relative_error(estimate: Tensor, reference: Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())
