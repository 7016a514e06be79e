"""Per-optimizer-step sums of the training metrics, gathered across ranks once per step.

Torch only. Every micro-step adds to one float64 vector per rank (on the device: no
synchronization per micro-step); the optimizer-step hook gathers the vectors of all ranks once and
turns the sums into per-token means, weighted by tokens as the loss is. With the ``mean``
reduction the logged ``loss`` (the objective) then equals ``ce_loss + penalty_term`` under any
gradient accumulation.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StepSums", "StepTotals", "Sum"]


class Sum(enum.IntEnum):
    """The entries of a step's sum vector."""

    TOKENS = 0  # scored tokens
    ENTROPY = 1  # entropy of p_t, summed over scored tokens
    CORRECT = 2  # scored tokens whose argmax is the label
    CE = 3  # cross-entropy, summed
    PENALTY = 4  # R: ||v||^2 summed over draws' mean (times a row fraction's rescale)
    PENALTY_TERM = 5  # the coefficients x R (per row under NEFTune matching)
    PENALIZED = 6  # penalized micro-steps
    LOSS = 7  # the loss the training step returned (what transformers logs as `loss`)


# the entries of fishertune.vocab.ScoredTerms.statistics, in order
_STATISTICS = (Sum.TOKENS, Sum.ENTROPY, Sum.CORRECT, Sum.CE)


class StepSums:
    """The running sums of one optimizer step on one rank."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.vector: Tensor | None = None
        self.vocab_size = 0

    def add(self, index: Sum, value: Tensor | float) -> None:
        if self.vector is None:
            self.vector = torch.zeros(len(Sum), dtype=torch.float64, device=self.device)
        self.vector[index] += value.detach().double() if isinstance(value, Tensor) else value

    @torch.no_grad()
    def add_scored(self, log_probs: Tensor, targets: Tensor, label_mask: Tensor) -> None:
        """CE, entropy, accuracy and token count of scored positions: ``log_probs`` (N, V),
        ``targets`` (N,)."""
        self.vocab_size = log_probs.shape[-1]
        self.add(Sum.TOKENS, label_mask.sum())
        self.add(Sum.ENTROPY, -(log_probs.exp() * log_probs).sum())
        self.add(Sum.CORRECT, (log_probs.argmax(-1) == targets).sum())
        self.add(Sum.CE, -log_probs.gather(1, targets[:, None]).sum())

    @torch.no_grad()
    def add_statistics(self, statistics: Tensor, vocab_size: int) -> None:
        """The same sums from :class:`fishertune.vocab.ScoredTerms`' ``statistics`` (4,):
        tokens, entropy, argmax-correct count, CE (computed chunk by chunk)."""
        self.vocab_size = vocab_size
        for index, value in zip(_STATISTICS, statistics.detach().double(), strict=True):
            self.add(index, value)

    @torch.no_grad()
    def add_penalty(
        self,
        squared_norm: Tensor,
        rescale: float,
        coef: float,
        row_coef: float = 1.0,
        unweighted: Tensor | None = None,
    ) -> None:
        """The penalty ``R`` (times the rows' rescale) and its weighted term: logged per scored
        token, whatever the loss reduction, so comparable across runs.

        Under NEFTune matching ``squared_norm`` is weighted by the rows' coefficients
        (``sum_b w_b R_b``): ``unweighted`` is ``sum_b R_b`` (the Fisher penalties give it), so
        the log holds R itself, whatever the rows' split over processes. Without it (the
        Hessian trace, whose probes carry the weights) the weighted sum over the rows' mean
        coefficient ``row_coef`` is logged: R when the rows' coefficients agree."""
        value = squared_norm.detach().double() * rescale
        if unweighted is not None:
            self.add(Sum.PENALTY, unweighted.detach().double() * rescale)
        else:
            self.add(Sum.PENALTY, value / row_coef)
        self.add(Sum.PENALTY_TERM, coef * value)
        self.add(Sum.PENALIZED, 1.0)

    def gather(self, gather: Callable[[Tensor], Tensor]) -> StepTotals:
        """Gather every rank's vector (``accelerator.gather``) and start the next step at 0."""
        vector = self.vector
        self.vector = None
        if vector is None:
            vector = torch.zeros(len(Sum), dtype=torch.float64, device=self.device)
        gathered = gather(vector[None]).view(-1, len(Sum))
        # transformers logs the mean of the ranks' losses
        return StepTotals(gathered.sum(0).tolist(), gathered[:, Sum.LOSS].mean().item())


@dataclass
class StepTotals:
    """A step's sums over all ranks and its logged loss."""

    sums: list[float]
    loss: float

    def per_token(self, index: Sum) -> float:
        return self.sums[index] / max(self.sums[Sum.TOKENS], 1.0)

    def guarded_values(self) -> dict[str, float]:
        """What the guard checks: the objective, CE and (on penalized steps) the penalty."""
        values = {"loss": self.loss, "ce_loss": self.per_token(Sum.CE)}
        if self.sums[Sum.PENALIZED] > 0:
            values["penalty"] = self.per_token(Sum.PENALTY)
        return values
