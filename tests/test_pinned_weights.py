"""A short run's final weights are pinned: refactors of the penalty code keep the same draws and
the same arithmetic, so the weights after a few steps stay what they were.

The reference tensors (``tests/data/pinned_weights.safetensors``) were written by this test's
``regenerate`` path from the code as it stood before the penalty gradients moved into
:mod:`fishertune.penalty_grad`. Regenerate them only for a deliberate change of the numerics:
``FISHERTUNE_REGENERATE_PINS=1 pytest tests/test_pinned_weights.py``.

Each weight tensor is kept as a fingerprint, to keep the file small: its float64 sum and 8
projections on fixed random directions (any change of a single entry moves them). The tolerance is
far below what a different draw moves: the test also checks that another seed lands more than 1000
times the tolerance away.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fishertune.training.cli import build_trainer, parse_args
from test_trainer import base_args

PINS = Path(__file__).parent / "data" / "pinned_weights.safetensors"
ATOL = 1e-7

# Each exercises a different path of the penalty code: the fused split fd (forward differences),
# exact double backward, central differences with two draws, joint backward with a row fraction.
RUNS: dict[str, dict[str, object]] = {
    "token-fd-forward": {"method": "token-f", "penalty_grad": "fd",
                         "penalty_fd_scheme": "forward"},
    "token-exact": {"method": "token-f", "penalty_grad": "exact"},
    "logit-fd-central": {"method": "logit-f", "penalty_grad": "fd",
                         "penalty_fd_scheme": "central", "penalty_samples": 2},
    "logit-fd-joint-half": {"method": "logit-f", "penalty_grad": "fd",
                            "penalty_fd_backward": "joint", "penalty_fraction": 0.5},
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """The pins were written with one intra-op thread: more threads split CPU reductions
    differently, which moves float32 results by more than the tolerance (not a change of the
    code's numerics)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _final_weights(chat_file: Path, out: Path, seed: int = 0, **overrides: object) -> dict:
    argv = base_args(chat_file, out, max_steps=3, seed=seed, penalty_coef=1.0,
                     penalty_warmup_steps=0, **overrides)  # fmt: skip
    trainer = build_trainer(*parse_args(argv))
    trainer.train()
    return {k: _fingerprint(v) for k, v in trainer.model.state_dict().items()}


def _fingerprint(value: torch.Tensor) -> torch.Tensor:
    """(9,) float64: the sum and 8 projections of the tensor on fixed N(0, 1/n) directions."""
    flat = value.detach().double().flatten()
    generator = torch.Generator().manual_seed(flat.numel())
    directions = torch.randn(8, flat.numel(), generator=generator, dtype=torch.float64)
    return torch.cat([flat.sum()[None], directions @ flat / flat.numel() ** 0.5])


@pytest.mark.parametrize("name", list(RUNS))
def test_final_weights_are_pinned(chat_file, tmp_path, name):
    weights = _final_weights(chat_file, tmp_path / name, **RUNS[name])
    if os.environ.get("FISHERTUNE_REGENERATE_PINS"):
        pinned = load_file(PINS) if PINS.is_file() else {}
        pinned.update({f"{name}/{k}": v.contiguous() for k, v in weights.items()})
        PINS.parent.mkdir(exist_ok=True)
        save_file(pinned, PINS)
    pinned = load_file(PINS)
    for key, value in weights.items():
        torch.testing.assert_close(value, pinned[f"{name}/{key}"], rtol=0, atol=ATOL, msg=key)


def test_the_pin_tolerance_is_far_below_what_another_draw_moves(chat_file, tmp_path):
    weights = _final_weights(chat_file, tmp_path / "other", seed=1, **RUNS["token-fd-forward"])
    pinned = load_file(PINS)
    worst = max(
        (value - pinned[f"token-fd-forward/{key}"]).abs().max().item()
        for key, value in weights.items()
    )
    assert worst > 1000 * ATOL
