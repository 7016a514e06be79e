"""Hutchinson traces, embedding Hessian-vector products and Fisher traces against dense references.

Everything is float64. References: ``torch.trace`` of explicit matrices, ``torch.func.hessian`` of
the loss, and the Fisher trace by enumerating the vocabulary of a micro model
(``Tr F^(t) = sum_y p_t[y] ||grad_X log p_t[y]||^2`` from a dense ``torch.func.jacrev``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from fishertune.estimators import (
    TraceEstimate,
    dense_matrix,
    dense_trace,
    embedding_hvp,
    fisher_trace,
    hutchinson_trace,
    hutchinson_traces,
)
from fishertune.modeling import tiny_llama
from fishertune.penalties import label_mask_from_labels
from micro import CausalMix
from micro import exact_fisher_trace as micro_fisher_trace
from micro import label_mask as micro_label_mask

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default

DTYPE = torch.float64


def random_symmetric(size: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    root = torch.randn(size, size, generator=gen, dtype=DTYPE)
    return root + root.T + 3.0 * torch.diag(torch.rand(size, generator=gen, dtype=DTYPE))


class MicroCausal(torch.nn.Module):
    """``z_t = W tanh(sum_{s <= t} c_{t-s} x_s U + b)``: causal, nonlinear, enumerable vocab."""

    def __init__(self, vocab: int = 5, dim: int = 3, hidden: int = 4, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.mix = torch.exp(-0.5 * torch.arange(8, dtype=DTYPE))
        self.U = torch.randn(dim, hidden, generator=gen, dtype=DTYPE)
        self.b = 0.3 * torch.randn(hidden, generator=gen, dtype=DTYPE)
        self.W = 1.5 * torch.randn(vocab, hidden, generator=gen, dtype=DTYPE)

    def forward(self, X: Tensor) -> Tensor:  # (B, L, d) -> (B, L, V)
        length = X.shape[1]
        rel = torch.arange(length)[:, None] - torch.arange(length)[None, :]
        causal = self.mix[rel.clamp(min=0)] * (rel >= 0)  # (L, L)
        hidden = torch.tanh(torch.einsum("ts,bsd->btd", causal, X) @ self.U + self.b)
        return hidden @ self.W.T


def mean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """``-(1/N) sum_t M_t log p_t[labels_{t+1}]``, written without the library."""
    mask = labels[:, 1:] != -100  # (B, L-1)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def micro_problem(seed: int = 0) -> tuple[MicroCausal, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = MicroCausal(seed=seed)
    X = torch.randn(2, 4, 3, generator=gen, dtype=DTYPE)
    labels = torch.randint(0, 5, (2, 4), generator=gen)
    labels[0, :2] = -100  # a prompt
    labels[1, 0] = -100
    return model, X, labels


def exact_fisher_trace(logits_fn, X: Tensor, mask: Tensor) -> float:
    """``(1/N) sum_t M_t sum_y p_t[y] ||grad_X log p_t[y]||^2`` by enumerating the vocabulary."""
    jac = torch.func.jacrev(lambda x: torch.log_softmax(logits_fn(x), -1))(X)  # (B,L,V,B,L,d)
    scores = jac[mask].flatten(2)  # (N, V, D)
    probs = torch.softmax(logits_fn(X), -1)[mask]  # (N, V)
    return float((probs * scores.pow(2).sum(-1)).sum() / mask.sum())


# ---------------------------------------------------------------- Hutchinson on explicit matrices


def test_dense_references_match_the_matrix():
    A = random_symmetric(7, seed=1)
    assert dense_trace(lambda v: A @ v, (7,)) == pytest.approx(float(torch.trace(A)), rel=1e-12)
    assert torch.allclose(dense_matrix(lambda v: A @ v, (7,)), A)
    # operator on a tensor shape: A acts on the flattened tensor
    shaped = dense_matrix(lambda v: (A @ v.reshape(7)).reshape(7, 1), (7, 1))
    assert torch.allclose(shaped, A)


def test_rademacher_probes_are_exact_for_a_diagonal_matrix():
    diagonal = torch.tensor([3.0, -1.5, 0.25, 7.0], dtype=DTYPE)
    estimate = hutchinson_trace(
        lambda v: diagonal * v,
        (4,),
        num_probes=5,
        dtype=DTYPE,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.allclose(estimate.samples, torch.full((5,), 8.75, dtype=DTYPE))
    assert estimate.stderr == 0.0
    # Gaussian probes are not exact on the same matrix
    gaussian = hutchinson_trace(
        lambda v: diagonal * v,
        (4,),
        num_probes=5,
        dtype=DTYPE,
        distribution="gaussian",
        generator=torch.Generator().manual_seed(0),
    )
    assert gaussian.stderr > 0.1


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_its_standard_error(distribution):
    A = random_symmetric(12, seed=2)
    exact = float(torch.trace(A))
    estimate = hutchinson_trace(
        lambda v: A @ v,
        (12,),
        num_probes=4000,
        dtype=DTYPE,
        distribution=distribution,
        generator=torch.Generator().manual_seed(3),
    )
    assert abs(estimate.mean - exact) < 4 * estimate.stderr
    assert estimate.num_samples == 4000


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_standard_error_matches_theory_and_shrinks_like_inverse_sqrt(distribution):
    A = random_symmetric(10, seed=4)
    off_diagonal = A - torch.diag(torch.diag(A))
    # Var(z^T A z): Rademacher 2 sum_{i != j} A_ij^2, Gaussian 2 ||A||_F^2
    variance = 2 * float((off_diagonal if distribution == "rademacher" else A).pow(2).sum())
    ratios = []
    for probes in (250, 4000):
        estimate = hutchinson_trace(
            lambda v: A @ v,
            (10,),
            num_probes=probes,
            dtype=DTYPE,
            distribution=distribution,
            generator=torch.Generator().manual_seed(probes),
        )
        expected = math.sqrt(variance / probes)
        assert estimate.stderr == pytest.approx(expected, rel=0.2)
        ratios.append(estimate.stderr)
    assert ratios[0] / ratios[1] == pytest.approx(4.0, rel=0.25)  # sqrt(4000 / 250)


def test_error_shrinks_like_inverse_sqrt_of_the_matvec_budget():
    # The actual error |estimate - Tr(A)| over independent repetitions, not the reported stderr.
    A = random_symmetric(16, seed=8)
    exact = float(torch.trace(A))
    gen = torch.Generator().manual_seed(9)
    rmse = {}
    for budget in (8, 128):
        errors = torch.tensor([
            hutchinson_trace(lambda v: A @ v, (16,), num_probes=budget, dtype=DTYPE,
                             generator=gen).mean - exact
            for _ in range(150)
        ])  # fmt: skip
        rmse[budget] = float(errors.pow(2).mean().sqrt())
        assert abs(float(errors.mean())) < 4 * rmse[budget] / math.sqrt(150)  # unbiased
    assert rmse[8] / rmse[128] == pytest.approx(4.0, rel=0.3)  # sqrt(128 / 8)


def test_weighted_traces_share_probes_and_are_unbiased():
    A = random_symmetric(9, seed=5)
    weight = torch.linspace(0.1, 2.0, 9, dtype=DTYPE)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=DTYPE)
    estimates = hutchinson_traces(
        lambda v: A @ v,
        (9,),
        {"plain": None, "weighted": weight},
        num_probes=4000,
        dtype=DTYPE,
        probe_mask=mask,
        generator=torch.Generator().manual_seed(6),
    )
    masked = mask[:, None] * A * mask[None, :]
    assert abs(estimates["plain"].mean - float(torch.trace(masked))) < 4 * estimates["plain"].stderr
    exact_weighted = float((weight * torch.diag(masked)).sum())
    assert abs(estimates["weighted"].mean - exact_weighted) < 4 * estimates["weighted"].stderr
    # weighted traces of a diagonal matrix are exact with Rademacher probes
    diag = hutchinson_traces(
        lambda v: torch.diag(A) * v,
        (9,),
        {"w": weight},
        num_probes=3,
        dtype=DTYPE,
        generator=torch.Generator().manual_seed(7),
    )["w"]
    assert diag.mean == pytest.approx(float((weight * torch.diag(A)).sum()), rel=1e-12)


def test_trace_estimate_summary():
    estimate = TraceEstimate.from_samples([1.0, 2.0, 3.0, 6.0])
    assert estimate.mean == pytest.approx(3.0)
    assert estimate.stderr == pytest.approx(math.sqrt(14 / 3) / 2)
    assert estimate.scaled(2.0).mean == pytest.approx(6.0)
    assert math.isnan(TraceEstimate.from_samples([1.0]).stderr)
    with pytest.raises(ValueError):
        hutchinson_trace(lambda v: v, (3,), num_probes=0)


# ------------------------------------------------------------- Hessian-vector products of a loss


def test_embedding_hvp_matches_dense_hessian_on_a_micro_model():
    model, X, labels = micro_problem()

    def loss_fn(x: Tensor) -> Tensor:
        return mean_cross_entropy(model(x), labels)

    hessian = torch.func.hessian(loss_fn)(X).reshape(X.numel(), X.numel())
    hvp = embedding_hvp(loss_fn, X)
    built = dense_matrix(hvp, X.shape)
    assert torch.allclose(built, hessian, atol=1e-12, rtol=1e-10)
    assert hvp.num_matvecs == X.numel()
    assert float(hvp.loss.detach()) == pytest.approx(float(loss_fn(X)), rel=1e-14)
    assert not X.requires_grad  # the caller's tensor is left alone


def test_embedding_hvp_through_a_llama_with_eager_attention():
    model = tiny_llama(11, hidden_size=8, num_layers=1, num_heads=2).to(DTYPE).eval()
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 11, (2, 4), generator=gen)
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, 0] = -100
    X = model.get_input_embeddings()(input_ids).detach()

    def loss_fn(x: Tensor) -> Tensor:
        logits = model(inputs_embeds=x, attention_mask=attention_mask).logits
        return mean_cross_entropy(logits, labels)

    hessian = torch.autograd.functional.hessian(loss_fn, X).reshape(X.numel(), X.numel())
    built = dense_matrix(embedding_hvp(loss_fn, X), X.shape)
    # Llama's RMSNorm and attention softmax compute in float32 even in a float64 model, so the
    # agreement is float32-limited (1.5e-6 of a largest entry ~10 measured).
    scale = float(hessian.abs().max())
    assert torch.allclose(built, hessian, atol=1e-6 * scale, rtol=0)
    assert torch.allclose(built, built.T, atol=1e-6 * scale, rtol=0)
    # the padded position does not reach the loss: its rows of H_X are zero
    padded = torch.zeros(X.shape, dtype=torch.bool)
    padded[1, 3] = True
    assert built[padded.reshape(-1)].abs().max() < 1e-14


def test_hutchinson_on_the_hvp_converges_within_a_matvec_budget():
    model, X, labels = micro_problem(seed=1)

    def loss_fn(x: Tensor) -> Tensor:
        return mean_cross_entropy(model(x), labels)

    exact = float(torch.func.hessian(loss_fn)(X).reshape(X.numel(), -1).trace())
    assert exact == pytest.approx(dense_trace(embedding_hvp(loss_fn, X), X.shape), rel=1e-10)
    hvp = embedding_hvp(loss_fn, X)
    budget = 400
    estimate = hutchinson_trace(
        hvp, X.shape, num_probes=budget, dtype=DTYPE, generator=torch.Generator().manual_seed(2)
    )
    assert hvp.num_matvecs == budget
    assert abs(estimate.mean - exact) < 4 * estimate.stderr
    assert abs(estimate.mean - exact) < 0.1 * abs(exact)


# --------------------------------------------------------------------------------- Fisher traces


def test_fisher_trace_matches_enumerated_vocabulary():
    model, X, labels = micro_problem(seed=2)
    mask = label_mask_from_labels(labels)
    exact = exact_fisher_trace(model, X, mask)
    embeds = X.clone().requires_grad_(True)
    logits = model(embeds)
    estimate = fisher_trace(
        embeds, logits, mask, draws=3000, generator=torch.Generator().manual_seed(0)
    )
    assert abs(estimate.mean - exact) < 4 * estimate.stderr
    assert estimate.stderr < 0.05 * exact
    # "sum" is the same draws without 1/N
    summed = fisher_trace(
        embeds,
        logits,
        mask,
        draws=3000,
        reduction="sum",
        generator=torch.Generator().manual_seed(0),
    )
    assert summed.mean == pytest.approx(estimate.mean * int(mask.sum()), rel=1e-10)


def test_fisher_trace_with_padding_and_cross_position_mixing():
    # micro.CausalMix mixes positions causally and honours the attention mask; the reference
    # enumerates the vocabulary over dense Jacobians of the whole X, cross-position terms included.
    model = CausalMix(vocab=6, dim=3, hidden=4, seed=4)
    input_ids = torch.tensor([[0, 3, 1, 4, 2], [5, 2, 2, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 1, 4, 2], [-100, 2, 2, -100, -100]])
    mask = micro_label_mask(labels)
    X = model.embeddings(input_ids).detach()
    exact = micro_fisher_trace(lambda x: model.logits(x, attention_mask), X, mask)
    embeds = X.clone().requires_grad_(True)
    estimate = fisher_trace(
        embeds,
        model.logits(embeds, attention_mask),
        mask,
        draws=2000,
        generator=torch.Generator().manual_seed(5),
    )
    assert abs(estimate.mean - exact) < 4 * estimate.stderr
    assert estimate.stderr < 0.05 * exact


def test_hessian_equals_fisher_for_a_model_linear_in_the_embeddings():
    # z = W x has no second derivative: H_X = J^T H_z J = F_X (Gauss-Newton is exact), whatever
    # the labels. With the tanh model the residual term makes them differ.
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(5, 3, generator=gen, dtype=DTYPE)
    X = torch.randn(2, 4, 3, generator=gen, dtype=DTYPE)
    labels = torch.randint(0, 5, (2, 4), generator=gen)
    labels[0, 1] = -100
    mask = label_mask_from_labels(labels)

    def linear(x: Tensor) -> Tensor:
        return x @ W.T

    hessian_trace = dense_trace(
        embedding_hvp(lambda x: mean_cross_entropy(linear(x), labels), X), X.shape
    )
    assert hessian_trace == pytest.approx(exact_fisher_trace(linear, X, mask), rel=1e-10)

    model, X2, labels2 = micro_problem(seed=3)
    tanh_hessian = dense_trace(
        embedding_hvp(lambda x: mean_cross_entropy(model(x), labels2), X2), X2.shape
    )
    tanh_fisher = exact_fisher_trace(model, X2, label_mask_from_labels(labels2))
    assert abs(tanh_hessian - tanh_fisher) > 1e-3 * abs(tanh_fisher)
