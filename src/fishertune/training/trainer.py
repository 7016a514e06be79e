"""``FisherSFTTrainer``: TRL's ``SFTTrainer`` with NEFTune noise or a Fisher-trace penalty.

In training mode every method goes through one loss path (:meth:`FisherSFTTrainer.compute_loss`):
a forward that returns full logits (TRL's fused LM head returns none with a gradient), the CE over
response tokens with the reduction transformers uses (normalized by ``num_items_in_batch`` under
gradient accumulation), and for token-F / logit-F the penalty ``lambda(step) * R`` with the same
normalizer, so one coefficient means the same thing for any batch layout. Evaluation uses TRL's
own loss unchanged.

The embeddings ``X`` are taken with a forward hook on the model's input-embedding module
(:class:`fishertune.noise.EmbeddingCapture`), found through DDP / FSDP / DeepSpeed / PEFT wrappers,
so any transformers causal LM works. Hooks are attached when training starts and removed in a
``finally``: a saved or evaluated model carries none.

The trainer orchestrates; the work lives in modules that can be read and tested alone:

* penalty gradients (:mod:`fishertune.penalty_grad`, torch only): the trainer hands the engine its
  forward with the embedding shift and ``accelerator.backward`` (under ``no_sync`` for all but the
  last pass), its normalizer and the draws. ``penalty_grad="exact"`` is double backward (eager
  attention or SDPA forced to its math kernel; other kernels are refused up front);
  ``penalty_grad="fd"`` finite differences of first-order gradients.
* randomness (:mod:`fishertune.streams`): the penalty's draws, NEFTune's noise, the penalized rows
  and the penalty's dropout seed come from named streams seeded by ``(seed, optimizer step,
  micro-step, rank)``, so a resumed run draws exactly what an uninterrupted one would.
* metrics (:mod:`.stats`): summed over the micro-steps and ranks of an optimizer step, logged
  once per step through ``Trainer.log``, weighted by tokens as the loss is (with the ``mean``
  reduction the logged ``loss`` equals ``ce_loss + penalty_term``); :mod:`.guard` stops (or skips)
  a non-finite, diverged or collapsed step before the update.
* precision (:mod:`.precision`): float32 master weights under bf16/fp16 autocast, the final model
  saved in the loaded dtype; set-up refusals (:mod:`.checks`); checkpoint completion records
  (:mod:`.checkpoints`); conversational datasets tokenized as ``fishertune train`` does
  (:mod:`.data`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import Tensor, nn
from trl import SFTTrainer

from fishertune.errors import FishertuneError
from fishertune.noise import EmbeddingCapture, NEFTuneNoise, find_input_embeddings
from fishertune.penalties import label_mask_from_labels, sample_targets, scored_log_probs
from fishertune.penalty_grad import FDSettings, Passes, exact_penalty, fd_penalty_loss, penalty_rows
from fishertune.schedules import every_k_coefficient, warmup_coefficient
from fishertune.streams import Stream, stream_generator
from fishertune.training.checkpoints import CheckpointRecord, restore_totals
from fishertune.training.checks import attention_implementation, check_launch, check_supported
from fishertune.training.config import FisherSFTConfig
from fishertune.training.data import tokenize_conversations
from fishertune.training.guard import (
    OptimizerStepHook,
    TrainingDivergedError,
    check_step,
    divergence_limit,
    gradient_norm,
)
from fishertune.training.precision import MasterWeights
from fishertune.training.stats import StepSums, Sum

__all__ = ["FisherSFTTrainer", "TrainingDivergedError"]

logger = logging.getLogger(__name__)


class FisherSFTTrainer(MasterWeights, SFTTrainer):
    """``SFTTrainer`` for the methods baseline, neftune, token-f and logit-f.

    Takes the same arguments as ``trl.SFTTrainer``; ``args`` must be a
    :class:`~fishertune.training.config.FisherSFTConfig`.
    """

    args: FisherSFTConfig

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
        self._kind = {"token-f": "token", "logit-f": "logit"}.get(self.args.method)
        self._capture = EmbeddingCapture()
        self._noise: NEFTuneNoise | None = None
        self._micro_step = 0
        self._micro_step_of = -1
        self._sums = StepSums(self.args.device)
        self._train_metrics: dict[str, list[float]] = {}
        self._tokens_seen = 0
        # whole-run totals (a resumed run continues them from its checkpoint's record)
        self.run_totals = {"loss_sum": 0.0, "steps": 0, "skipped_steps": 0, "wall_time_s": 0.0}
        self._clock = (time.time(), 0.0)  # (start of this train() call, wall time before it)
        check_launch(self.accelerator)
        check_supported(self.args, self.accelerator, self.model, self.is_deepspeed_enabled)
        self.add_callback(OptimizerStepHook(self._check_step))
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
            elif self._kind is not None:
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
        totals = self.run_totals
        if totals["steps"] + totals["skipped_steps"] != self.state.global_step:
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

    def current_penalty_coef(self) -> float:
        """Coefficient applied at this step: ``lambda(step)``, or with ``penalty_every = k`` the
        sum of ``lambda`` over this step and the ``k - 1`` unpenalized ones after it (0 on those),
        see :func:`fishertune.schedules.every_k_coefficient`."""
        args = self.args
        return every_k_coefficient(
            self.state.global_step, args.penalty_coef, args.penalty_warmup_steps, args.penalty_every
        )

    def _loss_normalizer(self, label_mask: Tensor, num_items_in_batch: Any) -> Tensor:
        """Denominator shared by CE and penalty, as transformers/TRL compute it.

        ``mean``: the number of scored tokens in the whole accumulated (and, with
        ``average_tokens_across_devices``, all-rank) batch, times the number of processes since
        DDP averages gradients. ``sum``: 1 / number of processes, so DDP's average is the sum.
        """
        processes = self.accelerator.num_processes
        if self.args.loss_reduction == "sum":
            return torch.tensor(1.0 / processes, device=label_mask.device)
        if num_items_in_batch is None:
            return label_mask.sum().float().clamp(min=1.0)
        count = torch.as_tensor(num_items_in_batch, device=label_mask.device).float().clamp(min=1.0)
        if self.args.average_tokens_across_devices:
            count = count / processes
        return count

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        # Mirrors transformers' Trainer.training_step: the loss is divided by the accumulation
        # steps unless it was already normalized by num_items_in_batch.
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )

    def _ga_divisor(self, num_items_in_batch: Any) -> int:
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            return 1
        # set by the training loop; a direct compute_loss call counts one micro-step
        return getattr(self, "current_gradient_accumulation_steps", 1)

    def _grads_accumulate_locally(self, model: nn.Module) -> bool:
        """Whether ``p.grad += x`` by hand equals a backward that accumulates ``x``: not under a
        loss scaler (fp16), FSDP (sharded DTensor gradients, also when ``fully_shard`` was applied
        outside accelerate) or DeepSpeed (its engine owns the gradients)."""
        if self.accelerator.scaler is not None or self.accelerator.distributed_type in (
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
        ):
            return False
        from torch.distributed.tensor import DTensor

        return not any(isinstance(p, DTensor) for p in model.parameters())

    def _no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        # accelerate picks DDP's no_sync or FSDP2's requires_gradient_sync(False)
        if self.accelerator.num_processes > 1:
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()

    def _attention_context(self) -> contextlib.AbstractContextManager:
        if self.args.penalty_grad == "exact" and attention_implementation(self.model) == "sdpa":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()

    def _forward(
        self, model: nn.Module, inputs: dict[str, Tensor], rng_seed: int | None = None
    ) -> Tensor:
        """Logits (B, L, V); with ``rng_seed``, dropout masks drawn from that seed.

        The penalty's forwards share one seed: fd differences g(X + h v) - g(X) of forwards with
        different dropout masks (LoRA's default lora_dropout=0.05, say) would be mask noise / h.
        The global RNG streams are left as they were.
        """
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        if rng_seed is None:
            return model(**model_inputs).logits
        device = inputs["input_ids"].device
        accelerator = device.type != "cpu"
        with torch.random.fork_rng(
            devices=[device] if accelerator else [],
            device_type=device.type if accelerator else "cuda",
        ):
            torch.manual_seed(rng_seed)
            return model(**model_inputs).logits

    def _rng_seed(self) -> int:
        generator = self._stream(Stream.DROPOUT, torch.device("cpu"))
        return int(torch.randint(2**62, (1,), generator=generator).item())

    @staticmethod
    def _select_rows(inputs: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
        return {
            k: v[rows] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in inputs.items()
        }

    def _record(self, name: str, value: float) -> None:
        self._train_metrics.setdefault(name, []).append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """transformers' logging path, with this trainer's training metrics averaged over the
        steps since the last log (as TRL averages its own)."""
        if self.model.training and self._train_metrics:
            logs.update({k: sum(v) / len(v) for k, v in self._train_metrics.items()})
            self._train_metrics = {}
        super().log(logs, start_time)

    def _record_ce_metrics(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """CE summed over scored tokens (float32, with graph) and the label mask; adds the CE,
        entropy, accuracy and token count to the step's sums."""
        label_mask = label_mask_from_labels(labels)
        log_probs, targets = scored_log_probs(logits, labels, label_mask)  # (N, V), (N,)
        self._sums.add_scored(log_probs, targets, label_mask)
        return -log_probs.gather(1, targets[:, None]).sum(), label_mask

    def training_step(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Tensor:
        """transformers' step; the loss it returns (what the ``loss`` log sums) joins the step's
        sums, so the guard and the whole-run ``train_loss`` see the objective itself.

        The final backward recomputes checkpointed layers (activation checkpointing): it must
        pick the same SDPA kernel as the forward did, or the recomputed tensors differ
        ("Recomputed values ... have different metadata"), seen with exact mode + SDPA.
        """
        with self._attention_context():
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
        if self._kind is not None:
            self._record("penalty_term", totals.per_token(Sum.PENALTY_TERM))
            if "penalty" in values:
                self._record("penalty", values["penalty"])

    def _tick(self) -> None:
        started, before = self._clock
        self.run_totals["wall_time_s"] = round(before + time.time() - started, 3)

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
        if not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._micro_step_of != self.state.global_step:
            self._micro_step_of, self._micro_step = self.state.global_step, 0
        labels = inputs["labels"]
        if self._noise is not None:
            self._noise.set_batch(inputs.get("attention_mask"), inputs.get("position_ids"))
            self._noise.generator = self._stream(Stream.NEFTUNE, labels.device)
        self._count_tokens(inputs)
        coef = self.current_penalty_coef() if self._kind is not None else 0.0
        rows = None
        if coef > 0:
            generator = self._stream(Stream.PENALTY_ROWS, torch.device("cpu"))
            fraction = self.args.penalty_fraction
            rows = penalty_rows(labels.shape[0], fraction, generator, labels.device)
        if rows is None or not label_mask_from_labels(labels)[rows].any():
            # No penalty on this micro-step (baseline, neftune, warm-up at 0, a skipped step of
            # penalty_every, or no scored token in the penalized rows): plain CE.
            logits = self._forward(model, inputs)
            ce_sum, label_mask = self._record_ce_metrics(logits, labels)
            loss = ce_sum / self._loss_normalizer(label_mask, num_items_in_batch)
        else:
            # Penalizing k of B rows at random is unbiased for the whole batch after a B / k
            # rescale of the penalty.
            rescale = labels.shape[0] / rows.numel()
            self._record(
                "penalty_coef",
                warmup_coefficient(
                    self.state.global_step, self.args.penalty_coef, self.args.penalty_warmup_steps
                ),
            )
            loss_fn = self._exact_loss if self.args.penalty_grad == "exact" else self._fd_loss
            loss = loss_fn(model, inputs, num_items_in_batch, coef, rows, rescale)
        self._micro_step += 1
        return loss

    def _draw(self, logits: Tensor, label_mask: Tensor) -> Tensor:
        return sample_targets(
            logits,
            label_mask,
            samples=self.args.penalty_samples,
            sampling=self.args.penalty_sampling,
            generator=self._stream(Stream.PENALTY_TARGETS, logits.device),
        )

    def _exact_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        num_items_in_batch: Any,
        coef: float,
        rows: Tensor,
        rescale: float,
    ) -> Tensor:
        """``(CE + coef * rescale * S) / N`` with ``S`` differentiable (double backward) over
        the penalized ``rows``; one forward of the whole batch."""
        labels = inputs["labels"]
        with self._attention_context():
            logits = self._forward(model, inputs, rng_seed=self._rng_seed())
            ce_sum, label_mask = self._record_ce_metrics(logits, labels)
            normalizer = self._loss_normalizer(label_mask, num_items_in_batch)
            penalty_mask = torch.zeros_like(label_mask)
            penalty_mask[rows] = label_mask[rows]
            targets = self._draw(logits, penalty_mask)
            squared = exact_penalty(self._kind, self._capture.embeds, logits, penalty_mask, targets)
        self._sums.add_penalty(squared, rescale, coef)
        return (ce_sum + coef * rescale * squared) / normalizer

    def _fd_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        num_items_in_batch: Any,
        coef: float,
        rows: Tensor,
        rescale: float,
    ) -> Tensor:
        """CE of the rows left out (their own forward, so the penalty's passes cost in proportion
        to the penalized fraction), then :func:`fishertune.penalty_grad.fd_penalty_loss` on the
        penalized rows, given the forward with the embedding shift and ``accelerator.backward``
        (split mode: under ``no_sync``, scaled as the Trainer scales the returned loss)."""
        args = self.args
        labels = inputs["labels"]
        normalizer = self._loss_normalizer(label_mask_from_labels(labels), num_items_in_batch)
        split = args.penalty_fd_backward == "split" or (
            args.penalty_fd_backward == "auto" and not self.is_deepspeed_enabled
        )
        divisor = self._ga_divisor(num_items_in_batch)

        def backward(part: Tensor) -> None:
            self.accelerator.backward(part / divisor)

        rest_part = None
        if rows.numel() < labels.shape[0]:
            rest = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
            rest[rows] = False
            rest_inputs = self._select_rows(inputs, rest)
            with self._no_sync(model) if split else contextlib.nullcontext():
                logits = self._forward(model, rest_inputs)
                rest_part = self._record_ce_metrics(logits, rest_inputs["labels"])[0] / normalizer
                if split:
                    backward(rest_part)
            del logits
            inputs = self._select_rows(inputs, rows)
        rng_seed = self._rng_seed()

        def forward(shift: Tensor | None) -> tuple[Tensor, Tensor]:
            self._capture.shift = shift
            try:
                return self._forward(model, inputs, rng_seed), self._capture.embeds
            finally:
                self._capture.shift = None

        fused = split and self._grads_accumulate_locally(model)
        device_type = labels.device.type
        passes = Passes(
            forward,
            backward if split else None,
            no_sync=lambda: self._no_sync(model),
            on_scored=self._sums.add_scored,
            params=[p for p in model.parameters() if p.requires_grad] if fused else [],
            grad_divisor=divisor,
        )
        settings = FDSettings(
            scheme=args.penalty_fd_scheme,
            relative_step=args.penalty_fd_step,
            compute_dtype=(
                torch.get_autocast_dtype(device_type)
                if torch.is_autocast_enabled(device_type)
                else None
            ),
            fused=fused,
        )
        result = fd_penalty_loss(
            self._kind,
            passes,
            inputs["labels"],
            self._draw,
            weight=coef * rescale,
            normalizer=normalizer,
            settings=settings,
        )
        self._sums.add_penalty(result.squared, rescale, coef)
        if rest_part is None or split:
            return result.loss if rest_part is None else result.loss + rest_part.detach()
        return rest_part + result.loss
