"""token-F and logit-F against exact computation on micro models (float64, enumerated vocabulary).

References come from ``tests/micro.py``: dense Jacobians over the whole ``X`` (cross-position terms
included), hand-derived gradients for the linear-softmax model, and central finite differences.
"""

from __future__ import annotations

import math

import pytest
import torch

from fishertune.penalties import (
    fisher_objective,
    label_mask_from_labels,
    logit_fisher,
    sample_targets,
    token_fisher,
)
from micro import (
    CausalMix,
    LinearSoftmax,
    central_differences,
    exact_fisher_trace,
    exact_uniform_expectation,
    label_mask,
    reference_penalty,
    relative_error,
)

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default

PENALTIES = {"token": token_fisher, "logit": logit_fisher}

# Two rows of length 5: a two-token prompt in row 0, a one-token prompt and one right-padding
# position in row 1; N = 6 scored positions.
INPUT_IDS = torch.tensor([[0, 3, 1, 4, 2], [5, 2, 2, 0, 1]])
ATTENTION = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
LABELS = torch.tensor([[-100, -100, 1, 4, 2], [-100, 2, 2, 0, -100]])


def forward(model, input_ids=INPUT_IDS, attention=ATTENTION):
    """(X, logits, logits_fn) with X = E[ids] keeping the path to the embedding table."""
    X = model.embeddings(input_ids)

    def logits_fn(inp):
        return model.logits(inp, attention)

    return X, logits_fn(X), logits_fn


def params_of(model):
    return [p for _, p in sorted(model.named_parameters())]


# --------------------------------------------------------------------------------------------
# label mask and values


def test_label_mask_from_labels_matches_shifted_labels():
    mask = label_mask_from_labels(LABELS)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, label_mask(LABELS))
    assert mask.tolist() == [
        [False, True, True, True, False],
        [True, True, True, False, False],
    ]


@pytest.mark.parametrize("model_cls", [LinearSoftmax, CausalMix])
@pytest.mark.parametrize("kind", ["token", "logit"])
def test_value_matches_dense_jacobian(model_cls, kind):
    """R for explicit draws equals ||sum_t J_t^T (e_y - p_t)||^2 / N from dense Jacobians."""
    model = model_cls()
    mask = label_mask(LABELS)
    X, logits, logits_fn = forward(model)
    targets = torch.randint(6, (int(mask.sum()), 3), generator=torch.Generator().manual_seed(1))
    value = PENALTIES[kind](X, logits, mask, targets=targets)
    expected = reference_penalty(logits_fn, X, mask, targets)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)


def test_token_and_logit_same_value_for_same_draws():
    model = CausalMix()
    mask = label_mask(LABELS)
    X, logits, _ = forward(model)
    targets = sample_targets(logits, mask, samples=2, generator=torch.Generator().manual_seed(3))
    tok = token_fisher(X, logits, mask, targets=targets)
    log = logit_fisher(X, logits, mask, targets=targets)
    torch.testing.assert_close(tok, log, rtol=1e-13, atol=0)
    # same generator seed, sampling inside the call
    tok = token_fisher(X, logits, mask, samples=2, generator=torch.Generator().manual_seed(4))
    log = logit_fisher(X, logits, mask, samples=2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(tok, log, rtol=1e-13, atol=0)


# --------------------------------------------------------------------------------------------
# gradients


def _linear_hand_gradients(model, mask, targets):
    """d R / d W and d R / d X of both penalties for z_t = W x_t, by hand.

    With r_t = e_{y_t} - p_t, v_t = W^T r_t (v is position-wise here) and
    S_t = diag(p_t) - p_t p_t^T = d p_t / d z_t, for one draw:

        R = (1/N) sum_t ||W^T r_t||^2
        logit-F (p constant):  dR/dW = (2/N) sum_t r_t v_t^T,            dR/dx_t = 0
        token-F (dr = -S dz):  dR/dW = (2/N) sum_t [r_t v_t^T - S_t W v_t x_t^T],
                               dR/dx_t = -(2/N) W^T S_t W v_t
    and the draws are averaged.
    """
    W = model.W.detach()
    X = model.embeddings(INPUT_IDS).detach()[mask]  # (N, d)
    p = torch.softmax(X @ W.T, dim=-1)  # (N, V)
    n, m = targets.shape
    grad_w = {"token": torch.zeros_like(W), "logit": torch.zeros_like(W)}
    grad_x = torch.zeros_like(X)
    for s in range(m):
        for t in range(n):
            r = -p[t].clone()
            r[targets[t, s]] += 1.0
            v = W.T @ r  # (d,)
            S = torch.diag(p[t]) - torch.outer(p[t], p[t])  # (V, V)
            common = 2 * torch.outer(r, v)
            grad_w["logit"] += common
            grad_w["token"] += common - 2 * torch.outer(S @ W @ v, X[t])
            grad_x[t] += -2 * W.T @ S @ W @ v
    scale = 1.0 / (n * m)
    grad_w = {k: g * scale for k, g in grad_w.items()}
    # scatter the position gradients onto the embedding table rows
    grad_table = {"logit": torch.zeros_like(model.embed), "token": torch.zeros_like(model.embed)}
    grad_table["token"].index_add_(0, INPUT_IDS[mask], grad_x * scale)
    return grad_w, grad_table


def test_linear_softmax_gradients_match_hand_formulas():
    model = LinearSoftmax()
    mask = label_mask(LABELS)
    targets = torch.randint(6, (int(mask.sum()), 2), generator=torch.Generator().manual_seed(5))
    hand_w, hand_table = _linear_hand_gradients(model, mask, targets)
    autograd = {}
    for kind, penalty in PENALTIES.items():
        X, logits, _ = forward(model)
        R = penalty(X, logits, mask, targets=targets, create_graph=True)
        gw, gtable = torch.autograd.grad(R, [model.W, model.embed], allow_unused=True)
        if gtable is None:  # logit-F: v = W^T (e_y - p) with p constant does not depend on X
            assert kind == "logit"
            gtable = torch.zeros_like(model.embed)
        torch.testing.assert_close(gw, hand_w[kind], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gtable, hand_table[kind], rtol=1e-12, atol=1e-14)
        autograd[kind] = gw
    # the difference of the two W-gradients is -(2/N) sum_t S_t W v_t x_t^T, far from zero here
    difference = autograd["token"] - autograd["logit"]
    torch.testing.assert_close(
        difference, hand_w["token"] - hand_w["logit"], rtol=1e-12, atol=1e-14
    )
    assert difference.norm() > 0.1 * autograd["logit"].norm()


@pytest.mark.parametrize("kind", ["token", "logit"])
def test_parameter_gradient_matches_finite_differences(kind):
    """Double-backward gradient of R vs central differences, all parameters incl. the table.

    token-F: differences of the value R(theta). logit-F: differences of R with p frozen at the
    unperturbed parameters (its gradient treats p as a constant), built here explicitly.
    """
    model = CausalMix()
    mask = label_mask(LABELS)
    params = params_of(model)
    X, logits, _ = forward(model)
    targets = sample_targets(logits, mask, samples=2, generator=torch.Generator().manual_seed(6))
    R = PENALTIES[kind](X, logits, mask, targets=targets, create_graph=True)
    grads = torch.autograd.grad(R, params)

    frozen = torch.softmax(logits.detach(), dim=-1)[mask] if kind == "logit" else None

    def value():
        X_, _, fn = forward(model)
        return reference_penalty(fn, X_, mask, targets, reference_probs=frozen)

    fd = central_differences(value, params, step=1e-5)
    errors = [relative_error(g, f) for g, f in zip(grads, fd, strict=True)]
    print(
        f"\n{kind}-F autograd vs central fd, relative error per parameter: "
        + ", ".join(
            f"{name}={e:.1e}"
            for (name, _), e in zip(sorted(model.named_parameters()), errors, strict=True)
        )
    )
    assert max(errors) < 1e-6
    if kind == "logit":
        # differences of the VALUE (p recomputed) match token-F's gradient, not logit-F's
        def live_value():
            X_, _, fn = forward(model)
            return reference_penalty(fn, X_, mask, targets)

        fd_live = torch.cat([f.flatten() for f in central_differences(live_value, params, 1e-5)])
        flat = torch.cat([g.flatten() for g in grads])
        assert relative_error(flat, fd_live) > 1e-2
        tok = token_fisher(*forward(model)[:2], mask, targets=targets)
        flat_tok = torch.cat([g.flatten() for g in torch.autograd.grad(tok, params)])
        assert relative_error(flat_tok, fd_live) < 1e-6


def test_token_and_logit_gradients_differ_on_causal_model():
    model = CausalMix()
    mask = label_mask(LABELS)
    params = params_of(model)
    targets = torch.randint(6, (int(mask.sum()), 1), generator=torch.Generator().manual_seed(8))
    flat = {}
    for kind, penalty in PENALTIES.items():
        X, logits, _ = forward(model)
        grads = torch.autograd.grad(penalty(X, logits, mask, targets=targets), params)
        flat[kind] = torch.cat([g.flatten() for g in grads])
    cosine = torch.nn.functional.cosine_similarity(flat["token"], flat["logit"], dim=0)
    assert relative_error(flat["logit"], flat["token"]) > 1e-2
    assert cosine < 0.9999


# --------------------------------------------------------------------------------------------
# expectations: model sampling is unbiased for the Fisher trace, uniform sampling is not


def _monte_carlo(sampling: str, draws: int, seed: int) -> tuple[float, float]:
    model = CausalMix()
    mask = label_mask(LABELS)
    X, logits, _ = forward(model)
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [
            float(
                token_fisher(X, logits, mask, sampling=sampling, generator=gen, create_graph=False)
            )
            for _ in range(draws)
        ]
    )
    return float(values.mean()), float(values.std() / math.sqrt(draws))


def test_model_sampling_is_unbiased_for_fisher_trace():
    model = CausalMix()
    mask = label_mask(LABELS)
    X, _, fn = forward(model)
    exact = exact_fisher_trace(fn, X, mask)
    mean, se = _monte_carlo("model", draws=4000, seed=11)
    print(
        f"\nmodel sampling: MC mean {mean:.5f} +- {se:.5f} (SE), exact (1/N) sum Tr F_X^(t) "
        f"{exact:.5f}, z = {(mean - exact) / se:+.2f}"
    )
    assert abs(mean - exact) < 4 * se
    assert se < 0.05 * exact  # the bound is informative


def test_uniform_sampling_has_its_own_expectation():
    model = CausalMix()
    mask = label_mask(LABELS)
    X, _, fn = forward(model)
    fisher = exact_fisher_trace(fn, X, mask)
    uniform = exact_uniform_expectation(fn, X, mask)
    mean, se = _monte_carlo("uniform", draws=4000, seed=12)
    print(
        f"\nuniform sampling: MC mean {mean:.5f} +- {se:.5f} (SE), exact uniform expectation "
        f"{uniform:.5f} (z = {(mean - uniform) / se:+.2f}), Fisher trace {fisher:.5f} "
        f"(z = {(mean - fisher) / se:+.1f})"
    )
    assert abs(mean - uniform) < 4 * se
    assert abs(mean - fisher) > 20 * se


def test_model_sampling_frequencies_follow_softmax():
    logits = torch.tensor([[[2.0, 0.5, -1.0, 0.0, 1.0]]], dtype=torch.float64)
    mask = torch.tensor([[True]])
    draws = 20000
    targets = sample_targets(
        logits, mask, samples=draws, generator=torch.Generator().manual_seed(0)
    )
    freq = torch.bincount(targets.flatten(), minlength=5).double() / draws
    p = torch.softmax(logits[0, 0], -1)
    se = (p * (1 - p) / draws).sqrt()
    assert ((freq - p).abs() < 4 * se).all()
    uniform = sample_targets(
        logits, mask, samples=draws, sampling="uniform", generator=torch.Generator().manual_seed(0)
    )
    freq = torch.bincount(uniform.flatten(), minlength=5).double() / draws
    assert ((freq - 0.2).abs() < 4 * math.sqrt(0.2 * 0.8 / draws)).all()


def test_low_probability_tail_is_drawn_at_its_rate_at_llama3_vocabulary():
    """V = 128256: two tokens hold 1 - 1e-4, the other 128254 share 1e-4 (7.8e-10 each, far
    below float32's spacing of 6e-8 near 1). Their total is drawn at rate 1e-4, and spread over
    them as the law says: ~200 draws among 128k tokens almost never repeat one (expected
    repeated pairs 0.16), while a float32 CDF piles the tail's mass on the few tokens where its
    rounded value steps (or, without double accumulation, never draws the tail at all)."""
    vocab, tail_mass = 128256, 1e-4
    probs = torch.full((vocab,), tail_mass / (vocab - 2), dtype=torch.float64)
    probs[0], probs[1] = 0.5, 0.5 - tail_mass
    from fishertune.penalties import _inverse_cdf_draws

    # the float32 softmax sample_targets takes, then its draws with in-block steps of 4 tokens to
    # keep the 2e6 draws fast; the precision at stake is the running total's, across blocks
    probs32 = torch.softmax(probs.log().float(), dim=-1).expand(10, vocab).contiguous()
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat(
        [_inverse_cdf_draws(probs32, 20000, generator, block=4) for _ in range(10)]
    ).flatten()
    tail = draws[draws >= 2]
    expected = tail_mass * draws.numel()  # 200
    assert abs(tail.numel() - expected) < 4 * math.sqrt(expected)
    repeats = tail.numel() - tail.unique().numel()
    assert repeats <= 3, repeats


@pytest.mark.parametrize("block", [4, 7, 16])
def test_two_level_draws_follow_the_law_for_any_block_size(block):
    """The in-block step and a shorter last block (V = 10 is no multiple of 4, 7 or 16)."""
    from fishertune.penalties import _inverse_cdf_draws

    p = torch.tensor([0.3, 0.0, 0.05, 0.1, 0.2, 0.0, 0.15, 0.1, 0.04, 0.06])
    draws = 40000
    targets = _inverse_cdf_draws(
        p.expand(3, 10).contiguous(), draws, torch.Generator().manual_seed(1), block=block
    )
    assert targets.shape == (3, draws)
    for row in targets:
        freq = torch.bincount(row, minlength=10).double() / draws
        se = (p.double() * (1 - p.double()) / draws).sqrt()
        assert ((freq - p.double()).abs() <= 4 * se + 1e-12).all()
        assert freq[1] == 0 and freq[5] == 0  # zero-probability tokens are never drawn


# --------------------------------------------------------------------------------------------
# reductions, samples, empty batches, padding


@pytest.mark.parametrize("kind", ["token", "logit"])
def test_sum_reduction_is_n_times_mean(kind):
    model = CausalMix()
    mask = label_mask(LABELS)
    X, logits, _ = forward(model)
    targets = torch.randint(6, (int(mask.sum()), 2), generator=torch.Generator().manual_seed(2))
    mean = PENALTIES[kind](X, logits, mask, targets=targets, reduction="mean")
    total = PENALTIES[kind](X, logits, mask, targets=targets, reduction="sum")
    torch.testing.assert_close(total, mask.sum() * mean, rtol=1e-13, atol=0)


def test_samples_average_draws():
    model = CausalMix()
    mask = label_mask(LABELS)
    X, logits, _ = forward(model)
    m = 5
    together = token_fisher(X, logits, mask, samples=m, generator=torch.Generator().manual_seed(9))
    targets = sample_targets(logits, mask, samples=m, generator=torch.Generator().manual_seed(9))
    assert targets.shape == (int(mask.sum()), m)
    single = [token_fisher(X, logits, mask, targets=targets[:, s : s + 1]) for s in range(m)]
    torch.testing.assert_close(together, torch.stack(single).mean(), rtol=1e-13, atol=0)
    assert torch.stack(single).std() > 0  # the draws differ


@pytest.mark.parametrize("kind", ["token", "logit"])
def test_no_scored_position_gives_exact_zero(kind):
    model = CausalMix()
    mask = torch.zeros(INPUT_IDS.shape, dtype=torch.bool)
    X, logits, _ = forward(model)
    for reduction in ("mean", "sum"):
        R = PENALTIES[kind](
            X, logits, mask, reduction=reduction, generator=torch.Generator().manual_seed(0)
        )
        assert R.item() == 0.0
        assert not torch.isnan(R)
    R.backward()  # reaches the embedding table through X
    assert model.embed.grad is not None
    for p in model.parameters():
        assert p.grad is None or (p.grad == 0).all()


def _padded(tensor, left, right, value):
    return torch.nn.functional.pad(tensor, (left, right), value=value)


@pytest.mark.parametrize("kind", ["token", "logit"])
def test_padding_never_changes_penalty(kind):
    """Left and right padding (mask 0, label -100) leave R and its gradient unchanged."""
    model = CausalMix()
    mask = label_mask(LABELS)
    params = params_of(model)
    X, logits, _ = forward(model)
    targets = sample_targets(logits, mask, samples=2, generator=torch.Generator().manual_seed(10))
    R = PENALTIES[kind](X, logits, mask, targets=targets)
    grads = torch.autograd.grad(R, params)

    ids = _padded(INPUT_IDS, 2, 3, 4)
    attention = _padded(ATTENTION, 2, 3, 0)
    labels = _padded(LABELS, 2, 3, -100)
    padded_mask = label_mask(labels)
    assert padded_mask.sum() == mask.sum()
    Xp, logits_p, _ = forward(model, ids, attention)
    Rp = PENALTIES[kind](Xp, logits_p, padded_mask, targets=targets)
    grads_p = torch.autograd.grad(Rp, params)
    torch.testing.assert_close(Rp, R, rtol=1e-13, atol=0)
    for g, gp in zip(grads, grads_p, strict=True):
        torch.testing.assert_close(gp, g, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# precision, generators, errors


def test_sampling_from_bfloat16_logits():
    vocab = 50_000
    logits = torch.randn(2, 7, vocab, generator=torch.Generator().manual_seed(0)).bfloat16()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    for sampling in ("model", "uniform"):
        targets = sample_targets(
            logits, mask, samples=3, sampling=sampling, generator=torch.Generator().manual_seed(1)
        )
        assert targets.dtype == torch.long and targets.shape == (11, 3)
        assert ((targets >= 0) & (targets < vocab)).all()


def test_bfloat16_model_close_to_float64():
    model = CausalMix()
    mask = label_mask(LABELS)
    X, logits, _ = forward(model)
    targets = sample_targets(logits, mask, samples=4, generator=torch.Generator().manual_seed(2))
    exact = token_fisher(X, logits, mask, targets=targets)
    low = CausalMix().to(torch.bfloat16)
    for penalty in PENALTIES.values():
        Xb, logits_b, _ = forward(low)
        assert logits_b.dtype == torch.bfloat16
        R = penalty(Xb, logits_b, mask, targets=targets)
        assert R.dtype == torch.float32
        error = abs(R.item() - exact.item()) / exact.item()
        print(f"\nbfloat16 model vs float64: relative error of R {error:.1e}")
        assert error < 0.05
        R.backward()
        assert torch.isfinite(low.W.grad).all()
        low.zero_grad()


def test_generator_makes_draws_reproducible():
    model = CausalMix()
    mask = label_mask(LABELS)
    X, logits, _ = forward(model)
    for sampling in ("model", "uniform"):
        a = sample_targets(
            logits, mask, samples=8, sampling=sampling, generator=torch.Generator().manual_seed(21)
        )
        b = sample_targets(
            logits, mask, samples=8, sampling=sampling, generator=torch.Generator().manual_seed(21)
        )
        c = sample_targets(
            logits, mask, samples=8, sampling=sampling, generator=torch.Generator().manual_seed(22)
        )
        assert torch.equal(a, b) and not torch.equal(a, c)
        Ra = token_fisher(
            X,
            logits,
            mask,
            samples=8,
            sampling=sampling,
            generator=torch.Generator().manual_seed(21),
        )
        Rb = token_fisher(
            X,
            logits,
            mask,
            samples=8,
            sampling=sampling,
            generator=torch.Generator().manual_seed(21),
        )
        assert Ra.item() == Rb.item()


def test_logit_objective_uses_given_reference_probs():
    """fisher_objective('logit') = sum_t (z_t[y] - <z_t, p_ref_t>), p_ref frozen or given."""
    model = CausalMix()
    mask = label_mask(LABELS)
    _, logits, _ = forward(model)
    targets = torch.randint(6, (int(mask.sum()), 2), generator=torch.Generator().manual_seed(3))
    ref = torch.softmax(torch.randn(int(mask.sum()), 6, dtype=torch.float64), -1)
    scored = logits[mask].detach()
    expected = scored.gather(1, targets).sum(0) - (scored * ref).sum()
    got = fisher_objective("logit", logits, mask, targets, reference_probs=ref)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-13, atol=1e-13)
    token = fisher_objective("token", logits, mask, targets)
    expected = torch.log_softmax(scored, -1).gather(1, targets).sum(0)
    torch.testing.assert_close(token.detach(), expected, rtol=1e-13, atol=1e-13)


def test_bad_arguments_raise():
    model = CausalMix()
    mask = label_mask(LABELS)
    X, logits, _ = forward(model)
    with pytest.raises(ValueError, match="samples"):
        sample_targets(logits, mask, samples=0)
    with pytest.raises(ValueError, match="sampling"):
        sample_targets(logits, mask, sampling="fisher")
    with pytest.raises(ValueError, match="reduction"):
        token_fisher(X, logits, mask, reduction="max")
    with pytest.raises(ValueError, match="require grad"):
        token_fisher(X.detach(), logits, mask)
    with pytest.raises(ValueError, match="bool"):
        token_fisher(X, logits, mask.long())
    with pytest.raises(ValueError, match="agree"):
        token_fisher(X, logits, mask[:, :-1])
    with pytest.raises(ValueError, match="kind"):
        fisher_objective("hessian", logits, mask, torch.zeros(6, 1, dtype=torch.long))
