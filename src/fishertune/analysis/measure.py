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

Aggregates over batches (:mod:`fishertune.analysis.results`) carry two standard errors: the
estimators' own (Monte-Carlo noise within the batches seen, ``sqrt(sum_b se_b^2) / n``) and the
between-batch one (``std_b / sqrt(n)``, which says how far another sample of the data could
land). Confidence intervals are ``+- 1.96 SE``.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fishertune.analysis.results import AnalysisResult, BatchMeasurement, summarize
from fishertune.analysis.samples import SAMPLE_CAP, measured_rows, pad_token_id, scored_rows
from fishertune.data.collate import collate_tokenized
from fishertune.errors import FishertuneError
from fishertune.estimators import EmbeddingHVP, Estimate, fisher_trace, hutchinson_traces
from fishertune.noise import NEFTuneNoise, find_input_embeddings
from fishertune.penalties import label_mask_from_labels, scored_cross_entropy

__all__ = ["SAMPLE_CAP", "analyze"]

LengthMode = Literal["per_sequence", "padded"]
NoiseDistribution = Literal["uniform", "gaussian"]


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

    dataset = measured_rows(
        dataset, tokenizer, max_length=max_length, seed=seed, batches=batches, batch_size=batch_size
    )
    lengths = [len(row["input_ids"]) for row in dataset]
    if not lengths:
        raise FishertuneError("the data set is empty")
    median_length = float(statistics.median(lengths))
    hidden = int(find_input_embeddings(model).weight.shape[-1])

    chosen = scored_rows(dataset, seed, batches * batch_size)
    groups = [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]
    measurements = _measure_groups(
        model, groups, pad_token_id(tokenizer), draws, seed, show_progress
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
    return summarize(measurements, settings, hidden, median_length)
