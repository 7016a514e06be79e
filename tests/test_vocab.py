"""The chunked vocabulary kernels (:mod:`fishertune.vocab`) against the dense computation.

Every check is in float64 against ``log_softmax`` / ``softmax`` over the whole (N, V) scored
logits, with chunks of a few rows (``CHUNK_BYTES`` patched down) so that the chunk loop, a
shorter last chunk and unscored rows between chunks are all exercised.
"""

from __future__ import annotations

import math

import pytest
import torch

from fishertune import vocab, vocab_chunks
from fishertune.penalties import (
    _CDF_BLOCK,
    _inverse_cdf_draws,
    fisher_objective,
    label_mask_from_labels,
    sample_targets,
)

B, L, V = 3, 9, 37


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Three rows per chunk: 19 scored positions give six full chunks and a shorter one."""
    monkeypatch.setattr(vocab_chunks, "CHUNK_BYTES", 3 * 4 * V)


def _batch(seed: int = 0, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, L, V, generator=generator, dtype=torch.float64)).to(dtype)
    labels = torch.randint(V, (B, L), generator=generator)
    labels[0, :3] = -100  # prompt
    labels[2, 6:] = -100  # padding
    mask = label_mask_from_labels(labels)
    next_tokens = labels[:, 1:][mask[:, :-1]]
    return logits.requires_grad_(), labels, mask, next_tokens


def test_chunks_cover_the_rows_once():
    chunks = list(vocab.row_chunks(19, V, torch.device("cpu")))
    assert [c.stop - c.start for c in chunks] == [3] * 6 + [1]
    assert chunks[0].start == 0 and chunks[-1].stop == 19
    assert vocab.scored_rows(torch.tensor([[False, True], [True, True]])).tolist() == [1, 2, 3]


@pytest.mark.parametrize("kind", ["token", "logit"])
def test_ce_g_and_gradients_match_the_dense_computation(kind):
    logits, _, mask, y = _batch()
    n = int(mask.sum())
    draws = torch.randint(V, (n, 2), generator=torch.Generator().manual_seed(1))
    terms = vocab.scored_terms(logits, mask, y, draws, kind=kind, statistics=True)

    log_probs = torch.log_softmax(logits[mask], dim=-1)
    ce = -log_probs.gather(1, y[:, None]).sum()
    g = fisher_objective(kind, logits, mask, draws)  # dense reference, p frozen for logit-F
    torch.testing.assert_close(terms.ce, ce, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(terms.g, g, rtol=1e-13, atol=1e-12)

    # any combination of the outputs: a CE weight and one weight per draw
    weights = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
    got = torch.autograd.grad(weights[0] * terms.ce + (weights[1:] * terms.g).sum(), logits)[0]
    want = torch.autograd.grad(weights[0] * ce + (weights[1:] * g).sum(), logits)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    assert (got[~mask] == 0).all()

    tokens, entropy, correct, ce_stat = terms.statistics.tolist()
    assert tokens == n
    assert entropy == pytest.approx(-(log_probs.exp() * log_probs).sum().item(), rel=1e-12)
    assert correct == (log_probs.argmax(-1) == y).sum().item()
    assert ce_stat == pytest.approx(ce.item(), rel=1e-13)


def test_logit_f_with_a_given_reference_holds_it_constant():
    """At a shifted point g = sum_t (z_t[y'] - <z_t, p_ref>) with p_ref from elsewhere: its
    gradient is e_y' - p_ref, with or without the CE of the same logits beside it."""
    logits, _, mask, y = _batch(2)
    reference = torch.softmax(_batch(3)[0].detach()[mask], dim=-1)  # another point's p
    assert torch.equal(vocab.scored_softmax(_batch(3)[0].detach(), mask), reference)
    draws = torch.randint(V, (int(mask.sum()), 1), generator=torch.Generator().manual_seed(4))
    for labels in (None, y):
        terms = vocab.scored_terms(logits, mask, labels, draws, kind="logit", reference=reference)
        g = fisher_objective("logit", logits, mask, draws, reference_probs=reference)
        torch.testing.assert_close(terms.g, g, rtol=1e-13, atol=1e-12)
        loss = terms.g.sum() if labels is None else terms.g.sum() - 0.5 * terms.ce
        got = torch.autograd.grad(loss, logits)[0]
        dense = g.sum()
        if labels is not None:
            dense = dense + 0.5 * torch.log_softmax(logits[mask], -1).gather(1, y[:, None]).sum()
        want = torch.autograd.grad(dense, logits)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_a_half_precision_reference_is_kept_as_its_logits():
    """bf16 logits (the model's, under autocast): logit-F's frozen reference keeps their scored
    rows in bf16 (half the float32 softmax) and the shifted pass's ``g`` and its gradient are
    bit for bit those with the float32 ``p_ref``, whose softmax upcasts the same logits."""
    logits, _, mask, _ = _batch(2)
    frozen = _batch(3)[0].detach().to(torch.bfloat16)
    kept = vocab.frozen_reference(frozen, mask)
    n = int(mask.sum())
    assert kept.scored.dtype == torch.bfloat16 and kept.scored.shape == (n, V)
    softmax = vocab.scored_softmax(frozen, mask)
    assert softmax.dtype == torch.float32
    draws = torch.randint(V, (n, 2), generator=torch.Generator().manual_seed(4))
    shifted = logits.detach().to(torch.bfloat16).requires_grad_()
    results = []
    for reference in (kept, softmax):
        terms = vocab.scored_terms(shifted, mask, None, draws, kind="logit", reference=reference)
        (grad,) = torch.autograd.grad(terms.g.sum(), shifted)
        results.append((terms.g, grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][1].abs().sum() > 0


@pytest.mark.parametrize(
    ("kind", "given_reference"), [("token", False), ("logit", False), ("logit", True)]
)
def test_rows_log_likelihood_matches_the_dense_computation(kind, given_reference):
    """The unbiased estimator's ``l_bs = sum_{t in row b} log p_t[y'_ts]`` (B, m) against dense
    float64 ``log_softmax`` summed per row: values, and gradients alone and beside CE and ``g``
    (a repeated draw, a row with no scored position, logit-F's ``g`` with its own ``q``)."""
    logits, labels, _, _ = _batch(10)
    labels = labels.clone()
    labels[1] = -100  # row 1 scores nothing: its l_1s = 0
    mask = label_mask_from_labels(labels)
    y = labels[:, 1:][mask[:, :-1]]
    n = int(mask.sum())
    draws = torch.randint(V, (n, 3), generator=torch.Generator().manual_seed(11))
    draws[::2, 2] = draws[::2, 0]  # the same token drawn twice at a position
    reference = torch.softmax(_batch(12)[0].detach()[mask], -1) if given_reference else None
    terms = vocab.scored_terms(
        logits, mask, y, draws, kind=kind, reference=reference, row_log_likelihood=True
    )

    log_probs = torch.log_softmax(logits[mask], dim=-1)  # (N, V), dense float64
    owner = mask.nonzero()[:, 0]
    dense_rows = torch.zeros(B, 3, dtype=torch.float64).index_add(
        0, owner, log_probs.gather(1, draws)
    )
    assert terms.row_log_likelihood.shape == (B, 3)
    torch.testing.assert_close(terms.row_log_likelihood, dense_rows, rtol=1e-13, atol=1e-12)
    assert (terms.row_log_likelihood[1] == 0).all()
    ce = -log_probs.gather(1, y[:, None]).sum()
    g = fisher_objective(kind, logits, mask, draws, reference_probs=reference)

    generator = torch.Generator().manual_seed(13)
    row_weights = torch.randn(B, 3, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(
        (row_weights * terms.row_log_likelihood).sum(), logits, retain_graph=True
    )[0]
    want = torch.autograd.grad((row_weights * dense_rows).sum(), logits, retain_graph=True)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    assert (got[~mask] == 0).all()

    g_weights = torch.randn(3, generator=generator, dtype=torch.float64)
    loss = 0.7 * terms.ce + (g_weights * terms.g).sum()
    got = torch.autograd.grad(loss + (row_weights * terms.row_log_likelihood).sum(), logits)[0]
    dense = 0.7 * ce + (g_weights * g).sum() + (row_weights * dense_rows).sum()
    want = torch.autograd.grad(dense, logits)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_half_precision_logits_are_read_in_float32_and_get_their_own_dtype_back():
    logits, _, mask, y = _batch(5, torch.bfloat16)
    terms = vocab.scored_terms(logits, mask, y)
    assert terms.ce.dtype == torch.float32 and terms.g is None and terms.statistics is None
    dense = -torch.log_softmax(logits[mask].float(), -1).gather(1, y[:, None]).sum()
    torch.testing.assert_close(terms.ce, dense, rtol=1e-6, atol=1e-4)
    (grad,) = torch.autograd.grad(terms.ce, logits)
    (want,) = torch.autograd.grad(dense, logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, want)


def test_no_scored_position_gives_zeros():
    logits = torch.randn(2, 4, V, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    empty = torch.empty(0, dtype=torch.long)
    terms = vocab.scored_terms(logits, mask, empty, empty[:, None], statistics=True)
    assert terms.ce.item() == 0 and terms.g.tolist() == [0.0]
    assert terms.statistics.tolist() == [0.0] * 4
    assert (torch.autograd.grad(terms.ce + terms.g.sum(), logits)[0] == 0).all()


def test_bad_arguments_are_refused():
    logits, _, mask, _ = _batch()
    with pytest.raises(ValueError, match="kind"):
        vocab.scored_terms(logits, mask, kind="hessian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels"):
        vocab.scored_terms(logits, mask, statistics=True)
    with pytest.raises(ValueError, match="draws"):
        vocab.scored_terms(logits, mask, row_log_likelihood=True)


# --------------------------------------------------------------------------------------------
# the sampler


def test_chunked_draws_are_the_dense_sampler_draws():
    """Same uniforms (one (N, m) float64 torch.rand from the generator) and the same float32
    softmax per row: the chunked sampler draws exactly what the whole-(N, V) one draws."""
    logits, _, mask, _ = _batch(6)
    got = sample_targets(logits, mask, samples=3, generator=torch.Generator().manual_seed(7))
    probs = torch.softmax(logits.detach()[mask].float(), dim=-1)  # the dense sampler's input
    want = _inverse_cdf_draws(probs, 3, torch.Generator().manual_seed(7), block=_CDF_BLOCK)
    assert torch.equal(got, want)
    # and the generator is left where the dense sampler leaves it
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    sample_targets(logits, mask, samples=3, generator=a)
    _inverse_cdf_draws(probs, 3, b)
    assert torch.equal(a.get_state(), b.get_state())


def test_chunked_draws_follow_the_softmax_law():
    """Each row's frequencies over 20000 draws against softmax(z_t) (float64), within 4.5
    standard errors; rows differ, so a draw taken from the wrong row (a chunk offset) fails."""
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(1, 7, V, generator=generator, dtype=torch.float64)
    mask = torch.ones(1, 7, dtype=torch.bool)
    mask[0, 2] = False
    draws = 20000
    targets = vocab.softmax_draws(logits, mask, draws, torch.Generator().manual_seed(9), block=8)
    probs = torch.softmax(logits[mask], dim=-1)
    for row, p in zip(targets, probs, strict=True):
        freq = torch.bincount(row, minlength=V).double() / draws
        se = (p * (1 - p) / draws).sqrt()
        assert ((freq - p).abs() <= 4.5 * se + 1e-12).all()
    # a chi-square over all rows together: sum of (observed - expected)^2 / expected
    counts = torch.stack([torch.bincount(r, minlength=V) for r in targets]).double()
    chi2 = ((counts - draws * probs) ** 2 / (draws * probs)).sum().item()
    dof = probs.shape[0] * (V - 1)
    assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_ce_matches_the_dense_projection_and_ce(with_bias):
    """float64, chunks of 3 rows: CE, metrics and the gradients of h, W and b equal the dense
    ``log_softmax(h W^T + b)`` computation."""
    generator = torch.Generator().manual_seed(5)
    n, d = 10, 4
    hidden = torch.randn(n, d, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(V, d, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = (
        torch.randn(V, dtype=torch.float64, generator=generator, requires_grad=True)
        if with_bias
        else None
    )
    targets = torch.randint(V, (n,), generator=generator)
    ce, stats = vocab.linear_scored_ce(hidden, weight, targets, bias)
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    grads = torch.autograd.grad(ce, inputs)

    z = hidden @ weight.T + (bias if with_bias else 0.0)
    log_p = torch.log_softmax(z, -1)
    dense = -log_p.gather(1, targets[:, None]).sum()
    dense_grads = torch.autograd.grad(dense, inputs)
    assert float(ce) == pytest.approx(float(dense), rel=1e-12)
    for got, want in zip(grads, dense_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    entropy = -(log_p.exp() * log_p).sum()
    correct = (z.argmax(-1) == targets).sum()
    assert stats.tolist() == pytest.approx([n, float(entropy), float(correct), float(dense)])


def test_linear_ce_under_bf16_autocast_matches_the_autocast_projection():
    """bf16 autocast: the projection in bf16 (as the model's lm_head would run), the softmax in
    float32; value and gradients as the dense computation under the same autocast."""
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(9, 8, generator=generator, requires_grad=True)
    weight = torch.randn(V, 8, generator=generator, requires_grad=True)
    targets = torch.randint(V, (9,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, _ = vocab.linear_scored_ce(hidden, weight, targets)
        z = (hidden @ weight.T).float()
        dense = -torch.log_softmax(z, -1).gather(1, targets[:, None]).sum()
    assert ce.dtype == torch.float32
    assert float(ce) == pytest.approx(float(dense), rel=1e-5)
    for got, want in zip(
        torch.autograd.grad(ce, [hidden, weight]),
        torch.autograd.grad(dense, [hidden, weight]),
        strict=True,
    ):
        assert float((got - want).norm() / want.norm()) < 1e-2
