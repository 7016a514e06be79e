"""The penalty through the fused output projection (:class:`fishertune.vocab.LinearLogits`).

In float64 on a micro model with an enumerable vocabulary: the linear path's CE, ``g``, rows'
log-likelihood and metrics against the dense (N, V) computation written here, and the whole fd
penalty (token-F, logit-F, forward and central, joint / split / fused, the unbiased estimator,
the Hessian trace) against the same engine fed the model's dense logits. A dispatch-mode record
of every tensor the ops allocate shows that no (N, V) tensor exists on the linear path beyond one
chunk. Chunks of three rows (``CHUNK_BYTES`` patched down) exercise the chunk loop.
"""

from __future__ import annotations

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
def test_linear_terms_match_the_dense_computation(kind, given_reference):
    model = Head()
    ids, attention, labels = _batch()
    mask = label_mask(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    n = int(mask.sum())
    draws = _draws(n)
    X = model.trunk.embeddings(ids)
    logits = model.logits(X, attention, linear=True)
    reference = vocab.frozen_reference(logits, mask) if given_reference else None
    terms = vocab.scored_terms(
        logits, mask, targets, draws, kind=kind, reference=reference,
        statistics=True, row_log_likelihood=True,
    )  # fmt: skip
    weights = torch.randn(3 + B * 2, generator=torch.Generator().manual_seed(2), dtype=X.dtype)
    outputs = torch.cat([terms.ce[None], terms.g, terms.row_log_likelihood.flatten()])
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
    torch.testing.assert_close(outputs.detach(), dense.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear_grads, _grads(model), rtol=1e-11, atol=1e-12)
    entropy = -(log_p.exp() * log_p).sum()
    correct = (z.argmax(-1) == targets).sum()
    expected = torch.tensor([n, float(entropy), float(correct), float(ce)], dtype=torch.float64)
    torch.testing.assert_close(terms.statistics, expected, rtol=1e-12, atol=1e-12)


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
