"""``FisherSFTTrainer``: TRL's ``SFTTrainer`` with NEFTune noise or a Fisher-trace penalty.

In training mode every method goes through one loss path (:meth:`FisherSFTTrainer.compute_loss`):
a forward that returns full logits (TRL's fused LM head returns none with a gradient), the CE over
response tokens normalized as transformers normalizes it, and for token-F / logit-F the penalty
``lambda(step) * R`` with the same normalizer, so one coefficient means the same thing for any
batch layout. Evaluation uses TRL's own loss unchanged. The embeddings ``X`` are taken with a
forward hook on the model's input-embedding module, found through DDP / FSDP / DeepSpeed / PEFT
wrappers; hooks are attached when training starts and removed in a ``finally``.

The trainer orchestrates; the work lives in modules that can be read and tested alone:

* the micro-step's objective (:mod:`.loss`): plain CE, exact double backward, or finite
  differences through :mod:`fishertune.penalty_grad` (torch only), given the forward with the
  embedding shift and ``accelerator.backward``.
* randomness (:mod:`fishertune.streams`): draws, noise, penalized rows and dropout seeds come from
  named streams seeded by ``(seed, optimizer step, micro-step, rank)``: resume draws the same.
* metrics (:mod:`.stats`): summed over an optimizer step's micro-steps and ranks, logged once per
  step through ``Trainer.log``; :mod:`.guard` stops (or skips) a non-finite, diverged or
  collapsed step before the update.
* float32 master weights (:mod:`.precision`), set-up refusals (:mod:`.checks`), checkpoint
  completion records (:mod:`.checkpoints`), conversational datasets (:mod:`.data`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn
from trl import SFTTrainer

from fishertune.errors import FishertuneError
from fishertune.hessian_grad import rademacher_probes
from fishertune.noise import EmbeddingCapture, NEFTuneNoise, find_input_embeddings
from fishertune.penalties import label_mask_from_labels, sample_targets
from fishertune.penalty_grad import penalty_rows
from fishertune.schedules import every_k_coefficient, warmup_coefficient
from fishertune.streams import Stream, stream_generator
from fishertune.training.checkpoints import CheckpointRecord, restore_totals
from fishertune.training.checks import (
    WarmupCheck,
    check_launch,
    check_supported,
    linear_ce_problem,
    take_chunked,
)
from fishertune.training.config import PENALTY_METHODS, FisherSFTConfig
from fishertune.training.data import tokenize_conversations
from fishertune.training.forward import exact_attention, loss_normalizer
from fishertune.training.guard import (
    OptimizerStepHook,
    TrainingDivergedError,
    check_step,
    divergence_limit,
    gradient_norm,
)
from fishertune.training.loss import MicroStepLoss
from fishertune.training.precision import MasterWeights
from fishertune.training.stats import StepSums, Sum

__all__ = ["FisherSFTTrainer", "TrainingDivergedError"]

_READS_LOSS_SCALING = Version(transformers.__version__) >= Version("5.19")


class FisherSFTTrainer(MasterWeights, SFTTrainer):
    """``SFTTrainer`` for the methods baseline, neftune, token-f, logit-f and hessian-trace.

    Takes the same arguments as ``trl.SFTTrainer``; ``args`` must be a
    :class:`~fishertune.training.config.FisherSFTConfig`.
    """

    args: FisherSFTConfig
    # compute_loss normalizes over the whole accumulated batch itself (.forward.loss_normalizer).
    # transformers reads this from 5.19 on; on older versions TRL would turn it into a string
    # compute_loss_func that SFTTrainer's evaluation loss then calls, so it stays unset there.
    loss_is_scaled_for_ga = True if _READS_LOSS_SCALING else None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # SFTTrainer's parameters are all positional-or-keyword: bind them by name
        signature = inspect.signature(SFTTrainer.__init__)
        arguments = dict(signature.bind(None, *args, **kwargs).arguments)
        arguments.pop("self")
        config = arguments.get("args")
        if config is not None and not isinstance(config, FisherSFTConfig):
            raise FishertuneError("FisherSFTTrainer needs args=FisherSFTConfig(...)")
        if config is not None and config.assistant_only:
            tokenize_conversations(arguments, config)
        super().__init__(**arguments)
        if not isinstance(self.args, FisherSFTConfig):
            raise FishertuneError("FisherSFTTrainer needs args=FisherSFTConfig(...)")
        self._set_up_master_weights()
        self._capture = EmbeddingCapture()
        self._noise: NEFTuneNoise | None = None
        self._micro_step = 0
        self._micro_step_of = -1
        self._sums = StepSums(self.args.device)
        self._fd_precision: dict[str, bool] = {}  # measured once per run (MicroStepLoss)
        self._train_metrics: dict[str, list[float]] = {}
        self._tokens_seen = 0
        # whole-run totals (a resumed run continues them from its checkpoint's record)
        self.run_totals = {"loss_sum": 0.0, "steps": 0, "skipped_steps": 0, "wall_time_s": 0.0}
        self._clock = (time.time(), 0.0)  # (start of this train() call, wall time before it)
        check_launch(self.accelerator)
        check_supported(self.args, self.accelerator, self.model, self.is_deepspeed_enabled)
        if self.args.ce_kernel == "auto":
            problem = linear_ce_problem(
                self.args, self.accelerator, self.model, self.is_deepspeed_enabled
            )
            if problem is not None:
                take_chunked(self.args, self._fd_precision, problem)
        self.add_callback(OptimizerStepHook(self._check_step))
        self.add_callback(WarmupCheck())
        self.checkpoint_record = CheckpointRecord(self.accelerator, lambda: self.run_totals)
        self.add_callback(self.checkpoint_record)

    # ------------------------------------------------------------------ hooks lifecycle
    @contextlib.contextmanager
    def _method_hooks(self) -> Iterator[None]:
        embedding = find_input_embeddings(self.model)
        with contextlib.ExitStack() as stack:
            if self.args.method == "neftune":
                self._noise = NEFTuneNoise(
                    self.args.neftune_alpha,
                    length_mode=self.args.neftune_length,
                    distribution=self.args.neftune_distribution,
                )
                stack.enter_context(self._noise.attached(embedding))
            elif self.args.method in PENALTY_METHODS:
                stack.enter_context(self._capture.attached(embedding))
            try:
                yield
            finally:
                self._noise = None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``train``; ``train_loss`` is the mean objective per step of the whole
        run when :attr:`run_totals` cover it (transformers averages this call's steps only,
        which after a resume leaves out the steps before it). A resumed run continues the
        totals from its checkpoint's record."""
        from transformers.trainer_utils import TrainOutput, get_last_checkpoint

        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if resume is True:
            resume = get_last_checkpoint(self.args.output_dir)
        if isinstance(resume, (str, os.PathLike)):
            restore_totals(self.run_totals, Path(resume))
        self._clock = (time.time(), self.run_totals["wall_time_s"])
        with self._method_hooks():
            output = super().train(*args, **kwargs)
        self._tick()
        if not self._totals_cover_run():
            return output
        whole = self.run_train_loss()
        for entry in reversed(self.state.log_history):
            if "train_loss" in entry:
                entry["train_loss"] = whole
                break
        return TrainOutput(output.global_step, whole, {**output.metrics, "train_loss": whole})

    # ------------------------------------------------------------------ helpers
    def _stream(self, stream: Stream, device: torch.device) -> torch.Generator:
        """This micro-step's generator for ``stream`` (:mod:`fishertune.streams`): resumable."""
        return stream_generator(
            device,
            self.args.seed,
            self.state.global_step,
            self._micro_step,
            self.accelerator.process_index,
            stream,
        )

    def draw_targets(self, logits: Tensor, label_mask: Tensor) -> Tensor:
        """The penalty's sampled targets ``y'`` (N, m) at the scored positions of ``label_mask``
        (:func:`fishertune.penalties.sample_targets`, from this micro-step's stream)."""
        return sample_targets(
            logits,
            label_mask,
            samples=self.args.penalty_samples,
            sampling=self.args.penalty_sampling,
            generator=self._stream(Stream.PENALTY_TARGETS, logits.device),
        )

    def draw_probes(self, embeds: Tensor, weights: Tensor | None) -> Tensor:
        """hessian-trace's Rademacher probes ``sqrt(w) z`` (K, B, L, d), ``K =
        penalty_samples`` (:func:`fishertune.hessian_grad.rademacher_probes`, from this
        micro-step's draws stream)."""
        generator = self._stream(Stream.PENALTY_TARGETS, embeds.device)
        return rademacher_probes(embeds, self.args.penalty_samples, generator, weights)

    def current_penalty_coef(self) -> float:
        """Coefficient applied at this step: ``lambda(step)``, or with ``penalty_every = k`` the
        sum of ``lambda`` over this step and the ``k - 1`` unpenalized ones after it (0 on those),
        see :func:`fishertune.schedules.every_k_coefficient`."""
        args = self.args
        return every_k_coefficient(
            self.state.global_step, args.penalty_coef, args.penalty_warmup_steps, args.penalty_every
        )

    def _record(self, name: str, value: float) -> None:
        self._train_metrics.setdefault(name, []).append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """transformers' logging path, with this trainer's training metrics averaged over the
        steps since the last log (as TRL averages its own), and the end of training's
        ``train_loss`` over the whole run (the console and the record then agree after a
        resume; transformers' own covers this ``train()`` call only)."""
        if self.model.training and self._train_metrics:
            logs.update({k: sum(v) / len(v) for k, v in self._train_metrics.items()})
            self._train_metrics = {}
        if "train_loss" in logs and self._totals_cover_run():
            logs["train_loss"] = self.run_train_loss()
        super().log(logs, start_time)

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, Any]:
        """transformers' batches of one optimizer step; none, and training stopped, once
        ``max_steps`` is reached. transformers checks for the end only after a step, so a
        resume from the checkpoint of the last step (a run stopped during its final save)
        would otherwise train one step past ``max_steps``."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_epoch_stop = self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def training_step(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Tensor:
        """transformers' step; the loss it returns (what the ``loss`` log sums) joins the step's
        sums, so the guard and the whole-run ``train_loss`` see the objective itself.

        The final backward recomputes checkpointed layers (activation checkpointing): it must
        pick the same SDPA kernel as the forward did, or the recomputed tensors differ
        ("Recomputed values ... have different metadata"), seen with exact mode + SDPA.
        """
        with exact_attention(model, self.args.penalty_grad):
            loss = super().training_step(model, inputs, *args, **kwargs)
        self._sums.add(Sum.LOSS, loss)
        return loss

    def _check_step(self, model: nn.Module) -> None:
        """Once per optimizer step, before the update: gather the step's sums across ranks, log
        them, and stop (or skip) a non-finite, diverged or collapsed step (:mod:`.guard`)."""
        totals = self._sums.gather(self.accelerator.gather)
        values = totals.guarded_values()
        grad_norm = None
        if self.accelerator.scaler is None and not self.is_deepspeed_enabled:
            # a loss scaler skips overflowing fp16 steps itself; DeepSpeed keeps its own grads
            grad_norm = gradient_norm(model)
        skip = check_step(
            values,
            grad_norm,
            step=self.state.global_step + 1,
            ce_limit=divergence_limit(self._sums.vocab_size, self.args.divergence_max_ce),
            tokens=totals.sums[Sum.TOKENS],
            on_nonfinite=self.args.on_nonfinite,
            skipped_before=self.run_totals["skipped_steps"],
        )
        if skip:
            model.zero_grad(set_to_none=True)  # the optimizer leaves every parameter as it was
            self.run_totals["skipped_steps"] += 1
            self._train_metrics["skipped_steps"] = [self.run_totals["skipped_steps"]]
            return
        self.run_totals["loss_sum"] += totals.loss
        self.run_totals["steps"] += 1
        self._tick()
        self._record("ce_loss", values["ce_loss"])
        self._record("entropy", totals.per_token(Sum.ENTROPY))
        self._record("mean_token_accuracy", totals.per_token(Sum.CORRECT))
        if self.args.method in PENALTY_METHODS:
            self._record("penalty_term", totals.per_token(Sum.PENALTY_TERM))
            if "penalty" in values:
                self._record("penalty", values["penalty"])

    def _tick(self) -> None:
        started, before = self._clock
        self.run_totals["wall_time_s"] = round(before + time.time() - started, 3)

    def _totals_cover_run(self) -> bool:
        totals = self.run_totals
        return totals["steps"] + totals["skipped_steps"] == self.state.global_step

    def run_train_loss(self) -> float:
        """Mean objective per optimizer step over the whole run, resumed parts included."""
        return self.run_totals["loss_sum"] / max(self.run_totals["steps"], 1)

    def _count_tokens(self, inputs: dict[str, Tensor]) -> None:
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:
            local = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
        self._tokens_seen += self.accelerator.gather_for_metrics(local[None]).sum().item()
        self._train_metrics["num_tokens"] = [self._tokens_seen]

    # ------------------------------------------------------------------ the loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The micro-step's objective (:mod:`.loss`) in training; TRL's loss in evaluation."""
        if not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._micro_step_of != self.state.global_step:
            self._micro_step_of, self._micro_step = self.state.global_step, 0
        labels = inputs["labels"]
        if self._noise is not None:
            self._noise.set_batch(inputs.get("attention_mask"), inputs.get("position_ids"))
            self._noise.generator = self._stream(Stream.NEFTUNE, labels.device)
        self._count_tokens(inputs)
        # set by the training loop; a direct compute_loss call counts one micro-step
        accumulation_steps = getattr(self, "current_gradient_accumulation_steps", 1)
        normalizer = loss_normalizer(
            label_mask_from_labels(labels),
            num_items_in_batch,
            reduction=self.args.loss_reduction,
            processes=self.accelerator.num_processes,
            average_tokens_across_devices=self.args.average_tokens_across_devices,
            accumulation_steps=accumulation_steps,
        )
        # built per micro-step: a hyperparameter search replaces the args and the accelerator
        step_loss = MicroStepLoss(
            self.args,
            self.accelerator,
            self._capture,
            self._sums,
            self._stream,
            self.draw_targets,
            self.draw_probes,
            self._fd_precision,
        )
        coef = self.current_penalty_coef() if step_loss.kind is not None else 0.0
        rows = None
        if coef > 0:
            generator = self._stream(Stream.PENALTY_ROWS, torch.device("cpu"))
            fraction = self.args.penalty_fraction
            rows = penalty_rows(labels.shape[0], fraction, generator, labels.device)
        if rows is None or not label_mask_from_labels(labels)[rows].any():
            # No penalty on this micro-step (baseline, neftune, warm-up at 0, a skipped step of
            # penalty_every, or no scored token in the penalized rows): plain CE.
            loss = step_loss.plain(model, inputs, normalizer)
        else:
            penalized = step_loss.exact if self.args.penalty_grad == "exact" else step_loss.fd
            loss = penalized(model, inputs, normalizer, coef, rows)
            # with penalty_match_neftune_alpha: the effective mean coefficient of the rows
            self._record(
                "penalty_coef",
                warmup_coefficient(
                    self.state.global_step, self.args.penalty_coef, self.args.penalty_warmup_steps
                )
                * step_loss.mean_row_coef,
            )
        self._micro_step += 1
        if num_items_in_batch is None and not self.loss_is_scaled_for_ga:
            # transformers < 5.19 divides a loss computed without num_items_in_batch by the
            # accumulation steps, which the normalizer already holds (and split fd's early
            # backwards used): the returned part is multiplied back
            loss = loss * accumulation_steps
        return loss
