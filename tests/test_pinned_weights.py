"""A short penalized run's weight update is pinned: refactors of the penalty code keep the same
draws and the same arithmetic, so the update after a few steps stays what it was, on any CPU.

What makes the pins portable: the runs train in float64 from a float64 initial draw, with plain
SGD, and with float64 arithmetic throughout the model (:func:`_in_float64`). float32 kernels
differ between instruction sets (torch's ``ATEN_CPU_CAPABILITY``: default, avx2, avx512), even
the float32 initial weights do (``normal_`` has its own AVX2 kernel), and AdamW's first steps are
about ``lr * sign(g)``, which turns a rounding difference in a small gradient entry into a
full-size one. In float64 with SGD the differences stay at rounding level. The float32 pieces
left in the penalty code (the sampling probabilities, the fd step's norms) did not move a draw.

Each weight tensor's update ``W_3 - W_0`` is kept as a fingerprint, to keep the file small: its
float64 sum and 8 projections on fixed random directions. The comparison is relative to the
tensor's own update: ``max |f - f_pin| <= RTOL * max |f_pin|``.

Measured with ``python benchmarks/pinned_spread.py`` (AMD EPYC with AVX-512, torch 2.13.0 CPU;
kernel sets default / avx2 / avx512 x 1, 2, 4 intra-op threads, 9 processes), with the fd steps
the runs give (forward 1e-5, central 1e-4) and the CE at ``X``:

- spread over kernel sets and threads: at most 2.1e-9 relative (token-F fd forward; 1.0e-9
  logit-F fd joint with half the rows, 2.7e-10 logit-F fd central, 1.3e-12 exact token-F);
  threads changed nothing, the kernel set did;
- ``RTOL = 1e-7``: about 50 times that spread;
- deliberate changes of the arithmetic move the updates by (relative): forward-difference step
  x 1.01: 2.8e-6 (token-F fd forward); token-F's logsumexp taken in float32 (a precision change
  only): 2.7e-5 (exact token-F). :func:`test_a_changed_fd_step_is_caught` checks the x 1.01 step
  in every run of the suite.

The pins were written by this test's regenerate path; regenerate them only for a deliberate change
of the numerics: ``FISHERTUNE_REGENERATE_PINS=1 pytest tests/test_pinned_weights.py``.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fishertune.training.cli import build_trainer, parse_args
from test_trainer import base_args

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default

PINS = Path(__file__).parent / "data" / "pinned_weights.safetensors"
RTOL = 1e-7
INIT_STD = 0.02  # the tiny Llama's initializer_range

# Each exercises a different path of the penalty code: the split fd (forward differences, the CE
# at X), exact double backward, central differences with two draws, joint backward with a row
# fraction. The fd steps are given, at the values whose spread over kernel sets was measured
# (the float64 defaults are smaller: their rounding, eps / h, spreads more between CPUs).
FORWARD_STEP, CENTRAL_STEP = 1e-5, 1e-4
RUNS: dict[str, dict[str, object]] = {
    "token-fd-forward": {"method": "token-f", "penalty_grad": "fd",
                         "penalty_fd_scheme": "forward", "penalty_fd_step": FORWARD_STEP},
    "token-exact": {"method": "token-f", "penalty_grad": "exact", "attn_implementation": "sdpa"},
    "logit-fd-central": {"method": "logit-f", "penalty_grad": "fd",
                         "penalty_fd_scheme": "central", "penalty_samples": 2,
                         "penalty_fd_step": CENTRAL_STEP},
    "logit-fd-joint-half": {"method": "logit-f", "penalty_grad": "fd",
                            "penalty_fd_backward": "joint", "penalty_fraction": 0.5,
                            "penalty_fd_step": FORWARD_STEP},
}  # fmt: skip


def weight_update(
    chat_file: Path, out: Path, name: str, seed: int = 0, **changes: object
) -> dict[str, torch.Tensor]:
    """Fingerprints of ``W_3 - W_0`` after 3 SGD steps of the run ``RUNS[name]``, in float64.

    The trainer is built as ``fishertune train`` builds it; its model is then cast to float64
    and its matrices redrawn as float64 ``N(0, INIT_STD^2)`` from a generator seeded with
    ``seed`` (the norm weights are ones): the float32 initial draw is not the same on every CPU.
    """
    argv = base_args(chat_file, out, max_steps=3, seed=seed, optim="sgd", penalty_coef=1.0,
                     penalty_warmup_steps=0, **{**RUNS[name], **changes})  # fmt: skip
    trainer = build_trainer(*parse_args(argv))
    model = _in_float64(trainer.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
                param.mul_(INIT_STD)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    final = trainer.model.state_dict()
    assert all(v.dtype == torch.float64 for v in final.values())
    return {k: _fingerprint(final[k] - start[k]) for k in start}


def _in_float64(model: torch.nn.Module) -> torch.nn.Module:
    """The model cast to float64, with float64 arithmetic throughout.

    Llama's RMSNorm and rotary embedding compute in float32 whatever the model's dtype (a choice
    for half precision): float32 rounding in the norms would dominate the fd difference
    ``g(X + h v) - g(X)`` (a 1.5e-5 relative shift of ``X``), and float32 ``cos``, ``sin`` and
    ``rsqrt`` are instruction-set kernels. Both are replaced here by the same formulas in float64
    (transformers 5.24's ``LlamaRMSNorm.forward`` and default-RoPE ``LlamaRotaryEmbedding``).
    """
    model.to(torch.float64)
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm, module)
        elif kind.endswith("RotaryEmbedding"):
            config = module.config
            dim = (
                getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads
            )
            exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
            module.inv_freq64 = 1.0 / config.rope_parameters["rope_theta"] ** exponent
            module.forward = types.MethodType(_rotary, module)
    return model


def _rms_norm(self: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def _rotary(
    self: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = position_ids[..., None].to(torch.float64) * self.inv_freq64
    angles = torch.cat((freqs, freqs), dim=-1)
    scale = self.attention_scaling
    return (angles.cos() * scale).to(x.dtype), (angles.sin() * scale).to(x.dtype)


def _fingerprint(value: torch.Tensor) -> torch.Tensor:
    """(9,) float64: the sum and 8 projections of the tensor on fixed N(0, 1/n) directions."""
    flat = value.detach().double().flatten()
    generator = torch.Generator().manual_seed(flat.numel())
    directions = torch.randn(8, flat.numel(), generator=generator, dtype=torch.float64)
    return torch.cat([flat.sum()[None], directions @ flat / flat.numel() ** 0.5])


def relative_distance(update: dict[str, torch.Tensor], pinned: dict[str, torch.Tensor]) -> float:
    """``max`` over tensors of ``max |f - f_pin| / max |f_pin|`` (a tensor that did not move at
    all must not move now)."""
    worst = 0.0
    for key, value in update.items():
        scale = pinned[key].abs().max().item()
        diff = (value - pinned[key]).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def load_pins(name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}/"
    return {k[len(prefix) :]: v for k, v in load_file(PINS).items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", list(RUNS))
def test_the_weight_update_is_pinned(chat_file, tmp_path, name):
    update = weight_update(chat_file, tmp_path / name, name)
    if os.environ.get("FISHERTUNE_REGENERATE_PINS"):
        pinned = load_file(PINS) if PINS.is_file() else {}
        pinned = {k: v for k, v in pinned.items() if k.split("/")[0] in RUNS}
        pinned.update({f"{name}/{k}": v.contiguous() for k, v in update.items()})
        PINS.parent.mkdir(exist_ok=True)
        save_file(pinned, PINS)
    pinned = load_pins(name)
    assert set(pinned) == set(update)
    distance = relative_distance(update, pinned)
    assert distance <= RTOL, f"{name}: the update moved by {distance:.3g} relative (> {RTOL})"


def test_a_changed_fd_step_is_caught(chat_file, tmp_path):
    """A 1% larger forward-difference step moves the token-F update by 2.8e-6 relative
    (benchmarks/pinned_spread.py; 6e-3 when the CE was taken at X + h v, which moved with h),
    28 times the tolerance and 1000 times the spread over kernel sets."""
    update = weight_update(
        chat_file, tmp_path / "step", "token-fd-forward", penalty_fd_step=FORWARD_STEP * 1.01
    )
    assert relative_distance(update, load_pins("token-fd-forward")) > 10 * RTOL
