"""Stochastic trace estimation over a matrix-vector product (Hutchinson), and its dense reference.

Torch only. A linear operator ``A`` on tensors of shape ``S`` (``D = prod(S)`` entries) is given as
a function ``matvec(v) -> A v`` that maps a tensor of shape ``S`` to one of shape ``S``. Nothing
here materializes ``A`` except :func:`dense_trace`, which exists to test the rest.

Hutchinson (1989): for probes ``z`` with ``E[z z^T] = I``,

    ``Tr(A) = E[z^T A z]``,   estimated by ``(1/K) sum_k z_k^T A z_k``.

With Rademacher probes (``z_i = +-1``) the variance is ``2 sum_{i != j} A_ij^2`` for a
symmetric ``A`` (the diagonal contributes nothing: a diagonal ``A`` is estimated exactly); with
Gaussian probes it is ``2 ||A||_F^2``. The standard error of the mean falls like ``1 / sqrt(K)``.

The same probes also give weighted traces: ``E[(w * z)^T A z] = sum_i w_i A_ii = Tr(diag(w) A)``,
so one matrix-vector product per probe serves several weightings (:func:`hutchinson_traces`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Estimate",
    "Matvec",
    "TraceEstimate",
    "dense_matrix",
    "dense_trace",
    "hutchinson_trace",
    "hutchinson_traces",
    "sample_probe",
]

Matvec = Callable[[Tensor], Tensor]
ProbeDistribution = Literal["rademacher", "gaussian"]


@dataclass(frozen=True)
class Estimate:
    """A Monte-Carlo mean with its standard error, and the samples it came from where kept.

    The one type for an estimate with its error, in the estimators and the analysis alike.

    Attributes:
        mean: ``(1/K) sum_k s_k``.
        stderr: ``std(s) / sqrt(K)`` (unbiased std; ``nan`` when ``K < 2`` or not estimable).
        samples: (K,) float64 values ``s_k`` (for a trace, ``z_k^T A z_k``) on the CPU, or
            ``None`` for an estimate built from a mean and an error.
    """

    mean: float
    stderr: float
    samples: Tensor | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_samples(cls, samples: Tensor | Sequence[float]) -> Estimate:
        """Summarize values ``samples`` (K,) into mean and standard error (``nan`` for K = 0)."""
        values = torch.as_tensor(samples, dtype=torch.float64).detach().cpu().reshape(-1)
        count = values.numel()
        if count == 0:
            return cls(mean=math.nan, stderr=math.nan, samples=values)
        stderr = float(values.std(unbiased=True)) / math.sqrt(count) if count > 1 else math.nan
        return cls(mean=float(values.mean()), stderr=stderr, samples=values)

    def to_dict(self) -> dict[str, float]:
        """``{"mean", "stderr"}`` (the samples stay out of reports)."""
        return {"mean": self.mean, "stderr": self.stderr}

    @property
    def num_samples(self) -> int:
        return 0 if self.samples is None else int(self.samples.numel())

    def scaled(self, factor: float) -> Estimate:
        """The estimate of ``factor * Tr(A)`` from the same samples."""
        if self.samples is None:
            return Estimate(factor * self.mean, abs(factor) * self.stderr)
        return Estimate.from_samples(self.samples * factor)


TraceEstimate = Estimate  # the name the trace estimators have always returned


def sample_probe(
    shape: Sequence[int] | torch.Size,
    *,
    distribution: ProbeDistribution = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """One probe ``z`` of ``shape`` with ``E[z z^T] = I``: Rademacher (``+-1``) or standard normal.

    Drawn in float32 (float64 when asked) on ``device`` and cast to ``dtype``, so the same
    generator state gives the same probe for every half-precision dtype.
    """
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if distribution == "rademacher":
        bits = torch.randint(0, 2, tuple(shape), generator=generator, device=device)
        return (2 * bits - 1).to(dtype)
    if distribution == "gaussian":
        z = torch.randn(tuple(shape), generator=generator, dtype=draw_dtype, device=device)
        return z.to(dtype)
    raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")


def hutchinson_traces(
    matvec: Matvec,
    shape: Sequence[int] | torch.Size,
    weights: Mapping[str, Tensor | None],
    *,
    num_probes: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    distribution: ProbeDistribution = "rademacher",
    probe_mask: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Estimate]:
    """Weighted Hutchinson traces ``Tr(diag(w) A)`` for several weightings, from shared probes.

    Per probe ``z_k`` one product ``u_k = A z_k`` and, for each weighting ``w``,

        ``s_k(w) = sum_i w_i z_k,i u_k,i``,   ``E[s_k(w)] = sum_i w_i A_ii = Tr(diag(w) A)``

    (``w = None`` means all ones, i.e. ``Tr(A)``). The products are accumulated in float64.

    Args:
        matvec: ``v -> A v`` on tensors of ``shape``.
        shape: shape of the operator's input, e.g. (B, L, d) for embeddings.
        weights: name -> ``w`` broadcastable to ``shape`` (or ``None``).
        num_probes: ``K`` >= 1.
        generator: makes the probes reproducible (must live on ``device``).
        dtype, device: of the probes handed to ``matvec``.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        probe_mask: optional 0/1 tensor broadcastable to ``shape``; probes are multiplied by it,
            which restricts every trace to the unmasked entries (``Tr(P A P)``, ``P = diag(mask)``).
        progress: called with 1 after each product (e.g. a tqdm bar's ``update``).

    Returns:
        name -> :class:`Estimate` over the ``K`` probes.
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    shape = tuple(shape)
    samples: dict[str, list[float]] = {name: [] for name in weights}
    for _ in range(num_probes):
        z = sample_probe(
            shape, distribution=distribution, generator=generator, dtype=dtype, device=device
        )
        if probe_mask is not None:
            z = z * probe_mask.to(z.dtype)
        u = matvec(z)
        if tuple(u.shape) != shape:
            raise ValueError(f"matvec returned shape {tuple(u.shape)}, expected {shape}")
        zu = z.double() * u.double()  # (*shape)
        for name, weight in weights.items():
            value = zu if weight is None else zu * weight.double()
            samples[name].append(float(value.sum()))
        if progress is not None:
            progress(1)
    return {name: Estimate.from_samples(values) for name, values in samples.items()}


def hutchinson_trace(
    matvec: Matvec,
    shape: Sequence[int] | torch.Size,
    *,
    num_probes: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    distribution: ProbeDistribution = "rademacher",
) -> TraceEstimate:
    """Hutchinson estimate ``Tr(A) ~= (1/K) sum_k z_k^T A z_k`` with its standard error.

    Args:
        matvec: ``v -> A v`` on tensors of ``shape``.
        shape: shape of the operator's input.
        num_probes: ``K``; the standard error falls like ``1 / sqrt(K)``.
        generator, dtype, device, distribution: see :func:`hutchinson_traces`.

    Example::

        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> hutchinson_trace(lambda v: A @ v, (3,), num_probes=4).mean  # exact for diagonal A
        6.0
    """
    return hutchinson_traces(
        matvec,
        shape,
        {"trace": None},
        num_probes=num_probes,
        generator=generator,
        dtype=dtype,
        device=device,
        distribution=distribution,
    )["trace"]


def dense_matrix(
    matvec: Matvec,
    shape: Sequence[int] | torch.Size,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The (D, D) matrix of ``matvec`` built column by column from basis vectors (tests only).

    Costs ``D`` products; column ``i`` is ``A e_i`` flattened.
    """
    shape = tuple(shape)
    size = math.prod(shape)
    columns = []
    for i in range(size):
        basis = torch.zeros(size, dtype=dtype, device=device)
        basis[i] = 1.0
        columns.append(matvec(basis.reshape(shape)).reshape(size).to(dtype))
    return torch.stack(columns, dim=1)


def dense_trace(
    matvec: Matvec,
    shape: Sequence[int] | torch.Size,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> float:
    """Exact ``Tr(A) = sum_i e_i^T A e_i`` by ``D`` products with basis vectors (tests only)."""
    shape = tuple(shape)
    size = math.prod(shape)
    total = 0.0
    for i in range(size):
        basis = torch.zeros(size, dtype=dtype, device=device)
        basis[i] = 1.0
        total += float(matvec(basis.reshape(shape)).reshape(size)[i])
    return total
