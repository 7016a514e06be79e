"""The training objective of one micro-step: ``(CE + lambda * rescale * S) / N``.

``CE`` is summed over the scored (response) tokens, ``S`` is the token-F or logit-F penalty of the
penalized rows (:mod:`fishertune.penalties`), ``rescale = B / rows`` makes a row fraction unbiased,
and ``N`` is the normalizer of :func:`fishertune.training.forward.loss_normalizer`: the
objective is already normalized over the whole accumulated batch, so the trainer tells
transformers not to divide it again (``loss_is_scaled_for_ga = True``).

:class:`MicroStepLoss` computes it three ways: plain CE (no penalty on this micro-step), exact
(double backward through the returned loss) and finite differences (the passes of
:func:`fishertune.penalty_grad.fd_penalty_loss`, given the model's forward with the embedding
shift and ``accelerator.backward``). It holds the collaborators it needs (the accelerator, the
embedding capture, the step's metric sums, the random streams) and nothing of the Trainer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from fishertune.errors import FishertuneError
from fishertune.hessian_grad import exact_hessian_trace, hessian_fd_loss
from fishertune.noise import EmbeddingCapture, find_input_embeddings
from fishertune.penalties import (
    float64_throughout,
    label_mask_from_labels,
    scored_log_probs,
    scored_targets,
)
from fishertune.penalty_estimators import exact_penalty_parts, score_function_term
from fishertune.penalty_grad import FDSettings, Passes, fd_penalty_loss
from fishertune.streams import Stream
from fishertune.training import checks
from fishertune.training.config import FisherSFTConfig
from fishertune.training.forward import (
    exact_attention,
    forward_logits,
    matched_position_weights,
    model_outputs,
    select_rows,
)
from fishertune.training.stats import StepSums
from fishertune.vocab import LinearLogits, scored_terms

__all__ = ["MicroStepLoss"]

logger = logging.getLogger(__name__)

StreamFactory = Callable[[Stream, torch.device], torch.Generator]


class MicroStepLoss:
    """The objective of one micro-step, with its metrics added to the step's sums.

    Args:
        args: the run's config (method, penalty and fd options).
        accelerator: the Trainer's; its ``backward``, ``no_sync`` and distributed type.
        capture: the embedding hook (its ``embeds`` and ``shift``).
        sums: the optimizer step's metric sums.
        stream: this micro-step's generator for a named stream (:mod:`fishertune.streams`).
        draw: ``draw(logits (B, L, V), label_mask (B, L)) -> (N, m)`` sampled targets ``y'``.
        probe: ``probe(embeds (B, L, d), weights (B, L) | None) -> (K, B, L, d)`` Hutchinson
            probes ``sqrt(w) z`` (hessian-trace).
        precision: what the run has measured of the model's arithmetic, kept across
            micro-steps (the trainer's; see :meth:`_float32_inside`).
    """

    def __init__(
        self,
        args: FisherSFTConfig,
        accelerator: Accelerator,
        capture: EmbeddingCapture,
        sums: StepSums,
        stream: StreamFactory,
        draw: Callable[[Tensor, Tensor], Tensor],
        probe: Callable[[Tensor, Tensor | None], Tensor],
        precision: dict[str, bool] | None = None,
    ) -> None:
        self.args = args
        self.accelerator = accelerator
        self.capture = capture
        self.sums = sums
        self.stream = stream
        self.draw = draw
        self.probe = probe
        self.precision = {} if precision is None else precision
        self.kind = {"token-f": "token", "logit-f": "logit", "hessian-trace": "hessian"}.get(
            args.method
        )
        # the mean over the penalized rows of the matched coefficient (1 when not matched)
        self.mean_row_coef = 1.0

    @property
    def kernel(self) -> str:
        """The run's ``ce_kernel``, ``auto`` resolved: ``linear`` unless the run found that it
        does not apply (``precision["linear_ce"]`` false), then ``chunked``."""
        if self.args.ce_kernel != "auto":
            return self.args.ce_kernel
        return "linear" if self.precision.get("linear_ce", True) else "chunked"

    def scored_ce(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """CE summed over scored tokens (float32, with graph) and the label mask; adds the CE,
        entropy, accuracy and token count to the step's sums. Chunk by chunk
        (:func:`fishertune.vocab.scored_terms`, exact to the dense computation) unless
        ``ce_kernel`` is ``dense``."""
        if self.kernel == "dense":
            ce_sum, label_mask, _ = self._scored(logits, labels)
            return ce_sum, label_mask
        label_mask = label_mask_from_labels(labels)
        terms = scored_terms(
            logits, label_mask, scored_targets(labels, label_mask), statistics=True
        )
        self.sums.add_statistics(terms.statistics, logits.shape[-1])
        return terms.ce, label_mask

    def _ce_sum(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        """CE summed over scored tokens (with graph) with the run's ``ce_kernel``; adds the
        metrics to the step's sums. ``linear``: from the last hidden states and the output
        projection (:class:`fishertune.vocab.LinearLogits`), no logits."""
        labels = inputs["labels"]
        if self.kernel != "linear":
            return self.scored_ce(forward_logits(model, inputs), labels)[0]
        logits = self._linear_logits(model, inputs)
        label_mask = label_mask_from_labels(labels)
        terms = scored_terms(
            logits, label_mask, scored_targets(labels, label_mask), statistics=True
        )
        self.sums.add_statistics(terms.statistics, logits.shape[-1])
        return terms.ce

    def _linear_logits(
        self, model: nn.Module, inputs: dict[str, Tensor], rng_seed: int | None = None
    ) -> LinearLogits | Tensor:
        """The last hidden states and the output projection's weight and bias, through the
        DDP / PEFT wrappers (``unwrap``): the model computes no logits (``logits_to_keep``
        empty), except at the run's first call, where the logits of the last position check
        that they are the projection of the hidden states. Where they are not (or the weight
        is sharded), ``auto`` turns to the chunked kernel for the run (this call's logits from
        a forward of their own: its noise and dropout drawn again); ``linear`` is refused."""
        head = checks.unwrap(model).get_output_embeddings()
        if head is None or checks.sharded(head.weight):  # fully_shard applied outside accelerate
            problem = checks.head_problem(head) or "FSDP shards its output embedding"
            return self._not_linear(model, inputs, rng_seed, problem)
        labels = inputs["labels"]
        check = "linear_ce" not in self.precision
        keep = [labels.shape[1] - 1] if check else []
        outputs = model_outputs(
            model,
            inputs,
            rng_seed,
            output_hidden_states=True,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=labels.device),
        )
        hidden = outputs.hidden_states[-1]
        # the projection in the dtype of the model's own lm_head
        mm_dtype = self._compute_dtype(labels.device.type) or head.weight.dtype
        if check:
            problem = checks.linear_projection_problem(
                outputs.logits[:, -1], hidden[:, -1], head, mm_dtype
            )
            if problem is None and outputs.logits.shape[1] != len(keep):
                problem = "its forward ignores logits_to_keep (it computes every position's logits)"
            if problem is not None:
                return self._not_linear(model, inputs, rng_seed, problem)
            self.precision["linear_ce"] = True
            if self.args.ce_kernel == "auto":
                logger.info("ce_kernel=auto: the output projection fused with the CE (linear)")
        return LinearLogits(hidden, head.weight, head.bias, mm_dtype)

    def _not_linear(
        self, model: nn.Module, inputs: dict[str, Tensor], rng_seed: int | None, problem: str
    ) -> Tensor:
        """``auto``: the chunked kernel from now on, and this call's logits; ``linear``:
        refused, with ``problem``."""
        checks.take_chunked(self.args, self.precision, problem)
        return forward_logits(model, inputs, rng_seed)

    def _scored(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The dense :meth:`scored_ce` and the log-probabilities (N, V), with graph (exact
        mode differentiates them twice)."""
        label_mask = label_mask_from_labels(labels)
        log_probs, targets = scored_log_probs(logits, labels, label_mask)  # (N, V), (N,)
        self.sums.add_scored(log_probs, targets, label_mask)
        return -log_probs.gather(1, targets[:, None]).sum(), label_mask, log_probs

    def _position_weights(
        self, inputs: dict[str, Tensor], model: nn.Module, rows: Tensor
    ) -> Tensor | None:
        """:func:`matched_position_weights` with ``penalty_match_neftune_alpha`` (``None``
        without); records the mean row coefficient of ``rows`` (a row's: its real tokens' mean)."""
        alpha = self.args.penalty_match_neftune_alpha
        if alpha is None:
            return None
        embedding = find_input_embeddings(model)
        hidden = getattr(embedding, "embedding_dim", None) or embedding.weight.shape[-1]
        weights = matched_position_weights(alpha, inputs, hidden, self.args.neftune_length)
        if "attention_mask" in inputs:
            real = inputs["attention_mask"][rows].to(weights.dtype)
        else:
            real = torch.ones_like(weights[rows])
        per_row = (weights[rows] * real).sum(-1) / real.sum(-1).clamp(min=1.0)
        self.mean_row_coef = float(per_row.mean())
        self.row_coefs = per_row  # (len(rows),)
        return weights

    def _probes(self, embeds: Tensor, weights: Tensor | None, rows: Tensor | None) -> Tensor:
        """Hutchinson probes (K, B, L, d) (``probe`` callback), zero outside ``rows``."""
        probes = self.probe(embeds, weights)
        if rows is not None:
            keep = torch.zeros(embeds.shape[0], dtype=probes.dtype, device=probes.device)
            keep[rows] = 1.0
            probes = probes * keep[None, :, None, None]
        return probes

    def plain(self, model: nn.Module, inputs: dict[str, Tensor], normalizer: Tensor) -> Tensor:
        """``CE / N``: no penalty on this micro-step."""
        return self._ce_sum(model, inputs) / normalizer

    def _rng_seed(self) -> int:
        generator = self.stream(Stream.DROPOUT, torch.device("cpu"))
        return int(torch.randint(2**62, (1,), generator=generator).item())

    def _no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        # accelerate picks DDP's no_sync or FSDP2's requires_gradient_sync(False)
        if self.accelerator.num_processes > 1:
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()

    def _grads_accumulate_locally(self, model: nn.Module) -> bool:
        """Whether ``p.grad += x`` by hand equals a backward that accumulates ``x``: not under a
        loss scaler (fp16), FSDP (sharded DTensor gradients, also when ``fully_shard`` was applied
        outside accelerate) or DeepSpeed (its engine owns the gradients)."""
        if self.accelerator.scaler is not None or self.accelerator.distributed_type in (
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
        ):
            return False
        return not any(checks.sharded(p) for p in model.parameters())

    def exact(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        normalizer: Tensor,
        coef: float,
        rows: Tensor,
    ) -> Tensor:
        """``(CE + coef * rescale * S) / N`` with ``S`` differentiable (double backward) over
        the penalized ``rows``; one forward of the whole batch."""
        labels = inputs["labels"]
        rescale = labels.shape[0] / rows.numel()
        with exact_attention(model, self.args.penalty_grad):
            logits = forward_logits(model, inputs, rng_seed=self._rng_seed())
            ce_sum, label_mask, log_probs = self._scored(logits, labels)
            embeds = self.capture.embeds
            weights = self._position_weights(inputs, model, rows)
            if self.kind == "hessian":
                probes = self._probes(embeds, weights, rows)
                squared = exact_hessian_trace(ce_sum, embeds, probes)
                term = squared
            else:
                penalty_mask = torch.zeros_like(label_mask)
                penalty_mask[rows] = label_mask[rows]
                targets = self.draw(logits, penalty_mask)
                squared, row_squared = exact_penalty_parts(
                    self.kind, embeds, logits, penalty_mask, targets, weights
                )
                term = squared
                if self.args.penalty_estimator == "unbiased":
                    draws = log_probs[penalty_mask[label_mask]].gather(1, targets)
                    term = squared + score_function_term(draws, penalty_mask, row_squared)
        unweighted = None
        if weights is not None and self.kind != "hessian":
            # a row's weight is one number on its real positions (0 on padding, where v = 0)
            coefs = self.row_coefs.to(row_squared)
            per_row = row_squared.mean(0)[rows] / torch.where(coefs > 0, coefs, 1.0)
            unweighted = per_row.sum()
        self.sums.add_penalty(squared, rescale, coef, self.mean_row_coef, unweighted)
        return (ce_sum + coef * rescale * term) / normalizer

    def fd(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        normalizer: Tensor,
        coef: float,
        rows: Tensor,
    ) -> Tensor:
        """CE of the rows left out (their own forward, so the penalty's passes cost in proportion
        to the penalized fraction), then :func:`fishertune.penalty_grad.fd_penalty_loss` on the
        penalized rows. Split mode backpropagates every part but the returned one at once,
        under ``no_sync``."""
        args = self.args
        batch_size = inputs["labels"].shape[0]
        rescale = batch_size / rows.numel()
        split = args.penalty_fd_backward == "split" or (
            args.penalty_fd_backward == "auto"
            and self.accelerator.distributed_type != DistributedType.DEEPSPEED
        )
        rest_part = None
        if rows.numel() < batch_size:
            rest_part = self._rest_of_batch(model, inputs, rows, normalizer, split)
            inputs = select_rows(inputs, rows)
        # the CE at X unless asked otherwise: fused takes it at X + h v, an O(h_rel) offset of the
        # CE's own gradient that does not shrink with the coefficient (docs/method.md)
        fused = split and args.penalty_fd_fused_ce
        if fused and not self._grads_accumulate_locally(model):
            raise FishertuneError(
                "penalty_fd_fused_ce needs gradients accumulated in place, but this model's "
                "are sharded (FSDP) or scaled: set penalty_fd_fused_ce=false"
            )
        all_rows = torch.arange(inputs["labels"].shape[0], device=inputs["labels"].device)
        rng_seed = self._rng_seed()
        passes = self._passes(model, inputs, split, fused, rng_seed)
        settings = self._fd_settings(model, inputs, fused, rng_seed)
        weights = self._position_weights(inputs, model, all_rows)
        hold = checks.holds_table_gradient(model, self.kind, split, fused)  # the table's grad: once
        with self.capture.holding_table_gradient(hold):
            if self.kind == "hessian":
                result = hessian_fd_loss(
                    passes,
                    inputs["labels"],
                    lambda embeds: self._probes(embeds, weights, None),
                    weight=coef * rescale,
                    normalizer=normalizer,
                    relative_step=self.args.penalty_fd_step,
                    compute_dtype=settings.compute_dtype,
                )
            else:
                result = fd_penalty_loss(
                    self.kind,
                    passes,
                    inputs["labels"],
                    self.draw,
                    weight=coef * rescale,
                    normalizer=normalizer,
                    settings=settings,
                    position_weights=weights,
                    estimator=self.args.penalty_estimator,
                )
        self.sums.add_penalty(result.squared, rescale, coef, self.mean_row_coef, result.unweighted)
        if rest_part is None or split:
            return result.loss if rest_part is None else result.loss + rest_part.detach()
        return rest_part + result.loss

    def _rest_of_batch(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        rows: Tensor,
        normalizer: Tensor,
        split: bool,
    ) -> Tensor:
        """``CE / N`` of the unpenalized rows (backpropagated at once in split mode)."""
        labels = inputs["labels"]
        rest = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        rest[rows] = False
        rest_inputs = select_rows(inputs, rest)
        with self._no_sync(model) if split else contextlib.nullcontext():
            part = self._ce_sum(model, rest_inputs) / normalizer
            if split:
                self.accelerator.backward(part)
        return part

    def _shifted_forward(
        self, model: nn.Module, inputs: dict[str, Tensor], rng_seed: int, linear: bool
    ) -> Callable[[Tensor | None], tuple[Tensor | LinearLogits, Tensor]]:
        """The forward with the embedding shift (:data:`fishertune.penalty_grad.Forward`):
        the logits, or with ``linear`` the hidden states and the projection (no (N, V)) while
        the run's kernel is linear (``auto`` may turn to chunked at the first pass)."""

        def forward(shift: Tensor | None) -> tuple[Tensor | LinearLogits, Tensor]:
            self.capture.shift = shift
            try:
                if linear and self.kernel == "linear":
                    return self._linear_logits(model, inputs, rng_seed), self.capture.embeds
                return forward_logits(model, inputs, rng_seed), self.capture.embeds
            finally:
                self.capture.shift = None

        return forward

    def _passes(
        self, model: nn.Module, inputs: dict[str, Tensor], split: bool, fused: bool, rng_seed: int
    ) -> Passes:
        """The engine's callbacks: the forward with the embedding shift (one dropout seed for
        all passes; ``ce_kernel=linear``: no logits) and ``accelerator.backward``."""
        linear = self.kernel == "linear"
        return Passes(
            self._shifted_forward(model, inputs, rng_seed, linear),
            self.accelerator.backward if split else None,
            no_sync=lambda: self._no_sync(model),
            on_scored=self.sums.add_statistics,
            params=[p for p in model.parameters() if p.requires_grad] if fused else [],
            before_last=self.capture.release,
        )

    def _fd_settings(
        self, model: nn.Module, inputs: dict[str, Tensor], fused: bool, rng_seed: int
    ) -> FDSettings:
        compute_dtype = self._compute_dtype(inputs["labels"].device.type)  # None: the embeddings'
        if (
            compute_dtype is None
            and self.args.penalty_fd_step is None
            and self._float32_inside(
                model, self._shifted_forward(model, inputs, rng_seed, linear=False)
            )
        ):
            compute_dtype = torch.float32
        return FDSettings(
            scheme=self.args.penalty_fd_scheme,
            relative_step=self.args.penalty_fd_step,
            compute_dtype=compute_dtype,
            fused=fused,
        )

    def _compute_dtype(self, device_type: str) -> torch.dtype | None:
        """The half-precision dtype the model's forward computes in, or ``None``: an autocast
        open here, or the accelerator's mixed precision (accelerate autocasts inside the prepared
        model's forward and returns float32 outputs; the Trainer opens none around
        ``compute_loss``)."""
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}
        return half.get(str(self.accelerator.mixed_precision))

    def _float32_inside(self, model: nn.Module, forward: Callable) -> bool:
        """A float64 model that rounds to float32 inside (:func:`float64_throughout`), measured
        once per run (the answer is kept in ``precision``); ``False`` for other dtypes."""
        if "float32_inside" not in self.precision:
            float64 = find_input_embeddings(model).weight.dtype == torch.float64
            self.precision["float32_inside"] = float64 and not float64_throughout(forward)
            if self.precision["float32_inside"]:
                logger.info(
                    "fd: the float64 model computes in float32 inside (RMSNorm or softmax "
                    "upcasts): the float32 fd steps are used"
                )
        return self.precision["float32_inside"]
