"""The penalty-gradient engine on float64 micro models, without transformers.

References: exact double backward (``autograd.grad(create_graph=True)`` through ``tests/micro.py``'s
models, written here independently of the engine) and dense Jacobians (``micro.reference_penalty``).
The engine only sees two callbacks, as the trainer gives them: a forward at shifted embeddings
and a backward of a partial loss.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fishertune.penalties as penalties
import fishertune.penalty_grad as penalty_grad
from fishertune.penalty_estimators import exact_penalty
from fishertune.penalty_grad import FDSettings, Passes, fd_penalty_loss, penalty_rows
from micro import CausalMix, label_mask, reference_penalty

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default

# Four rows of length 5 (prompts of different lengths, one right-padded row): N = 12.
INPUT_IDS = torch.tensor([[0, 3, 1, 4, 2], [5, 2, 2, 0, 1], [1, 1, 4, 3, 0], [2, 5, 0, 1, 3]])
ATTENTION = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
LABELS = torch.tensor(
    [[-100, -100, 1, 4, 2], [-100, 2, 2, 0, -100], [-100, 1, 4, 3, 0], [-100, -100, -100, 1, 3]]
)
SAMPLES = 2


def _model() -> CausalMix:
    return CausalMix(vocab=6, dim=3, hidden=4, seed=3)


def _targets(rows=slice(None)) -> torch.Tensor:
    """(N_rows, m) fixed draws: the full batch's, restricted to ``rows`` (in mask order)."""
    full = torch.randint(6, (4, 5, SAMPLES), generator=torch.Generator().manual_seed(7))
    return full[rows][label_mask(LABELS[rows])]


def _passes(model, rows=slice(None), split=False, log=None) -> Passes:
    ids, attention = INPUT_IDS[rows], ATTENTION[rows]

    def forward(shift):
        X = model.embeddings(ids)
        if shift is not None:
            X = X + shift
        if log is not None:
            log.append(("forward", shift is not None))
        return model.logits(X, attention), X

    def backward(part):
        if log is not None:
            log.append(("backward", None))
        part.backward()

    return Passes(forward, backward if split else None, params=list(model.parameters()))


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _exact_gradient(kind: str, rows=slice(None), weight: float = 1.0) -> torch.Tensor:
    """grad_theta of ``CE + weight * S`` by double backward, written from scratch here."""
    model = _model()
    ids, attention, labels = INPUT_IDS[rows], ATTENTION[rows], LABELS[rows]
    mask = label_mask(labels)
    X = model.embeddings(ids)
    logits = model.logits(X, attention)
    log_probs = torch.log_softmax(logits[mask], -1)  # (N, V)
    ce = -log_probs.gather(1, labels[:, 1:][mask[:, :-1]][:, None]).sum()
    targets = _targets(rows)
    squared = 0.0
    for s in range(SAMPLES):
        picked = logits[mask].gather(1, targets[:, s : s + 1])[:, 0]
        if kind == "token":
            g = (picked - torch.logsumexp(logits[mask], -1)).sum()
        else:
            p = torch.softmax(logits[mask], -1).detach()
            g = (picked - (logits[mask] * p).sum(-1)).sum()
        (v,) = torch.autograd.grad(g, X, create_graph=True)
        squared = squared + v.pow(2).sum()
    (ce + weight * squared / SAMPLES).backward()
    return _grads(model)


def _fd_gradient(kind, scheme, step, *, split=False, fused=False, rows=slice(None), weight=1.0):
    model = _model()
    result = fd_penalty_loss(
        kind,
        _passes(model, rows, split),
        LABELS[rows],
        lambda logits, mask: _targets(rows),
        weight=weight,
        normalizer=torch.tensor(1.0, dtype=torch.float64),
        settings=FDSettings(scheme=scheme, relative_step=step, fused=fused),
    )
    result.loss.backward()
    return _grads(model), result


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["token", "logit"])
@pytest.mark.parametrize("scheme, order", [("forward", 1.0), ("central", 2.0)])
@pytest.mark.parametrize("split, fused", [(False, False), (True, False), (True, True)])
def test_fd_gradient_converges_at_the_order_of_its_scheme(kind, scheme, order, split, fused):
    """log(error) against log(h) over a decade and a half of steps has slope 1 (forward) or 2
    (central); the error is relative to the penalty's own gradient."""
    model = _model()
    exact = _exact_gradient(kind, weight=1.0)
    ce_only = _exact_gradient(kind, weight=0.0)
    steps = [3e-2, 1e-2, 3e-3, 1e-3] if scheme == "forward" else [1e-1, 3e-2, 1e-2, 3e-3]
    errors = [
        _relative(_fd_gradient(kind, scheme, h, split=split, fused=fused)[0], exact)
        * float(exact.norm() / (exact - ce_only).norm())
        for h in steps
    ]
    del model
    slope = torch.linalg.lstsq(
        torch.tensor([[math.log(h), 1.0] for h in steps], dtype=torch.float64),
        torch.tensor([math.log(e) for e in errors], dtype=torch.float64)[:, None],
    ).solution[0, 0]
    assert abs(float(slope) - order) < 0.15, (errors, float(slope))
    assert errors[-1] < (1e-2 if scheme == "forward" else 1e-4), errors


@pytest.mark.parametrize("kind", ["token", "logit"])
def test_value_is_the_penalty_and_split_equals_joint(kind):
    """The returned value is (CE + S) / N with S from dense Jacobians whatever the surrogate's
    own value; split (one backward per pass) and joint (one backward) give one gradient."""
    joint, result = _fd_gradient(kind, "central", 1e-3)
    log = []
    model = _model()
    split_result = fd_penalty_loss(
        kind,
        _passes(model, split=True, log=log),
        LABELS,
        lambda logits, mask: _targets(),
        weight=1.0,
        normalizer=torch.tensor(1.0, dtype=torch.float64),
        settings=FDSettings(scheme="central", relative_step=1e-3),
    )
    split_result.loss.backward()
    # the order of additions differs; rounding is amplified by 1/h = 1e3 of the X-scale
    torch.testing.assert_close(_grads(model), joint, rtol=1e-9, atol=1e-12)
    # 1 + 2m forwards, each backpropagated before the next one runs but the last
    assert log == [("forward", False), ("backward", None)] + [
        ("forward", True),
        ("backward", None),
    ] * (2 * SAMPLES - 1) + [("forward", True)]
    model = _model()
    mask = label_mask(LABELS)
    X = model.embeddings(INPUT_IDS)
    logits = model.logits(X, ATTENTION)
    penalty = reference_penalty(
        lambda inp: model.logits(inp, ATTENTION), X, mask, _targets(), reduction="sum"
    )
    ce = -torch.log_softmax(logits[mask], -1).gather(1, LABELS[:, 1:][mask[:, :-1]][:, None]).sum()
    torch.testing.assert_close(result.squared, penalty, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.value, (ce + penalty).detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(result.loss.detach(), result.value, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["token", "logit"])
def test_surrogate_value_tends_to_twice_the_squared_norm(kind):
    """``(2/h)(g(X + h v) - g(X)) -> 2 ||v||^2`` at rate h: the surrogate differentiates the
    penalty, and logit-F's ``p`` is the unperturbed one at the shifted point (a ``p`` recomputed
    there adds a term of order 1 to the limit)."""
    from fishertune.penalties import fd_surrogate, fisher_objective

    model = _model()
    mask = label_mask(LABELS)
    X = model.embeddings(INPUT_IDS).detach().requires_grad_(True)
    logits = model.logits(X, ATTENTION)
    targets = _targets()[:, :1]
    g = fisher_objective(kind, logits, mask, targets)
    (v,) = torch.autograd.grad(g[0], X)
    reference = torch.softmax(logits[mask].detach(), -1) if kind == "logit" else None
    gaps = []
    for h in (1e-2, 1e-3, 1e-4):
        shifted = model.logits(X.detach() + h * v, ATTENTION)
        g_h = fisher_objective(kind, shifted, mask, targets, reference)
        value = fd_surrogate(g_h, g.detach(), h)
        gaps.append(abs(float(value.detach()) - 2 * float(v.pow(2).sum())))
    assert gaps[2] < gaps[1] / 5 < gaps[0] / 25
    assert gaps[2] < 1e-3 * float(v.pow(2).sum())


def test_logit_f_holds_the_reference_probabilities_fixed():
    """The fd gradient of logit-F converges to the exact one with ``p`` detached, which differs
    from token-F's by far more than the fd error: the shifted passes keep the unperturbed p."""
    logit = _exact_gradient("logit")
    token = _exact_gradient("token")
    fd = _fd_gradient("logit", "central", 1e-3)[0]
    assert _relative(fd, logit) < 1e-5
    assert _relative(token, logit) > 100 * _relative(fd, logit)


def test_exact_penalty_matches_double_backward():
    model = _model()
    mask = label_mask(LABELS)
    X = model.embeddings(INPUT_IDS)
    logits = model.logits(X, ATTENTION)
    squared = exact_penalty("token", X, logits, mask, _targets())
    ce = -torch.log_softmax(logits[mask], -1).gather(1, LABELS[:, 1:][mask[:, :-1]][:, None]).sum()
    (ce + squared).backward()
    torch.testing.assert_close(_grads(model), _exact_gradient("token"), rtol=1e-12, atol=1e-14)
    empty = exact_penalty("token", X, logits, torch.zeros_like(mask), _targets()[:0])
    assert float(empty) == 0.0


@pytest.mark.parametrize("mode", ["exact", "fd"])
def test_a_row_fraction_is_unbiased_over_all_subsets(mode):
    """Mean over every subset of k = 2 of B = 4 rows of (B/k) x the subset's penalty gradient
    equals the whole batch's (same draws per row): each row is in half of the subsets."""
    batch, count = 4, 2
    subsets = list(itertools.combinations(range(batch), count))
    full = _exact_gradient("token", weight=1.0) - _exact_gradient("token", weight=0.0)
    total = torch.zeros_like(full)
    for subset in subsets:
        rows = torch.tensor(subset)
        rescale = batch / count
        if mode == "exact":
            part = _exact_gradient("token", rows, rescale) - _exact_gradient("token", rows, 0.0)
        else:
            grad, _ = _fd_gradient("token", "central", 1e-4, rows=rows, weight=rescale)
            part = grad - _exact_gradient("token", rows, 0.0)
        total += part / len(subsets)
    tolerance = 1e-12 if mode == "exact" else 1e-6
    torch.testing.assert_close(
        total, full, rtol=tolerance, atol=tolerance * float(full.abs().max())
    )


def test_penalty_rows_draws_every_subset_equally_often():
    """``ceil(f B)`` sorted distinct rows, each subset with probability 1 / C(B, k)."""
    counts: dict[tuple[int, ...], int] = {}
    trials = 3000
    for seed in range(trials):
        generator = torch.Generator().manual_seed(seed)
        rows = penalty_rows(4, 0.4, generator, torch.device("cpu"))
        key = tuple(rows.tolist())
        assert len(key) == 2 and list(key) == sorted(set(key))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6
    expected = trials / 6
    sd = math.sqrt(trials * (1 / 6) * (5 / 6))
    assert all(abs(n - expected) < 4 * sd for n in counts.values()), counts
    assert penalty_rows(4, 1.0, generator, torch.device("cpu")).tolist() == [0, 1, 2, 3]


def test_the_engine_imports_no_training_framework():
    import subprocess
    import sys

    code = (
        "import sys, fishertune.penalty_grad, fishertune.streams; "
        "bad = [m for m in ('transformers', 'trl', 'accelerate', 'peft') if m in sys.modules]; "
        "print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert penalty_grad.__all__


@pytest.mark.parametrize("kind", ["token", "logit"])
@pytest.mark.parametrize("scheme, bound", [("forward", 1e-6), ("central", 1e-8)])
def test_float64_default_steps_reach_float64_accuracy(kind, scheme, bound):
    """The float64 defaults sit near the measured optimum of the error curve (forward 2e-7 and
    central 5e-10 against 1e-4 and 3e-6 at the former steps 1e-5 / 1e-4)."""
    exact = _exact_gradient(kind, weight=1.0)
    penalty = exact - _exact_gradient(kind, weight=0.0)
    model = _model()
    fd_penalty_loss(
        kind,
        _passes(model, split=True),
        LABELS,
        lambda logits, mask: _targets(),
        weight=1.0,
        normalizer=torch.tensor(1.0, dtype=torch.float64),
        settings=FDSettings(scheme=scheme, compute_dtype=torch.float64),
    ).loss.backward()
    assert float((_grads(model) - exact).norm() / penalty.norm()) < bound


def test_float64_throughout_tells_float64_models_from_float32_inside():
    """A float64 micro model passes; a float64 transformers Llama, whose RMSNorm computes in
    float32, does not; a float32 model is not float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _model()
    assert penalties.float64_throughout(_passes(model).forward)

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         attn_implementation="eager")  # fmt: skip
    llama = LlamaForCausalLM(config).double()
    ids = INPUT_IDS % 32

    def forward(shift):
        X = llama.get_input_embeddings()(ids)
        shifted = X if shift is None else X + shift
        return llama(inputs_embeds=shifted).logits, X

    assert not penalties.float64_throughout(forward)
    llama.float()
    assert not penalties.float64_throughout(forward)


@pytest.mark.parametrize("kind", ["token", "logit"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("split", [False, True])
def test_fd_penalty_part_does_not_grow_as_the_coefficient_shrinks(kind, scheme, split):
    """float64: the penalty's part of the fd gradient (fd's gradient minus the CE's) against
    ``weight x`` the exact penalty gradient, weight 1e-1 down to 1e-7, at the default steps: the
    error is fd's own at every weight. Taking the CE at the shifted point instead (fused) adds an
    offset that does not scale with the weight: relative to the penalty it grows as 1 / weight."""
    ce = _exact_gradient(kind, weight=0.0)
    penalty = _exact_gradient(kind, weight=1.0) - ce
    weights = (1e-1, 1e-3, 1e-5, 1e-7)

    def errors(fused: bool) -> list[float]:
        out = []
        for weight in weights:
            model = _model()
            fd_penalty_loss(
                kind,
                _passes(model, split=split or fused),
                LABELS,
                lambda logits, mask: _targets(),
                weight=weight,
                normalizer=torch.tensor(1.0, dtype=torch.float64),
                settings=FDSettings(scheme=scheme, compute_dtype=torch.float64, fused=fused),
            ).loss.backward()
            out.append(_relative(_grads(model) - ce, weight * penalty))
        return out

    default = errors(fused=False)
    assert max(default) < 2 * min(default) + 1e-9, default
    assert max(default) < (1e-6 if scheme == "forward" else 1e-8), default
    fused = errors(fused=True)
    assert fused[-1] > 1e3 * fused[0], fused
