"""NEFTune noise hook, embedding lookup through wrappers, and the embedding capture hook.

Statistics on a real ``nn.Embedding`` (d = 256, L = 64, B = 4) with fixed seeds; bounds are
standard-error based. For ``eps = a u``: uniform ``u ~ U(-1, 1)`` has ``E u^2 = 1/3`` and
``Var u^2 = 1/5 - 1/9 = 4/45``; the Gaussian variant ``u ~ N(0, 1/3)`` has ``Var u^2 = 2/9`` and
``P(|u| > 1) = P(|Z| > sqrt(3))``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fishertune.modeling import tiny_llama
from fishertune.noise import (
    EmbeddingCapture,
    NEFTuneNoise,
    find_input_embeddings,
    neftune,
    segment_lengths,
)

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default

VOCAB, D, L, B = 1000, 256, 64, 4
ALPHA = 5.0
LENGTHS = [64, 40, 17, 5]  # real tokens per row; row 3 is left-padded, the others right-padded


def make_embedding() -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(VOCAB, D)


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(VOCAB, (B, L), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(B, L, dtype=torch.long)
    for row, length in enumerate(LENGTHS[:3]):
        mask[row, :length] = 1
    mask[3, L - LENGTHS[3] :] = 1
    return ids, mask


def draw(noise: NEFTuneNoise, emb: nn.Embedding, ids, **batch) -> torch.Tensor:
    """Noise the hook adds in training mode: output minus the clean lookup, (B, L, d)."""
    emb.train()
    with noise.attached(emb):
        noise.set_batch(**batch)
        out = emb(ids)
    return (out - emb.weight[ids]).detach()


def fraction_beyond_one_gaussian() -> float:
    return math.erfc(math.sqrt(3.0) / math.sqrt(2.0))  # P(|Z| > sqrt(3)) ~ 0.0833


def assert_unit_statistics(u: torch.Tensor, distribution: str) -> None:
    """u = eps / a over real entries: variance 1/3, and the distribution's shape."""
    n = u.numel()
    second = u.pow(2).mean().item()
    var_u2 = 4 / 45 if distribution == "uniform" else 2 / 9
    assert abs(second - 1 / 3) < 4 * math.sqrt(var_u2 / n), (second, n)
    assert abs(u.mean().item()) < 4 * math.sqrt(1 / 3 / n)
    if distribution == "uniform":
        assert u.abs().max() <= 1.0 + 1e-6
        assert u.abs().max() > 0.99
    else:
        p = fraction_beyond_one_gaussian()
        beyond = (u.abs() > 1).double().mean().item()
        assert abs(beyond - p) < 4 * math.sqrt(p * (1 - p) / n), (beyond, p)


# --------------------------------------------------------------------------------------------
# scale and distribution


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_per_sequence_scale_and_distribution(distribution):
    emb = make_embedding()
    ids, mask = make_batch()
    noise = NEFTuneNoise(
        ALPHA, distribution=distribution, generator=torch.Generator().manual_seed(2)
    )
    eps = draw(noise, emb, ids, attention_mask=mask)
    real = mask.bool()
    assert (eps[~real] == 0).all()  # no noise on padding
    pooled = []
    for row, length in enumerate(LENGTHS):
        a = ALPHA / math.sqrt(length * D)
        u = eps[row][real[row]] / a  # (length, d)
        assert u.shape == (length, D)
        if length * D >= 4000:
            assert_unit_statistics(u, distribution)
        pooled.append(u.flatten())
    u = torch.cat(pooled)
    assert_unit_statistics(u, distribution)
    if distribution == "uniform":  # flat histogram on [-1, 1]
        counts = torch.histc(u.float(), bins=10, min=-1.0, max=1.0)
        expected = u.numel() / 10
        assert ((counts - expected).abs() < 5 * math.sqrt(expected * 0.9)).all(), counts


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_padded_scale_everywhere(distribution):
    emb = make_embedding()
    ids, mask = make_batch()
    noise = NEFTuneNoise(
        ALPHA,
        length_mode="padded",
        distribution=distribution,
        generator=torch.Generator().manual_seed(3),
    )
    eps = draw(noise, emb, ids, attention_mask=mask)
    a = ALPHA / math.sqrt(L * D)
    assert_unit_statistics(eps / a, distribution)
    assert_unit_statistics(eps[~mask.bool()] / a, distribution)  # padding is noised too
    # padded mode does not need the mask
    eps = draw(noise, emb, ids)
    assert_unit_statistics(eps / a, distribution)


def test_scale_formula_exact():
    _, mask = make_batch()
    noise = NEFTuneNoise(ALPHA)
    noise.set_batch(attention_mask=mask)
    scale = noise.scale(torch.Size((B, L, D)), torch.device("cpu"))[..., 0]
    for row, length in enumerate(LENGTHS):
        expected = ALPHA / math.sqrt(length * D) * mask[row].float()
        torch.testing.assert_close(scale[row], expected, rtol=1e-6, atol=0)
    padded = NEFTuneNoise(ALPHA, length_mode="padded").scale(
        torch.Size((B, L, D)), torch.device("cpu")
    )
    torch.testing.assert_close(
        padded.expand(B, L, 1)[..., 0], torch.full((B, L), ALPHA / math.sqrt(L * D))
    )


def test_generator_makes_noise_reproducible():
    emb = make_embedding()
    ids, mask = make_batch()
    a = draw(
        NEFTuneNoise(ALPHA, generator=torch.Generator().manual_seed(4)),
        emb,
        ids,
        attention_mask=mask,
    )
    b = draw(
        NEFTuneNoise(ALPHA, generator=torch.Generator().manual_seed(4)),
        emb,
        ids,
        attention_mask=mask,
    )
    c = draw(
        NEFTuneNoise(ALPHA, generator=torch.Generator().manual_seed(5)),
        emb,
        ids,
        attention_mask=mask,
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_noise_is_detached_from_the_graph():
    emb = make_embedding()
    ids, mask = make_batch()
    noise = NEFTuneNoise(ALPHA, generator=torch.Generator().manual_seed(6))
    with noise.attached(emb):
        noise.set_batch(attention_mask=mask)
        out = emb(ids)
    (grad,) = torch.autograd.grad(out.sum(), emb.weight)
    torch.testing.assert_close(
        grad, torch.bincount(ids.flatten(), minlength=VOCAB).float()[:, None].expand(VOCAB, D)
    )


# --------------------------------------------------------------------------------------------
# packed rows


def test_per_sequence_with_packed_position_ids():
    segments = [[10, 20, 34], [64], [1, 63], [30, 30, 4]]
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in segments])
    per_token = torch.stack(
        [torch.cat([torch.full((n,), float(n)) for n in row]) for row in segments]
    )
    torch.testing.assert_close(segment_lengths(position_ids=position_ids), per_token)

    emb = make_embedding()
    ids, _ = make_batch()
    noise = NEFTuneNoise(ALPHA, generator=torch.Generator().manual_seed(7))
    eps = draw(noise, emb, ids, position_ids=position_ids)
    a = ALPHA / (per_token * D).sqrt()  # (B, L)
    u = eps / a[..., None]
    assert u.abs().max() <= 1.0 + 1e-6
    assert_unit_statistics(u, "uniform")
    # the short segments really get the larger scale: max |eps| per segment ~ its own a
    for row, lengths in enumerate(segments):
        start = 0
        for n in lengths:
            seg = eps[row, start : start + n]
            a_seg = ALPHA / math.sqrt(n * D)
            assert seg.abs().max() <= a_seg * (1 + 1e-6)
            assert seg.abs().max() > 0.95 * a_seg
            start += n


def test_position_ids_with_padding_use_real_lengths():
    """An ordinary right-padded batch that also carries position_ids = arange(L): the length is
    the number of real tokens, not the padded length."""
    _, mask = make_batch()
    right = mask[:3]
    positions = torch.arange(L).expand(3, L)
    expected = torch.tensor(LENGTHS[:3], dtype=torch.float32)[:, None] * right.float()
    torch.testing.assert_close(segment_lengths(right, positions), expected)
    # packed rows followed by padding whose position ids keep counting
    packed_positions = torch.cat([torch.arange(10), torch.arange(20), torch.arange(34)])[None]
    packed_mask = torch.ones(1, L, dtype=torch.long)
    packed_mask[0, 30:] = 0
    expected = torch.cat([torch.full((10,), 10.0), torch.full((20,), 20.0), torch.zeros(34)])
    torch.testing.assert_close(segment_lengths(packed_mask, packed_positions), expected[None])


# --------------------------------------------------------------------------------------------
# lifecycle and errors


def test_off_in_eval_mode():
    emb = make_embedding()
    ids, _ = make_batch()
    emb.eval()
    with NEFTuneNoise(ALPHA).attached(emb):  # no set_batch needed: the hook does nothing
        out = emb(ids)
    assert torch.equal(out, emb.weight[ids])


def test_alpha_zero_adds_nothing():
    emb = make_embedding()
    ids, mask = make_batch()
    assert (draw(NEFTuneNoise(0.0), emb, ids, attention_mask=mask) == 0).all()


def test_hook_removed_on_exit_and_on_error():
    emb = make_embedding()
    ids, mask = make_batch()
    noise = NEFTuneNoise(ALPHA)
    with noise.attached(emb):
        assert len(emb._forward_hooks) == 1
    assert len(emb._forward_hooks) == 0
    with pytest.raises(KeyError), noise.attached(emb):
        noise.set_batch(attention_mask=mask)
        emb(ids)
        raise KeyError("boom")
    assert len(emb._forward_hooks) == 0
    assert noise._attention_mask is None  # a stale mask is not kept for the next forward
    # the hook can be attached again after removal, but not twice at once
    with noise.attached(emb), pytest.raises(RuntimeError, match="already attached"):
        noise.attach(emb)
    assert len(emb._forward_hooks) == 0


def test_errors():
    emb = make_embedding()
    ids, mask = make_batch()
    emb.train()
    with NEFTuneNoise(ALPHA).attached(emb), pytest.raises(RuntimeError, match="attention mask"):
        emb(ids)
    with NEFTuneNoise(ALPHA).attached(emb) as noise:
        noise.set_batch(attention_mask=mask[:, :-1])
        with pytest.raises(RuntimeError, match=r"shape \(4, 63\)"):
            emb(ids)
    with NEFTuneNoise(ALPHA).attached(emb) as noise:
        noise.set_batch(position_ids=torch.arange(L)[None])
        with pytest.raises(RuntimeError, match="position_ids"):
            emb(ids)
    assert len(emb._forward_hooks) == 0
    with pytest.raises(ValueError, match="alpha"):
        NEFTuneNoise(-1.0)
    with pytest.raises(ValueError, match="length_mode"):
        NEFTuneNoise(ALPHA, length_mode="batch")
    with pytest.raises(ValueError, match="distribution"):
        NEFTuneNoise(ALPHA, distribution="laplace")


# --------------------------------------------------------------------------------------------
# finding the embedding module


class Wrapper(nn.Module):
    """Like DistributedDataParallel: the real model sits at ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class Bare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb


def test_find_input_embeddings_through_wrappers():
    inner = Bare()
    assert find_input_embeddings(inner) is inner.emb
    assert find_input_embeddings(Wrapper(inner)) is inner.emb
    assert find_input_embeddings(Wrapper(Wrapper(inner))) is inner.emb
    with pytest.raises(ValueError, match="get_input_embeddings"):
        find_input_embeddings(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="get_input_embeddings"):
        find_input_embeddings(Wrapper(nn.Linear(2, 2)))


def test_neftune_on_tiny_llama():
    model = tiny_llama(64, hidden_size=32, num_layers=1, num_heads=2)
    wrapped = Wrapper(model)
    assert find_input_embeddings(wrapped) is model.model.embed_tokens
    ids = torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    model.eval()
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask).logits
    with neftune(wrapped, ALPHA, generator=torch.Generator().manual_seed(1)) as noise:
        embedding = model.model.embed_tokens
        assert len(embedding._forward_hooks) == 1
        with torch.no_grad():
            # eval mode: no noise, no mask needed
            eval_logits = model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(eval_logits, clean, rtol=0, atol=0)
            model.train()
            noise.set_batch(attention_mask=mask)
            noisy = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(noisy, clean)
    assert len(model.model.embed_tokens._forward_hooks) == 0
    with pytest.raises(ValueError, match="alpha"), neftune(model, -1.0):
        pass


# --------------------------------------------------------------------------------------------
# EmbeddingCapture


def test_capture_records_embeddings_with_graph_and_shift():
    emb = make_embedding()
    ids, _ = make_batch()
    capture = EmbeddingCapture()
    with capture.attached(emb):
        out = emb(ids)
        assert capture.embeds is out
        assert torch.equal(out, emb.weight[ids])
        assert out.grad_fn is not None
        (grad,) = torch.autograd.grad((capture.embeds * 2).sum(), emb.weight)
        assert grad.abs().sum() > 0
        shift = torch.randn(B, L, D, generator=torch.Generator().manual_seed(0))
        capture.shift = shift
        shifted = emb(ids)
        assert torch.equal(shifted, emb.weight[ids] + shift)
        assert capture.embeds is shifted
        # the shifted X still reaches the table: d sum(X + c) / dE counts the tokens
        (grad,) = torch.autograd.grad(shifted.sum(), emb.weight)
        torch.testing.assert_close(
            grad[:, 0], torch.bincount(ids.flatten(), minlength=VOCAB).float()
        )
    assert len(emb._forward_hooks) == 0
    assert capture.embeds is None and capture.shift is None


def test_capture_with_frozen_table_gives_a_leaf():
    emb = make_embedding()
    emb.weight.requires_grad_(False)
    ids, _ = make_batch()
    with EmbeddingCapture().attached(emb) as capture:
        out = emb(ids)
        assert capture.embeds.requires_grad and capture.embeds.is_leaf
        (grad,) = torch.autograd.grad(out.pow(2).sum(), capture.embeds)
        torch.testing.assert_close(grad, 2 * emb.weight[ids])


class _Adapted(nn.Module):
    """An embedding with a trained scale inside it (as a LoRA adapter on the table): its output
    requires grad, its ``weight`` (the table) is frozen."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base, self.weight = base, base.weight
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, D, dtype=base.weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base(ids) * self.scale


def _passes_through_a_table(hold: bool, release: bool = True, case: str = "first"):
    """Three forwards of a small model over one embedding (the fd passes: X, then two shifts),
    the first two backpropagated at once, the last one's loss returned, the table's gradient
    held back or not. ``case``: ``first`` (the table has no gradient yet), ``earlier`` (it has
    one: accumulation), ``small`` (a table smaller than X), ``frozen`` (an adapter on a frozen
    table). Returns the table's and the head's gradients and whether the first backward left
    the table's gradient alone."""
    emb = make_embedding().double()
    if case == "small":
        emb = nn.Embedding.from_pretrained(emb.weight.detach()[:16].clone(), freeze=False)
    head = nn.Linear(D, 5).double()
    nn.init.normal_(head.weight, generator=torch.Generator().manual_seed(1))
    adapter = None
    if case == "earlier":
        emb.weight.grad = torch.ones_like(emb.weight)
    ids, _ = make_batch()
    ids = ids % emb.num_embeddings
    if case == "frozen":  # the table frozen, an adapter inside the embedding module trained
        emb = _Adapted(emb.requires_grad_(False))
        adapter = emb.scale
    dtype = emb.weight.dtype
    shifts = torch.randn(2, B, L, D, generator=torch.Generator().manual_seed(2), dtype=dtype)
    capture = EmbeddingCapture()
    trained = adapter if adapter is not None else emb.weight
    with capture.attached(emb), capture.holding_table_gradient(hold):
        for index, shift in enumerate([None, *shifts]):
            if index == 2 and release:
                capture.release()
            capture.shift = shift
            loss = torch.tanh(head(emb(ids))).pow(index + 2).sum()
            capture.shift = None
            if index < 2:
                before = None if trained.grad is None else trained.grad.clone()
                loss.backward()
                if index == 0:
                    untouched = before is not None and torch.equal(trained.grad, before)
                    untouched = untouched or (before is None and trained.grad is None)
    loss.backward()
    return trained.grad, head.weight.grad, untouched


@pytest.mark.parametrize("case", ["first", "earlier", "small", "frozen"])
def test_a_held_table_gradient_is_added_by_the_last_backward(case):
    """The backwards of the passes before the last leave the table alone; the last one adds
    their gradients at X to its own, and the table's gradient is the one of three plain
    backwards (the same float64 sums in another order). Where holding saves nothing (the table
    has a gradient already, is smaller than X, or is frozen under an adapter) nothing is held:
    the first backward reaches the table (or the adapter) at once, with the same result."""
    held_table, held_head, held = _passes_through_a_table(hold=True, case=case)
    plain_table, plain_head, plain_held = _passes_through_a_table(hold=False, case=case)
    assert not plain_held and held == (case == "first")
    assert plain_table.abs().sum() > 0
    torch.testing.assert_close(held_table, plain_table, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(held_head, plain_head, rtol=0, atol=0)


def test_a_held_table_gradient_never_released_is_an_error():
    with pytest.raises(RuntimeError, match="no last forward took it"):
        _passes_through_a_table(hold=True, release=False)


@pytest.mark.parametrize("tied", [False, True])
def test_fd_holds_the_table_gradient_only_for_an_untied_table(tied):
    """A table tied to the output head gets its gradient from the head's backward at X anyway:
    the trainer's fd passes hold nothing there (split, not fused, not the Hessian trace)."""
    from fishertune.training.checks import holds_table_gradient

    model = tiny_llama(64, hidden_size=32, num_layers=1, num_heads=2, tie_word_embeddings=tied)
    assert holds_table_gradient(model, "token", split=True, fused=False) is not tied
    assert not holds_table_gradient(model, "token", split=False, fused=False)
    assert not holds_table_gradient(model, "token", split=True, fused=True)
    assert not holds_table_gradient(model, "hessian", split=True, fused=False)


@pytest.mark.parametrize("capture_first", [True, False])
def test_capture_sees_clean_embeddings_under_neftune(capture_first):
    emb = make_embedding()
    ids, mask = make_batch()
    emb.train()
    capture = EmbeddingCapture()
    noise = NEFTuneNoise(ALPHA, generator=torch.Generator().manual_seed(8))
    if capture_first:
        capture.attach(emb)
        noise.attach(emb)
    else:
        noise.attach(emb)
        capture.attach(emb)
    try:
        noise.set_batch(attention_mask=mask)
        out = emb(ids)
        assert torch.equal(capture.embeds, emb.weight[ids])
        assert not torch.equal(out, capture.embeds)
    finally:
        noise.detach()
        capture.detach()
    assert len(emb._forward_hooks) == 0
