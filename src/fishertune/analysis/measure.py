"""Measure the noise-curvature relation of NEFTune on a model and a data set.

For each batch (``X`` the input embeddings, ``loss`` the mean cross-entropy over assistant tokens,
the model in eval mode so that dropout is off) this module measures:

* ``loss(X)``;
* the NEFTune loss increase ``Delta(alpha) = E_eps[loss(X + eps)] - loss(X)`` by Monte Carlo, with
  ``eps`` drawn by :class:`fishertune.noise.NEFTuneNoise` and fed through ``inputs_embeds``. Each
  sample is an antithetic pair, ``(loss(X + eps) + loss(X - eps)) / 2 - loss(X)``: the odd orders
  of the Taylor series cancel exactly, which removes the first-order term's large variance. The
  same unit draws are scaled for every alpha (common random numbers), so the alpha curve is smooth;
* the second-order prediction ``(1/2) E[eps^T H_X eps] = (1/6) Tr(A H_X A)``, ``A = diag(a_i)`` the
  per-entry noise half-width (``E[eps_i^2] = a_i^2 / 3``). With ``length_mode="per_sequence"``
  ``a_i = alpha / sqrt(L_b d)`` differs per sequence ``b``, so the prediction is
  ``sum_b (a_b^2 / 6) Tr(H_X restricted to sequence b) = (alpha^2 / 6) Tr(W H_X)`` with
  ``W = diag(1 / (L_b d))`` on real tokens (0 on padding). ``Tr(W H_X)`` is estimated by Hutchinson
  with Rademacher probes ``z`` as ``(W z)^T (H_X z)``; the same products give ``Tr(H_X)``;
* ``Tr(F_X)`` from the token-F estimator with ``reduction="mean"``: the loss is a mean over the
  ``N`` scored tokens, so ``H_X = (1/N) sum_t H_X^(t)`` and its Gauss-Newton part is
  ``(1/N) sum_t F_X^(t)``, which is what ``E[token_fisher(..., reduction="mean")]`` is. The gap
  ``Tr(H_X) - Tr(F_X)`` is the residual term ``sum_k (dl/dz_k) Tr(d^2 z_k / dX^2)``.

Aggregates over batches carry two standard errors: the estimators' own (Monte-Carlo noise within
the batches seen, ``sqrt(sum_b se_b^2) / n``) and the between-batch one (``std_b / sqrt(n)``, which
says how far another sample of the data could land). Confidence intervals are ``+- 1.96 SE``.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fishertune.data.collate import collate_tokenized, row_labels
from fishertune.errors import FishertuneError
from fishertune.estimators import EmbeddingHVP, Estimate, fisher_trace, hutchinson_traces
from fishertune.noise import NEFTuneNoise, find_input_embeddings
from fishertune.penalties import IGNORE_INDEX, label_mask_from_labels, scored_cross_entropy
from fishertune.schedules import neftune_equivalent_coef, neftune_scale

__all__ = [
    "Aggregate",
    "AlphaSummary",
    "AnalysisResult",
    "BatchMeasurement",
    "Estimate",
    "analyze",
    "combine_batches",
]

Z_95 = 1.96
SAMPLE_CAP = 2000  # conversations tokenized at most (a seeded random sample of larger sets)
LengthMode = Literal["per_sequence", "padded"]
NoiseDistribution = Literal["uniform", "gaussian"]


# ------------------------------------------------------------------------------ result containers


@dataclass(frozen=True, kw_only=True)  # its own fields by name: never taken for ``samples``
class Aggregate(Estimate):
    """An :class:`Estimate` pooled over batches, with the between-batch error beside its own.

    ``mean`` is the mean of the per-batch means and ``stderr`` the estimators' own standard error
    of it, ``sqrt(sum_b se_b^2) / n`` (the Monte-Carlo noise of the probes, draws and noise pairs
    on the batches seen), so code that takes an :class:`Estimate` takes an aggregate too and
    compares it by that error. The between-batch error ``std_b(mean_b) / sqrt(n)`` says instead
    how far another sample of the data could land; the two answer different questions and are
    reported side by side.

    Attributes:
        mean: mean of the per-batch values.
        stderr: the estimators' own standard error of ``mean`` (also :attr:`se_estimator`).
        samples: ``None`` (the per-batch values stay in the batches' own measurements).
        se_batches: between-batch standard error, ``std_b(value) / sqrt(n)`` (``nan`` if n < 2).
        num_batches: ``n``.
    """

    se_batches: float = math.nan
    num_batches: int = 0

    @property
    def se_estimator(self) -> float:
        """The estimators' own standard error of ``mean``: :attr:`stderr`."""
        return self.stderr

    @property
    def ci_estimator(self) -> float:
        """Half-width of the 95% interval from the estimators' own error."""
        return Z_95 * self.se_estimator

    @property
    def ci_batches(self) -> float:
        """Half-width of the 95% interval across batches."""
        return Z_95 * self.se_batches

    def scaled(self, factor: float) -> Aggregate:
        """The aggregate of ``factor`` times each batch's value: every error scales by
        ``|factor|``."""
        return Aggregate(
            factor * self.mean,
            abs(factor) * self.stderr,
            se_batches=abs(factor) * self.se_batches,
            num_batches=self.num_batches,
        )

    def to_dict(self) -> dict[str, float]:
        """The keys the analysis has always written (``se_estimator``, not ``stderr``)."""
        return {
            "mean": self.mean,
            "se_estimator": self.se_estimator,
            "se_batches": self.se_batches,
            "ci95_estimator": self.ci_estimator,
            "ci95_batches": self.ci_batches,
            "num_batches": self.num_batches,
        }


def combine_batches(estimates: Sequence[Estimate]) -> Aggregate:
    """Combine per-batch estimates (each with its own standard error) into an :class:`Aggregate`."""
    count = len(estimates)
    if count == 0:
        return Aggregate(math.nan, math.nan, se_batches=math.nan, num_batches=0)
    means = [e.mean for e in estimates]
    se_estimator = math.sqrt(sum(e.stderr**2 for e in estimates)) / count
    se_batches = statistics.stdev(means) / math.sqrt(count) if count > 1 else math.nan
    return Aggregate(
        statistics.fmean(means), se_estimator, se_batches=se_batches, num_batches=count
    )


def _agree(first: Estimate, second: Estimate) -> bool:
    """``|m1 - m2| <= 1.96 sqrt(se1^2 + se2^2)``."""
    return abs(first.mean - second.mean) <= Z_95 * math.hypot(first.stderr, second.stderr)


def _ratio(numerator: Estimate, denominator: Estimate) -> Estimate:
    """``mean_n / mean_d`` with the delta-method error of the estimators' own noise (``stderr``).

    For two aggregates of the same batches the between-batch spread is shared and left out.
    """
    if denominator.mean == 0 or math.isnan(denominator.mean):
        return Estimate(math.nan, math.nan)
    ratio = numerator.mean / denominator.mean
    relative = 0.0
    for part in (numerator, denominator):
        if part.mean != 0:
            relative += (part.stderr / part.mean) ** 2
    return Estimate(ratio, abs(ratio) * math.sqrt(relative))


@dataclass
class BatchMeasurement:
    """Everything measured on one batch.

    Attributes:
        index: batch number.
        num_sequences, num_tokens, num_scored: ``B``, real tokens, scored (assistant) tokens ``N``.
        lengths: real length of each sequence.
        embedding_rms: ``sqrt(mean X^2)`` over the real tokens.
        loss: mean CE over the scored tokens.
        trace_h: ``Tr(H_X)`` (Hutchinson).
        trace_h_weighted: ``Tr(W H_X)``, ``W = diag(a_i^2)`` at ``alpha = 1``: the prediction at
            ``alpha`` is ``alpha^2 / 6`` times it.
        trace_f: ``Tr(F_X)`` (token-F, mean over scored tokens).
        measured: alpha -> ``E[loss(X + eps)] - loss(X)`` (antithetic Monte Carlo).
    """

    index: int
    num_sequences: int
    num_tokens: int
    num_scored: int
    lengths: list[int]
    embedding_rms: float
    loss: float
    trace_h: Estimate
    trace_h_weighted: Estimate
    trace_f: Estimate
    measured: dict[float, Estimate]

    def predicted(self, alpha: float) -> Estimate:
        """``(alpha^2 / 6) Tr(W H_X)``."""
        factor = alpha**2 / 6.0
        return Estimate(factor * self.trace_h_weighted.mean, factor * self.trace_h_weighted.stderr)

    def to_dict(self) -> dict[str, Any]:
        out = {
            key: value.to_dict() if isinstance(value, Estimate) else value
            for key, value in vars(self).items()
        }
        out["measured"] = {str(alpha): value.to_dict() for alpha, value in self.measured.items()}
        out["predicted"] = {str(alpha): self.predicted(alpha).to_dict() for alpha in self.measured}
        return out


@dataclass
class AlphaSummary:
    """Measured vs predicted loss increase at one alpha, aggregated over batches.

    Attributes:
        alpha: NEFTune's alpha.
        scale_at_median: ``a = alpha / sqrt(L_med d)`` at the data's median length.
        scale_over_rms: ``a / rms(X)``: the Taylor prediction holds when this is small.
        lambda_equiv: ``alpha^2 / (6 L_med d)``
            (:func:`fishertune.schedules.neftune_equivalent_coef`).
        measured: ``E[loss(X + eps)] - loss(X)``.
        predicted: ``(1/6) Tr(A H_X A)``.
        ratio: ``measured / predicted`` (delta-method error from the estimators' noise).
        predicted_median_length: ``lambda_equiv Tr(H_X)``, the prediction if every sequence had
            the median length.
        fisher_penalty_at_lambda_equiv: ``lambda_equiv Tr(F_X)``, what a token-F penalty with the
            NEFTune-equivalent coefficient adds to the loss.
        batches_agreeing: batches whose own measured and predicted increases agree within
            1.96 of their combined standard error (the curvature's sign and size vary between
            batches, so the pooled means can hide or blur a per-batch agreement).
    """

    alpha: float
    scale_at_median: float
    scale_over_rms: float
    lambda_equiv: float
    measured: Aggregate
    predicted: Aggregate
    ratio: Estimate
    predicted_median_length: float
    fisher_penalty_at_lambda_equiv: float
    batches_agreeing: int = 0

    @property
    def agree(self) -> bool:
        """Whether measured and predicted agree within 1.96 of their combined estimator error."""
        return _agree(self.measured, self.predicted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "scale_at_median": self.scale_at_median,
            "scale_over_rms": self.scale_over_rms,
            "lambda_equiv": self.lambda_equiv,
            "measured": self.measured.to_dict(),
            "predicted": self.predicted.to_dict(),
            "ratio": self.ratio.to_dict() | {"ci95": Z_95 * self.ratio.stderr},
            "agree_within_ci95": self.agree,
            "predicted_median_length": self.predicted_median_length,
            "fisher_penalty_at_lambda_equiv": self.fisher_penalty_at_lambda_equiv,
            "batches_agreeing": self.batches_agreeing,
        }


@dataclass
class AnalysisResult:
    """Output of :func:`analyze`: per-batch measurements, per-alpha summaries and curvature totals.

    Attributes:
        config: the settings of the run (alphas, sizes, seed, dtype, length convention, ...).
        hidden_size: ``d``.
        median_length: median real length of the data's sequences (after truncation).
        batches: per-batch :class:`BatchMeasurement`.
        alphas: per-alpha :class:`AlphaSummary`.
        loss, trace_h, trace_f: aggregates over batches.
        gap: ``Tr(H_X) - Tr(F_X)`` (the residual term of the Gauss-Newton split).
        fisher_over_hessian: ``Tr(F_X) / Tr(H_X)``.
        embedding_rms: mean over batches of ``rms(X)``.
    """

    config: dict[str, Any]
    hidden_size: int
    median_length: float
    batches: list[BatchMeasurement]
    alphas: list[AlphaSummary]
    loss: Aggregate
    trace_h: Aggregate
    trace_f: Aggregate
    gap: Aggregate
    fisher_over_hessian: Estimate
    embedding_rms: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "hidden_size": self.hidden_size,
            "median_length": self.median_length,
            "embedding_rms": self.embedding_rms,
            "loss": self.loss.to_dict(),
            "trace_hessian": self.trace_h.to_dict(),
            "trace_fisher": self.trace_f.to_dict(),
            "gauss_newton_gap": self.gap.to_dict(),
            "fisher_over_hessian": self.fisher_over_hessian.to_dict(),
            "alphas": [summary.to_dict() for summary in self.alphas],
            "batches": [batch.to_dict() for batch in self.batches],
            **self.extra,
        }


# ------------------------------------------------------------------------------------ batching


def _has_scored_token(row: Mapping[str, Any]) -> bool:
    # Position t predicts token t + 1: a label on the first token is never scored.
    return any(label != IGNORE_INDEX for label in row_labels(row)[1:])


# ----------------------------------------------------------------------------------- the model


@contextlib.contextmanager
def _measurement_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout), frozen parameters (only input gradients are needed) and SDPA
    forced to its math kernel (twice differentiable); everything restored on exit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in (None, "eager", "sdpa"):
        raise FishertuneError(
            f"the model uses attn_implementation={implementation!r}, which has no double "
            "backward: load it with attn_implementation='eager' (or 'sdpa')"
        )
    was_training = model.training
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for param, _ in requires_grad:
        param.requires_grad_(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        model.train(was_training)


def _mean_cross_entropy(logits: Tensor, labels: Tensor, label_mask: Tensor) -> Tensor:
    """``-(1/N) sum_t M_t log p_t[labels_{t+1}]``, in float32 or wider."""
    return scored_cross_entropy(logits, labels, label_mask) / label_mask.sum().clamp(min=1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class _Draws:
    """What is drawn on every batch: the alphas, and how many noise pairs, probes, Fisher draws.

    Attributes:
        alphas: NEFTune alphas, all measured with the same unit draws.
        noise_samples: antithetic noise pairs per batch and alpha.
        probes: Rademacher probes per batch (``Tr(H_X)`` and ``Tr(W H_X)``).
        fisher_draws: token-F draws per batch (``Tr(F_X)``).
        length_mode, noise_distribution: NEFTune's ``L`` and its noise distribution.
    """

    alphas: list[float]
    noise_samples: int
    probes: int
    fisher_draws: int
    length_mode: LengthMode
    noise_distribution: NoiseDistribution

    @property
    def passes_per_batch(self) -> int:
        """Forward or backward passes per batch, the unit of the progress bar."""
        return 2 * self.noise_samples * len(self.alphas) + self.probes + self.fisher_draws


def _noise_increase(
    loss_at: Callable[[Tensor], Tensor],
    X: Tensor,
    loss: float,
    unit_noise: NEFTuneNoise,
    draws: _Draws,
    progress: Any,
) -> dict[float, Estimate]:
    """alpha -> ``E[loss(X + eps)] - loss(X)`` from antithetic pairs, without gradients.

    Each pair is ``(loss(X + eps) + loss(X - eps)) / 2 - loss(X)`` with ``eps = alpha * unit``: the
    unit draw (``unit_noise``, alpha = 1, float32) is shared by every alpha (common random numbers)
    and cast to ``X``'s dtype as the NEFTune hook does in training.
    """
    samples: dict[float, list[float]] = {alpha: [] for alpha in draws.alphas}
    for _ in range(draws.noise_samples):
        unit = unit_noise.sample(X.float())
        for alpha in draws.alphas:
            eps = (alpha * unit).to(X.dtype)
            pair = 0.5 * (float(loss_at(X + eps)) + float(loss_at(X - eps)))
            samples[alpha].append(pair - loss)
            progress.update(2)
    return {alpha: Estimate.from_samples(values) for alpha, values in samples.items()}


def _trace_weights(
    unit_noise: NEFTuneNoise, X: Tensor, real: Tensor, length_mode: LengthMode
) -> Tensor:
    """Per-token ``a_i^2`` at alpha = 1, the weights ``W`` of ``Tr(W H_X)``: ``1 / (L_b d)`` on
    real tokens; (B, L, 1) or (1, 1, 1), float64."""
    weight = unit_noise.scale(X.shape, X.device).double().pow(2)
    if length_mode == "padded":
        weight = weight * real.unsqueeze(-1)  # padding has no curvature; keep W on real tokens
    return weight


def _embedding_traces(
    model: nn.Module,
    X: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    label_mask: Tensor,
    weight: Tensor,
    *,
    draws: _Draws,
    seed: int,
    progress: Any,
) -> tuple[Estimate, Estimate, Estimate]:
    """``Tr(H_X)``, ``Tr(W H_X)`` and ``Tr(F_X)`` at ``X`` (B, L, d).

    The two Hessian traces share their Rademacher probes (generator ``seed + 2``, only on real
    tokens); ``Tr(F_X)`` is the token-F estimator with ``reduction="mean"`` (generator
    ``seed + 3``), matching the mean CE whose Hessian ``H_X`` is.
    """
    device = X.device
    embeds = X.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
        hvp = EmbeddingHVP.from_loss(_mean_cross_entropy(logits, labels, label_mask), embeds)
        traces = hutchinson_traces(
            hvp,
            embeds.shape,
            {"h": None, "weighted": weight},
            num_probes=draws.probes,
            generator=_generator(device, seed + 2),
            dtype=embeds.dtype,
            device=device,
            probe_mask=attention_mask.bool().unsqueeze(-1),
            progress=progress.update,
        )
        fisher = fisher_trace(
            embeds,
            logits,
            label_mask,
            draws=draws.fisher_draws,
            reduction="mean",
            generator=_generator(device, seed + 3),
            progress=progress.update,
        )
    return traces["h"], traces["weighted"], fisher


def _measure_batch(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    index: int,
    draws: _Draws,
    seed: int,
    progress: Any,
) -> BatchMeasurement:
    """Everything :class:`BatchMeasurement` holds, on one collated batch.

    Generators: ``seed + 1`` the noise, ``seed + 2`` the probes, ``seed + 3`` the Fisher draws.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    label_mask = label_mask_from_labels(labels)  # (B, L)

    def loss_at(embeds: Tensor) -> Tensor:
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
        return _mean_cross_entropy(logits, labels, label_mask)

    with torch.no_grad():
        X = find_input_embeddings(model)(input_ids)  # (B, L, d), what the NEFTune hook sees
        real = attention_mask.bool()
        rms = float(X[real].double().pow(2).mean().sqrt())
        loss = float(loss_at(X))
        unit_noise = NEFTuneNoise(
            1.0,
            length_mode=draws.length_mode,
            distribution=draws.noise_distribution,
            generator=_generator(device, seed + 1),
        )
        unit_noise.set_batch(attention_mask=attention_mask)
        measured = _noise_increase(loss_at, X, loss, unit_noise, draws, progress)
        weight = _trace_weights(unit_noise, X, real, draws.length_mode)

    trace_h, trace_h_weighted, trace_f = _embedding_traces(
        model,
        X,
        attention_mask,
        labels,
        label_mask,
        weight,
        draws=draws,
        seed=seed,
        progress=progress,
    )
    return BatchMeasurement(
        index=index,
        num_sequences=int(input_ids.shape[0]),
        num_tokens=int(real.sum()),
        num_scored=int(label_mask.sum()),
        lengths=[int(n) for n in attention_mask.sum(-1).tolist()],
        embedding_rms=rms,
        loss=loss,
        trace_h=trace_h,
        trace_h_weighted=trace_h_weighted,
        trace_f=trace_f,
        measured=measured,
    )


# -------------------------------------------------------------------------------------- analyze


def _checked_sizes(
    alphas: list[float],
    batches: int,
    batch_size: int,
    probes: int,
    noise_samples: int,
    fisher_draws: int | None,
) -> int:
    """Refuse sizes too small for an error bar; the number of Fisher draws (default ``probes``)."""
    if not alphas or any(alpha < 0 for alpha in alphas):
        raise FishertuneError(f"--alphas must be non-negative numbers, got {alphas}")
    for name, value, low in (
        ("batches", batches, 1),
        ("batch_size", batch_size, 1),
        ("probes", probes, 2),
        ("noise_samples", noise_samples, 2),
    ):
        if value < low:
            raise FishertuneError(f"--{name} must be >= {low}, got {value}")
    fisher_draws = probes if fisher_draws is None else fisher_draws
    if fisher_draws < 2:
        raise FishertuneError(f"fisher_draws must be >= 2, got {fisher_draws}")
    return fisher_draws


def _scored_rows(dataset: Any, seed: int, count: int) -> list[Mapping[str, Any]]:
    """``count`` rows in an order shuffled by ``seed``, skipping rows with no scored token."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: list[Mapping[str, Any]] = []
    for i in order:
        if len(chosen) == count:
            break
        row = dataset[i]
        if _has_scored_token(row):
            chosen.append(row)
    if not chosen:
        raise FishertuneError(
            "no example has an assistant token after its first token (check the chat template's "
            "assistant mask and --max_length)"
        )
    return chosen


def _measure_groups(
    model: nn.Module,
    groups: list[list[Mapping[str, Any]]],
    pad_id: int,
    draws: _Draws,
    seed: int,
    show_progress: bool,
) -> list[BatchMeasurement]:
    """:func:`_measure_batch` on each group of rows, in measurement mode, under one progress bar.

    Batch ``i`` is seeded ``seed * 1_000_003 + 10 * i``, so its draws do not depend on the others.
    """
    from tqdm.auto import tqdm

    measurements: list[BatchMeasurement] = []
    with (
        _measurement_mode(model),
        tqdm(
            total=draws.passes_per_batch * len(groups),
            desc="analyze",
            unit="pass",
            disable=not show_progress,
        ) as bar,
    ):
        for index, rows in enumerate(groups):
            measurement = _measure_batch(
                model,
                collate_tokenized(rows, pad_id),
                index=index,
                draws=draws,
                seed=seed * 1_000_003 + 10 * index,
                progress=bar,
            )
            measurements.append(measurement)
            bar.set_postfix(loss=f"{measurement.loss:.3f}", trH=f"{measurement.trace_h.mean:.3g}")
    return measurements


def _settings(
    draws: _Draws,
    *,
    batches: int,
    batch_size: int,
    seed: int,
    max_length: int | None,
    dtype: torch.dtype,
    examples: int,
    examples_available: int,
    config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The run's settings as :attr:`AnalysisResult.config` records them, ``config`` last."""
    settings = {
        "alphas": draws.alphas,
        "batches": batches,
        "batch_size": batch_size,
        "probes": draws.probes,
        "noise_samples": draws.noise_samples,
        "fisher_draws": draws.fisher_draws,
        "seed": seed,
        "length_mode": draws.length_mode,
        "noise_distribution": draws.noise_distribution,
        "max_length": max_length,
        "dtype": str(dtype).removeprefix("torch."),
        "examples": examples,
        "examples_available": examples_available,
    }
    settings.update(config or {})
    return settings


def analyze(
    model: nn.Module,
    tokenizer: Any,
    dataset: Any,
    *,
    alphas: Sequence[float] = (1.0, 5.0, 10.0, 15.0),
    batches: int = 8,
    batch_size: int = 4,
    probes: int = 16,
    noise_samples: int = 16,
    seed: int = 0,
    max_length: int | None = None,
    fisher_draws: int | None = None,
    length_mode: LengthMode = "per_sequence",
    noise_distribution: NoiseDistribution = "uniform",
    show_progress: bool = True,
    config: Mapping[str, Any] | None = None,
) -> AnalysisResult:
    """Measure NEFTune's loss increase against its curvature prediction on ``batches`` batches.

    Per batch: the CE loss, ``E_eps[loss(X + eps)] - loss(X)`` at each alpha (``noise_samples``
    antithetic pairs), the prediction ``(1/6) Tr(A H_X A)`` and ``Tr(H_X)`` (``probes`` Rademacher
    probes), ``Tr(F_X)`` (``fisher_draws`` token-F draws, mean over scored tokens). See the module
    docstring for the formulas and the per-sequence length convention.

    Args:
        model: a causal LM with twice-differentiable attention (eager or SDPA); it is put in eval
            mode and its parameters frozen for the measurement, then restored.
        tokenizer: gives the padding id (and tokenizes ``dataset`` if it holds conversations).
        dataset: tokenized examples (``input_ids`` and ``assistant_masks`` or ``labels``), or
            conversations (``messages``), which are tokenized by the data module.
        alphas: NEFTune alphas to measure.
        batches, batch_size: how much data; examples are shuffled with ``seed``, and those with
            no assistant token are skipped.
        probes: Hutchinson probes per batch.
        noise_samples: antithetic noise pairs per batch and alpha (at least 2, for an error bar).
        seed: seeds the shuffle, the noise, the probes and the Fisher draws.
        max_length: truncation when ``dataset`` holds conversations.
        fisher_draws: token-F draws per batch (default: ``probes``).
        length_mode: NEFTune's ``L``: ``"per_sequence"`` (real length, NEFTune's code) or
            ``"padded"`` (transformers / TRL).
        noise_distribution: ``"uniform"`` (NEFTune) or ``"gaussian"`` (same variance).
        show_progress: show a tqdm bar on stderr.
        config: extra settings recorded in the result (model and data names, dtype...).

    Returns:
        :class:`AnalysisResult`.
    """
    alphas = [float(alpha) for alpha in alphas]
    fisher_draws = _checked_sizes(alphas, batches, batch_size, probes, noise_samples, fisher_draws)
    draws = _Draws(alphas, noise_samples, probes, fisher_draws, length_mode, noise_distribution)

    dataset = _tokenized(
        dataset, tokenizer, max_length, seed, max(SAMPLE_CAP, 4 * batches * batch_size)
    )
    lengths = [len(row["input_ids"]) for row in dataset]
    if not lengths:
        raise FishertuneError("the data set is empty")
    median_length = float(statistics.median(lengths))
    hidden = int(find_input_embeddings(model).weight.shape[-1])

    chosen = _scored_rows(dataset, seed, batches * batch_size)
    groups = [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]
    measurements = _measure_groups(
        model, groups, _pad_token_id(tokenizer), draws, seed, show_progress
    )
    settings = _settings(
        draws,
        batches=len(groups),
        batch_size=batch_size,
        seed=seed,
        max_length=max_length,
        dtype=next(model.parameters()).dtype,
        examples=len(chosen),
        examples_available=len(dataset),
        config=config,
    )
    return _summarize(measurements, settings, hidden, median_length)


def _summarize(
    measurements: list[BatchMeasurement],
    config: dict[str, Any],
    hidden: int,
    median_length: float,
) -> AnalysisResult:
    trace_h = combine_batches([m.trace_h for m in measurements])
    trace_f = combine_batches([m.trace_f for m in measurements])
    gap = combine_batches(
        [
            Estimate(
                m.trace_h.mean - m.trace_f.mean, math.hypot(m.trace_h.stderr, m.trace_f.stderr)
            )
            for m in measurements
        ]
    )
    rms = statistics.fmean(m.embedding_rms for m in measurements)
    typical = max(1, round(median_length))
    summaries = []
    for alpha in config["alphas"]:
        measured = combine_batches([m.measured[alpha] for m in measurements])
        predicted = combine_batches([m.predicted(alpha) for m in measurements])
        coef = neftune_equivalent_coef(alpha, typical, hidden)
        scale = neftune_scale(alpha, typical, hidden)
        summaries.append(
            AlphaSummary(
                alpha=alpha,
                scale_at_median=scale,
                scale_over_rms=scale / rms if rms > 0 else math.nan,
                lambda_equiv=coef,
                measured=measured,
                predicted=predicted,
                ratio=_ratio(measured, predicted),
                predicted_median_length=coef * trace_h.mean,
                fisher_penalty_at_lambda_equiv=coef * trace_f.mean,
                batches_agreeing=sum(
                    _agree(m.measured[alpha], m.predicted(alpha)) for m in measurements
                ),
            )
        )
    return AnalysisResult(
        config=config,
        hidden_size=hidden,
        median_length=median_length,
        batches=measurements,
        alphas=summaries,
        loss=combine_batches([Estimate(m.loss, 0.0) for m in measurements]),
        trace_h=trace_h,
        trace_f=trace_f,
        gap=gap,
        fisher_over_hessian=_ratio(trace_f, trace_h),
        embedding_rms=rms,
        # the L of lambda_equiv = alpha^2 / (6 L d): the data's median length, rounded
        extra={"typical_length": typical},
    )


def _tokenized(dataset: Any, tokenizer: Any, max_length: int | None, seed: int, cap: int) -> Any:
    """``dataset`` itself when it holds token ids; otherwise tokenize its conversations.

    A large set of conversations is first cut to a seeded random sample of ``cap`` of them: the
    measurement uses a few batches, and the median length is estimated well from a sample, so
    tokenizing a whole SFT mixture (866k conversations for Tulu 3) would be wasted.
    """
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        columns = list(dataset[0]) if len(dataset) else []
    if "input_ids" in columns:
        return dataset
    if "messages" not in columns and "completion" not in columns:
        raise FishertuneError(
            "the data set has neither 'input_ids' nor 'messages' nor 'prompt'/'completion' "
            f"(fields: {sorted(columns)}); read it with fishertune.data.load_conversations"
        )
    from fishertune.data.chat import ensure_chat_template, tokenize_dataset

    if len(dataset) > cap and hasattr(dataset, "select"):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        dataset = dataset.select(sorted(order[:cap].tolist()))
    ensure_chat_template(tokenizer)
    return tokenize_dataset(dataset, tokenizer, max_length or 1024)


def _pad_token_id(tokenizer: Any) -> int:
    # Padding never reaches the loss (attention mask, -100 labels); any valid id will do.
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0
