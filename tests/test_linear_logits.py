"""The penalty through the fused output projection (:class:`fishertune.vocab.LinearLogits`).

In float64 on a micro model with an enumerable vocabulary: the linear path's CE, ``g``, rows'
log-likelihood and metrics against the dense (N, V) computation written here, and the whole fd
penalty (token-F, logit-F, forward and central, joint / split / fused, the unbiased estimator,
the Hessian trace) against the same engine fed the model's dense logits. A dispatch-mode record
of every tensor the ops allocate shows that no (N, V) tensor exists on the linear path beyond one
chunk. Chunks of three rows (``CHUNK_BYTES`` patched down) exercise the chunk loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from fishertune import vocab, vocab_chunks
from fishertune.hessian_grad import hessian_fd_loss
from fishertune.penalties import sample_targets
from fishertune.penalty_grad import FDSettings, Passes, fd_penalty_loss
from micro import CausalMix, label_mask

B, L, V, D, K = 4, 7, 37, 3, 4
ROWS_PER_CHUNK = 3


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(vocab_chunks, "CHUNK_BYTES", ROWS_PER_CHUNK * 4 * V)


class Head(nn.Module):
    """CausalMix's trunk with a biased output projection ``z = W h + c``."""

    def __init__(self, seed: int = 3) -> None:
        super().__init__()
        self.trunk = CausalMix(vocab=V, dim=D, hidden=K, seed=seed)
        self.c = nn.Parameter(0.5 * torch.randn(V, generator=torch.Generator().manual_seed(seed)))
        self.c.data = self.c.data.double()

    def hidden(self, X: Tensor, attention: Tensor) -> Tensor:
        mixed = torch.einsum("bts,bsd->btd", self.trunk.mixing(attention), X)
        return torch.tanh(mixed @ self.trunk.U + self.trunk.b)

    def logits(self, X: Tensor, attention: Tensor, linear: bool):
        hidden = self.hidden(X, attention)
        if linear:
            return vocab.linear_logits(hidden, self.trunk.W, self.c)
        return hidden @ self.trunk.W.T + self.c


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(V, (B, L), generator=generator)
    attention = torch.ones(B, L, dtype=torch.long)
    attention[1, -2:] = 0
    labels = ids.clone()
    labels[:, :2] = -100
    labels[1, -2:] = -100
    return ids, attention, labels


def _draws(n: int, samples: int = 2, seed: int = 5) -> Tensor:
    return torch.randint(V, (n, samples), generator=torch.Generator().manual_seed(seed))


def _grads(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["token", "logit"])
@pytest.mark.parametrize("given_reference", [False, True])
@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("sampled_first", [False, True])
def test_linear_terms_match_the_dense_computation(kind, given_reference, with_rows, sampled_first):
    """Both linear kernels (gradients formed in the forward's one pass, and, for the rows'
    log-likelihood, the chunks projected again in the backward), after the sampler's pass on the
    same logits or not, against the dense (N, V) computation."""
    model = Head()
    ids, attention, labels = _batch()
    mask = label_mask(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    n = int(mask.sum())
    draws = _draws(n)
    X = model.trunk.embeddings(ids)
    logits = model.logits(X, attention, linear=True)
    if sampled_first:  # the sampler's pass, left on the logits for the terms
        sample_targets(logits, mask, samples=2, generator=torch.Generator().manual_seed(1))
    reference = vocab.frozen_reference(logits, mask) if given_reference else None
    terms = vocab.scored_terms(
        logits, mask, targets, draws, kind=kind, reference=reference,
        statistics=True, row_log_likelihood=with_rows,
    )  # fmt: skip
    weights = torch.randn(3 + B * 2, generator=torch.Generator().manual_seed(2), dtype=X.dtype)
    if not with_rows:
        weights[3:] = 0.0
    rows_ll = terms.row_log_likelihood if with_rows else torch.zeros(B, 2, dtype=X.dtype)
    outputs = torch.cat([terms.ce[None], terms.g, rows_ll.flatten()])
    (outputs * weights).sum().backward()
    linear_grads = _grads(model)
    model.zero_grad()

    # dense, from the (N, V) logits
    z = model.logits(model.trunk.embeddings(ids), attention, linear=False)[mask]  # (N, V)
    log_p = torch.log_softmax(z, -1)
    ce = -log_p.gather(1, targets[:, None]).sum()
    q = torch.softmax(z, -1).detach()
    picked = z.gather(1, draws)
    g = (picked - (torch.logsumexp(z, -1) if kind == "token" else (z * q).sum(-1))[:, None]).sum(0)
    owner = mask.nonzero()[:, 0]
    rows = torch.zeros(B, 2, dtype=z.dtype).index_add(0, owner, log_p.gather(1, draws))
    dense = torch.cat([ce[None], g, rows.flatten()])
    (dense * weights).sum().backward()
    if not with_rows:
        dense = torch.cat([dense[:3], torch.zeros(B * 2, dtype=X.dtype)])
    torch.testing.assert_close(outputs.detach(), dense.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear_grads, _grads(model), rtol=1e-11, atol=1e-12)
    entropy = -(log_p.exp() * log_p).sum()
    correct = (z.argmax(-1) == targets).sum()
    expected = torch.tensor([n, float(entropy), float(correct), float(ce)], dtype=torch.float64)
    torch.testing.assert_close(terms.statistics, expected, rtol=1e-12, atol=1e-12)


class _WeightSized(TorchDispatchMode):
    """Counts the weight-sized float tensors (``shape``, (V, K) by default) that ops make, each
    storage once (not views of ``exclude``d storage such as the parameters', not stride-0
    expansions of a scalar): the weight-sized buffers of a pass or a step."""

    def __init__(self, exclude: list[Tensor], shape: tuple[int, int] = (V, K)) -> None:
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.shape, self.storages = torch.Size(shape), set()

    @property
    def made(self) -> int:
        return len(self.storages)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if (
                isinstance(t, Tensor)
                and t.shape == self.shape
                and t.untyped_storage().nbytes() >= self.shape.numel() * t.element_size()
                and t.untyped_storage().data_ptr() not in self.exclude
            ):
                self.storages.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize(
    "kind, with_ce", [("token", False), ("token", True), ("logit", False), ("logit", True)]
)
@pytest.mark.parametrize("scale", [1.0, 2.5, math.nan])
def test_a_weight_sink_takes_the_dense_part_in_the_forward(kind, with_ce, scale):
    """A shifted pass of split fd: the weight's gradient exists already (the backward at X),
    and the pass adds its dense part to it in the forward with the coefficients it is told the
    backward will bring (``WeightSink``). Every gradient is the dense computation's plus the
    earlier gradient, whether the prediction holds or the backward's coefficients are ``scale``
    times the predicted ones (one more pass adds the difference), and no weight-sized tensor is
    made either way."""
    ids, attention, labels = _batch()
    mask = label_mask(labels)
    targets = labels[:, 1:][mask[:, :-1]] if with_ce else None
    draws = _draws(int(mask.sum()), samples=1)
    a_ce, a_g = (0.3 if with_ce else 0.0), -1.7
    shift = 0.05 * torch.randn(B, L, D, generator=torch.Generator().manual_seed(6))
    results = []
    for linear in (True, False):
        model = Head()
        params = list(model.parameters())
        for p in params:  # the gradient the earlier backward left
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=p.dtype)
        X = model.trunk.embeddings(ids)
        reference_logits = model.logits(X.detach(), attention, linear)
        shifted = model.logits(X + shift, attention, linear)
        if linear:
            reference = vocab.frozen_reference(reference_logits, mask) if kind == "logit" else None
            sink, earlier = vocab.WeightSink(model.trunk.W, a_ce, a_g), model.trunk.W.grad
            with _WeightSized([*params, earlier]) as record:
                terms = vocab.scored_terms(
                    shifted, mask, targets, draws, kind=kind, reference=reference, weight_sink=sink
                )
                ce = terms.ce if with_ce else 0.0
                (scale * (a_ce * ce + a_g * terms.g.sum())).backward()
            assert record.made == 0
            assert model.trunk.W.grad is earlier
            if math.isnan(scale):  # a non-finite backward is not hidden by the predicted part
                assert torch.isnan(earlier).all()
                return
        else:
            z = shifted[mask]
            log_p = torch.log_softmax(z, -1)
            ce = -log_p.gather(1, targets[:, None]).sum() if with_ce else 0.0
            q = torch.softmax(reference_logits[mask], -1).detach()
            own = torch.logsumexp(z, -1) if kind == "token" else (z * q).sum(-1)
            g = (z.gather(1, draws)[:, 0] - own).sum()
            (scale * (a_ce * ce + a_g * g)).backward()
        results.append(_grads(model))
    # measured: 1e-16 (float64 in another order)
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-13)


def test_the_reference_is_the_q_of_the_pass_at_its_logits_bit_for_bit():
    """logit-F's g(X) with q = softmax(z) computed in the pass, and with the frozen reference
    projected again chunk by chunk: the same bits (fd divides their difference by h)."""
    model = Head()
    ids, attention, labels = _batch()
    mask = label_mask(labels)
    hidden = model.hidden(model.trunk.embeddings(ids), attention).detach().float()
    logits = vocab.LinearLogits(hidden, model.trunk.W.detach().float(), None, torch.float32)
    draws = _draws(int(mask.sum()))
    own = vocab.scored_terms(logits, mask, draws=draws, kind="logit").g
    frozen = vocab.scored_terms(
        logits, mask, draws=draws, kind="logit", reference=vocab.frozen_reference(logits, mask)
    ).g
    assert torch.equal(own, frozen)


def test_linear_draws_are_the_dense_draws():
    model = Head()
    ids, attention, labels = _batch()
    mask = label_mask(labels)
    X = model.trunk.embeddings(ids)
    draws = [
        sample_targets(
            model.logits(X, attention, linear), mask, samples=3,
            generator=torch.Generator().manual_seed(11),
        )
        for linear in (False, True)
    ]  # fmt: skip
    assert torch.equal(draws[0], draws[1])


def _passes(model: Head, ids, attention, linear: bool, split: bool) -> Passes:
    def forward(shift):
        X = model.trunk.embeddings(ids)
        if shift is not None:
            X = X + shift
        return model.logits(X, attention, linear), X

    return Passes(
        forward,
        (lambda part: part.backward()) if split else None,
        params=list(model.parameters()),
    )


def _fd_run(kind, scheme, linear, split, fused, estimator="paper"):
    model = Head()
    ids, attention, labels = _batch()
    n = int(label_mask(labels).sum())
    result = fd_penalty_loss(
        kind,
        _passes(model, ids, attention, linear, split),
        labels,
        lambda logits, mask: _draws(n),
        weight=0.7,
        normalizer=torch.tensor(3.0, dtype=torch.float64),
        settings=FDSettings(scheme=scheme, relative_step=1e-4, fused=fused),
        estimator=estimator,
    )
    result.loss.backward()
    return _grads(model), result


@pytest.mark.parametrize("kind", ["token", "logit"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize(
    "split, fused, estimator",
    [(False, False, "paper"), (True, False, "paper"), (True, True, "paper"),
     (True, False, "unbiased"), (True, True, "unbiased")],
)  # fmt: skip
def test_fd_penalty_through_the_projection_equals_the_dense_path(
    kind, scheme, split, fused, estimator
):
    dense_grads, dense = _fd_run(kind, scheme, False, split, fused, estimator)
    linear_grads, linear = _fd_run(kind, scheme, True, split, fused, estimator)
    # measured: 1e-15 relative (the same float64 arithmetic in another order); the fd quotient
    # divides rounding by h = 1e-4 ||X|| / ||v||
    assert _relative(linear_grads, dense_grads) < 1e-9
    torch.testing.assert_close(linear.value, dense.value, rtol=1e-12, atol=0)
    torch.testing.assert_close(linear.squared, dense.squared, rtol=1e-12, atol=0)


def test_hessian_trace_through_the_projection_equals_the_dense_path():
    results = []
    for linear in (False, True):
        model = Head()
        ids, attention, labels = _batch()
        probes = torch.randint(2, (2, B, L, D), generator=torch.Generator().manual_seed(4))
        result = hessian_fd_loss(
            _passes(model, ids, attention, linear, split=True),
            labels,
            lambda X, probes=probes: (2.0 * probes - 1.0).to(X.dtype),
            weight=0.5,
            normalizer=torch.tensor(2.0, dtype=torch.float64),
        )
        result.loss.backward()
        results.append((_grads(model), result.squared))
    # measured 2e-9: the second difference divides rounding by h^2 (h_rel = 1e-3)
    assert _relative(results[1][0], results[0][0]) < 1e-7
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-7, atol=0)


@pytest.mark.parametrize("kind", ["token", "logit"])
def test_a_frozen_projection_gets_no_gradient_and_the_rest_is_exact(kind):
    """A frozen output projection (an adapter elsewhere, lm_head not trained): the pass keeps no
    weight-sized reductions, the hidden states' gradient is still the dense one."""
    results = []
    for linear in (True, False):
        model = Head()
        model.trunk.W.requires_grad_(False)
        ids, attention, labels = _batch()
        mask = label_mask(labels)
        targets = labels[:, 1:][mask[:, :-1]]
        draws = _draws(int(mask.sum()))
        X = model.trunk.embeddings(ids)
        logits = model.logits(X, attention, linear)
        if linear:
            terms = vocab.scored_terms(logits, mask, targets, draws, kind=kind)
            assert logits.summary.p_outer is None
            ce, g = terms.ce, terms.g
        else:
            z = logits[mask]
            ce = -torch.log_softmax(z, -1).gather(1, targets[:, None]).sum()
            other = (
                torch.logsumexp(z, -1) if kind == "token" else (z * z.softmax(-1).detach()).sum(-1)
            )
            g = (z.gather(1, draws) - other[:, None]).sum(0)
        (ce + 0.3 * g[0] - 1.7 * g[1]).backward()
        assert model.trunk.W.grad is None
        results.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    torch.testing.assert_close(results[0], results[1], rtol=1e-11, atol=1e-12)


def test_a_trained_head_on_a_frozen_trunk_gets_its_whole_gradient():
    """Hidden states without a graph (a frozen trunk) and a trained head: the weight's and the
    bias's gradients are the dense ones (the pass keeps their reductions)."""
    model = Head()
    ids, attention, labels = _batch()
    mask = label_mask(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    draws = _draws(int(mask.sum()))
    hidden = model.hidden(model.trunk.embeddings(ids), attention).detach()
    head = [model.trunk.W, model.c]
    grads = []
    for linear in (True, False):
        if linear:
            logits = vocab.LinearLogits(hidden, model.trunk.W, model.c, hidden.dtype)
            terms = vocab.scored_terms(logits, mask, targets, draws)
            ce, g = terms.ce, terms.g
        else:
            z = (hidden @ model.trunk.W.T + model.c)[mask]
            log_p = torch.log_softmax(z, -1)
            ce, g = -log_p.gather(1, targets[:, None]).sum(), log_p.gather(1, draws).sum(0)
        grads.append(torch.autograd.grad(ce + 0.4 * g[0] - 0.9 * g[1], head))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_without_a_graph_the_pass_keeps_no_gradient_reductions():
    """Under ``torch.no_grad`` (evaluation) the pass keeps no weight-sized reductions (one
    vocabulary-wide matmul fewer) and gives the same CE and metrics."""
    model = Head()
    ids, attention, labels = _batch()
    mask = label_mask(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    values = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            logits = model.logits(model.trunk.embeddings(ids), attention, linear=True)
            terms = vocab.scored_terms(logits, mask, targets, statistics=True)
        values.append(torch.cat([terms.ce.detach()[None], terms.statistics]))
        assert (logits.summary.p_sum is None) != grad  # the bias's reduction: with a graph only
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    # the sampler's pass run without a graph, the terms with one: the sums are made again
    logits = model.logits(model.trunk.embeddings(ids), attention, linear=True)
    with torch.no_grad():
        draws = sample_targets(logits, mask, generator=torch.Generator().manual_seed(1))
    terms = vocab.scored_terms(logits, mask, targets, draws)
    (terms.ce + terms.g.sum()).backward()
    linear = [model.trunk.W.grad.clone(), model.c.grad.clone()]
    model.zero_grad()
    z = model.logits(model.trunk.embeddings(ids), attention, linear=False)[mask]
    log_p = torch.log_softmax(z, -1)
    (-log_p.gather(1, targets[:, None]).sum() + log_p.gather(1, draws).sum()).backward()
    for got, want in zip(linear, [model.trunk.W.grad, model.c.grad], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_linear_terms_under_bf16_autocast_match_the_autocast_projection():
    """bf16 autocast: the projection in bf16, the softmax and the reductions in float32; CE,
    token-F's g and their gradients as the dense computation on the bf16 logits (bf16 rounding
    of the matmul's output and of p before its matmuls: measured 2e-3 relative)."""
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(40, 8, generator=generator, requires_grad=True)
    weight = (0.3 * torch.randn(V, 8, generator=generator)).requires_grad_()
    targets = torch.randint(V, (40,), generator=generator)
    draws = torch.randint(V, (40, 2), generator=generator)
    mask = torch.ones(1, 40, dtype=torch.bool)
    grads = []
    for linear in (True, False):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if linear:
                logits = vocab.linear_logits(hidden[None], weight)
                terms = vocab.scored_terms(logits, mask, targets, draws)
                ce, g = terms.ce, terms.g
            else:
                z = (hidden @ weight.T).float()
                log_p = torch.log_softmax(z, -1)
                ce = -log_p.gather(1, targets[:, None]).sum()
                g = log_p.gather(1, draws).sum(0)
        value = ce + 0.5 * g.sum()
        value.backward()
        grads.append((float(value), hidden.grad.clone(), weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-4)
    for got, want in zip(grads[0][1:], grads[1][1:], strict=True):
        assert _relative(got, want) < 1e-2


class _VocabMatmuls(TorchDispatchMode):
    """The matmuls with a vocabulary-sized operand, in units of one projection of the scored
    rows (N x d x V multiply-adds)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.work = n, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            a, b = args[-2], args[-1]
            if V in a.shape or V in b.shape:
                self.work += a.shape[0] * a.shape[1] * b.shape[1] / (self.n * K * V)
        return out


@pytest.mark.parametrize(
    "kind, scheme, projections",
    # per pass at X: the projection, p W and p^T H (the draws from the same pass); per shifted
    # pass: the same for token-F, q projected again and q^T H for logit-F (its r = q W is kept)
    [("token", "forward", 6), ("logit", "forward", 5), ("token", "central", 9),
     ("logit", "central", 7)],
)  # fmt: skip
def test_each_pass_projects_the_vocabulary_once(kind, scheme, projections):
    """The fd step on the linear path, counted in vocabulary-wide matmuls: no backward projects
    a chunk again and the CE and g at X read the sampler's pass (float32, the sampler's own
    dtype: a float64 model's draws take a float32 softmax of their own)."""
    model = Head().float()
    ids, attention, labels = _batch()
    n = int(label_mask(labels).sum())
    with _VocabMatmuls(n) as record:
        result = fd_penalty_loss(
            kind,
            _passes(model, ids, attention, linear=True, split=True),
            labels,
            lambda logits, mask: sample_targets(logits, mask, samples=1),
            weight=0.7,
            normalizer=torch.tensor(3.0),
            settings=FDSettings(scheme=scheme, relative_step=1e-2),
        )
        result.loss.backward()
    assert record.work == pytest.approx(projections)


class _Largest(TorchDispatchMode):
    """The largest floating tensor with a vocabulary-sized dimension that any op returns (what
    a step allocates, saved or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, Tensor) and tensor.is_floating_point() and V in tensor.shape:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("kind, scheme", [("token", "forward"), ("logit", "central")])
def test_no_vocabulary_sized_tensor_beyond_one_chunk(kind, scheme):
    """N = 22 scored rows, chunks of 3: on the linear path no op returns more than a chunk
    (3 x V) or the weight (V x K); the dense path's logits are (B L, V)."""
    largest = {}
    for linear in (False, True):
        with _Largest() as record:
            _fd_run(kind, scheme, linear, split=True, fused=False, estimator="unbiased")
        largest[linear] = record.largest
    _, _, labels = _batch()
    n = int(label_mask(labels).sum())
    assert n >= 5 * ROWS_PER_CHUNK
    assert largest[False] >= n * V  # the instrument sees the dense path's (N, V) tensors
    assert largest[True] <= max(ROWS_PER_CHUNK * V, V * K)


@pytest.mark.parametrize("method", ["token-f", "logit-f"])
def test_the_trainer_fd_step_through_the_projection_matches_exact(chat_file, tmp_path, method):
    """``ce_kernel=linear`` with ``penalty_grad=fd`` (central) on the tiny Llama: the penalty's
    part of the step gradient (``tests/penalty_isolation.py``'s convention: the step's minus
    the CE's) against exact double backward on the dense logits, within the tolerance the
    chunked fd step meets (``test_trainer.test_fd_gradient_matches_exact``); the same metrics."""
    from test_trainer import _gradients_on_one_batch, trainer_for

    common = {"method": method, "penalty_coef": 1.0, "penalty_warmup_steps": 0}
    exact = trainer_for(chat_file, tmp_path / "exact", penalty_grad="exact", **common)
    fd = [
        trainer_for(chat_file, tmp_path / kernel, ce_kernel=kernel, penalty_grad="fd",
                    penalty_fd_scheme="central", **common)
        for kernel in ("chunked", "linear")
    ]  # fmt: skip
    baseline = trainer_for(chat_file, tmp_path / "baseline", method="baseline")
    g_exact, g_chunked, g_linear, g_ce = _gradients_on_one_batch(exact, *fd, baseline)
    pen_exact = g_exact - g_ce
    errors = [
        float(((g - g_ce) - pen_exact).norm() / pen_exact.norm()) for g in (g_chunked, g_linear)
    ]
    # measured: both about 1e-4 to 1e-3 (float32 fd rounding, the draws moved by rounding)
    assert errors[1] < 2e-3, errors
    torch.testing.assert_close(fd[1]._sums.vector[:4], fd[0]._sums.vector[:4], rtol=1e-5, atol=1e-6)


def _weight_sized_made_in_a_step(chat_file, path, **overrides) -> int:
    """The weight-sized tensors one training step makes (forward and every backward, the
    second step, so the optimizer's state exists), through the Trainer on the tiny Llama
    (untied embedding and head, both (V, d))."""
    from test_trainer import trainer_for

    trainer = trainer_for(chat_file, path, max_steps=2, **overrides)
    shape = tuple(trainer.model.get_input_embeddings().weight.shape)
    step, records = trainer.training_step, []

    def traced(*args, **kwargs):
        if len(records) == 1:  # the second step
            with _WeightSized(list(trainer.model.parameters()), shape) as record:
                loss = step(*args, **kwargs)
            records.append(record.made)
            return loss
        records.append(None)
        return step(*args, **kwargs)

    trainer.training_step = traced
    trainer.train()
    return records[1]


def test_the_fd_step_makes_no_more_weight_sized_tensors_than_the_baseline(chat_file, tmp_path):
    """The baseline's step makes two (V, d) buffers: the head's gradient (formed in its pass's
    reduction) and the embedding table's. An fd step of the default kernel makes no more: its
    shifted pass adds its dense part straight into the head's gradient (``WeightSink``), and
    the table's gradient is made once, by the last backward (``EmbeddingCapture``'s hold). So
    its peak holds no more weight-sized tensors than the baseline's (before: three, the shifted
    pass's own reduction beside both gradients)."""
    penalty = {"penalty_coef": 0.05, "penalty_warmup_steps": 0, "penalty_grad": "fd"}
    made = {
        "baseline": _weight_sized_made_in_a_step(chat_file, tmp_path / "b", method="baseline"),
        "token-f": _weight_sized_made_in_a_step(
            chat_file, tmp_path / "t", method="token-f", **penalty
        ),
        "logit-f": _weight_sized_made_in_a_step(
            chat_file, tmp_path / "l", method="logit-f", penalty_fd_scheme="central", **penalty
        ),
    }
    assert made["baseline"] == 2, made  # the instrument sees both gradients
    assert made["token-f"] <= made["baseline"] and made["logit-f"] <= made["baseline"], made
