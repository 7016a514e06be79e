"""fd's penalty gradient at the coefficients users run, relative to the penalty's own gradient.

Through the trainer's micro-step objective on a tiny Llama (CPU): fd's gradient minus the CE's,
against ``lambda grad R`` by exact double backward (``tests/penalty_isolation.py``), for
``lambda`` from 1e-1 down to 1e-7, forward and central differences, float32 and bf16 autocast,
one process and two DDP processes. The error must stay at fd's own error whatever ``lambda``,
up to the float32 floor ``eps_32 ||grad CE|| / ||lambda grad R||`` that every method shares (the
gradients are float32 sums).

The CE of the penalized rows taken at the shifted point ``X + h v`` (``penalty_fd_fused_ce``, the
default until this check existed) moves the CE's gradient by ``O(h_rel)`` of its own size, which
does not shrink with ``lambda``: its error relative to the penalty grows as ``1 / lambda`` (6.3x
the penalty itself at 1e-7, forward, float32, before the fix). The last test keeps that condition
measured.

This file is also the DDP worker: ``python tests/test_fd_coefficients.py SPEC``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from penalty_isolation import (
    EPS_32,
    fixed_batch,
    fixed_draws,
    float32_floor,
    micro_step_gradient,
    penalty_reference,
    relative_error,
    token_count,
)

pytestmark = pytest.mark.numerics

COEFFICIENTS = (1e-1, 1e-3, 1e-5, 1e-7)
# fd's own error relative to the penalty's gradient at lambda = 0.1 (where the floor is
# negligible), measured on this model: float32 forward 1.1e-3, central 1.9e-4; bf16 central
# (the default under bf16) 2e-2.
TOLERANCE = {
    ("float32", "forward"): 4e-3,
    ("float32", "central"): 1e-3,
    ("bf16", "central"): 6e-2,
    ("bf16", "forward"): 0.3,  # measured 0.11
}
FLOOR_FACTOR = 10.0  # measured floors: 4.6x (forward) and 2.3x (central) eps_32 ||CE|| / ||pen||
# bf16 forward differences backpropagate the CE and -(2/h) g(X) in one bf16 backward, so the CE's
# rounding (eps_bf16 ||grad CE||) lands in the penalty's part: measured 0.24 and 0.13 times
# eps_bf16 ||CE|| / ||pen|| at lambda 1e-5 and 1e-7 (central keeps them in separate backwards)
EPS_BF16 = float(torch.finfo(torch.bfloat16).eps)
BF16_FLOOR_FACTOR = 1.0


def _trainer(chat_file: Path, tmp_path: Path, **overrides: object):
    from test_trainer import trainer_for

    options = {"method": "token-f", "penalty_coef": 1.0, "penalty_warmup_steps": 0}
    return trainer_for(chat_file, tmp_path, **{**options, **overrides})


def _penalty_errors(
    trainer, exact_trainer, autocast: bool, ce_trainer=None
) -> list[tuple[float, float, float]]:
    """(lambda, error relative to lambda grad R, float32 floor) for each coefficient; the CE's
    gradient at X from ``ce_trainer``'s fd objective at lambda = 0 (default ``trainer``)."""
    ce_trainer = ce_trainer or trainer
    for other in (exact_trainer, ce_trainer):
        other.model.load_state_dict(trainer.model.state_dict())
    batch = fixed_batch(trainer)
    draws = fixed_draws(batch["labels"], trainer.model.config.vocab_size)
    reference = penalty_reference(exact_trainer, batch, draws)
    normalizer = token_count(batch)
    model = trainer.model
    ce = micro_step_gradient(
        ce_trainer, ce_trainer.model, batch, draws, 0.0, "fd", normalizer, autocast
    )
    if not autocast:  # the CE reference is the dense CE's gradient (float32 rounding apart)
        dense = micro_step_gradient(trainer, model, batch, draws, 0.0, "plain", normalizer)
        assert relative_error(ce, dense) < 1e-5
    rows = []
    for coef in COEFFICIENTS:
        step = micro_step_gradient(trainer, model, batch, draws, coef, "fd", normalizer, autocast)
        part = step - ce
        rows.append(
            (coef, relative_error(part, coef * reference), float32_floor(ce, coef * reference))
        )
    return rows


@pytest.mark.parametrize("kind", ["token-f", "logit-f"])
@pytest.mark.parametrize(
    "precision, scheme",
    [("float32", "forward"), ("float32", "central"), ("bf16", "central"), ("bf16", "forward")],
)
def test_fd_penalty_gradient_holds_at_small_coefficients(
    chat_file, tmp_path, kind, precision, scheme
):
    bf16 = precision == "bf16"
    fd = _trainer(chat_file, tmp_path, method=kind, penalty_grad="fd",
                  penalty_fd_scheme=scheme, bf16=str(bf16).lower())  # fmt: skip
    exact = _trainer(chat_file, tmp_path, method=kind, penalty_grad="exact")
    rows = _penalty_errors(fd, exact, autocast=bf16)
    tolerance = TOLERANCE[(precision, scheme)]
    half_floor = bf16 and scheme == "forward"
    for coef, error, floor in rows:
        bound = tolerance + FLOOR_FACTOR * floor
        if half_floor:  # the CE's bf16 rounding, as any one half-precision backward has it
            bound += BF16_FLOOR_FACTOR * EPS_BF16 / EPS_32 * floor
        assert error < bound, (coef, rows)
    errors = {coef: error for coef, error, _ in rows}
    if not half_floor:
        # the floor stays below fd's tolerance down to 1e-5 here, so the error is fd's own there
        assert errors[1e-5] < 2.0 * errors[1e-1] + tolerance / 4, rows
    else:  # and above it the error is fd's own
        assert errors[1e-3] < 2.0 * errors[1e-1] + tolerance / 4, rows


def test_fused_ce_error_grows_as_one_over_the_coefficient(chat_file, tmp_path):
    """The opt-in fused form: its offset is the CE's, so relative to the penalty it grows as
    1 / lambda (the condition its warning states)."""
    fused = _trainer(chat_file, tmp_path, penalty_grad="fd", penalty_fd_fused_ce="true")
    exact = _trainer(chat_file, tmp_path, penalty_grad="exact")
    at_x = _trainer(chat_file, tmp_path, penalty_grad="fd")
    rows = _penalty_errors(fused, exact, autocast=False, ce_trainer=at_x)
    errors = {coef: error for coef, error, _ in rows}
    assert errors[1e-5] > 10 * errors[1e-1] and errors[1e-7] > 1.0, errors


# ---------------------------------------------------------------------- DDP (two processes)
def _worker(spec_path: str) -> None:
    """Each rank: its half of the fixed batch through the DDP-wrapped model; rank 0 writes the
    all-reduced gradients (fd at each coefficient, and the CE's at lambda = 0)."""
    from fishertune.training.cli import build_trainer, parse_args

    spec = json.loads(Path(spec_path).read_text())
    trainer = build_trainer(*parse_args(spec["argv"]))
    accelerator = trainer.accelerator
    batch = fixed_batch(trainer)
    draws = fixed_draws(batch["labels"], trainer.model.config.vocab_size)
    # DDP averages the ranks' gradients: each normalizes by the whole batch's tokens / ranks
    normalizer = token_count(batch) / accelerator.num_processes
    half = batch["labels"].shape[0] // accelerator.num_processes
    mine = slice(accelerator.process_index * half, (accelerator.process_index + 1) * half)
    local = {k: v[mine] for k, v in batch.items()}
    model = accelerator.prepare_model(trainer.model)
    gradients = {}
    for coef in (0.0, *spec["coefficients"]):
        gradients[str(coef)] = micro_step_gradient(
            trainer, model, local, draws[mine], coef, "fd", normalizer
        ).tolist()
    if accelerator.is_main_process:
        Path(spec["out"]).write_text(json.dumps(gradients))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def test_fd_penalty_gradient_under_ddp_at_small_coefficients(chat_file, tmp_path):
    """Two gloo processes, two rows each, the fixed draws: the all-reduced fd penalty part against
    one process's exact ``lambda grad R`` on all four rows."""
    from test_distributed import DDP_CONFIG, _free_port
    from test_trainer import base_args

    coefficients = [1e-1, 1e-4, 1e-7]
    common = {"method": "token-f", "penalty_coef": 1.0, "penalty_warmup_steps": 0}
    argv = base_args(chat_file, tmp_path / "ddp", penalty_grad="fd", **common,
                     per_device_train_batch_size=2)  # fmt: skip
    out = tmp_path / "gradients.json"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"argv": argv, "coefficients": coefficients, "out": str(out)}))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG),
        "--num_processes", "2", "--main_process_port", str(_free_port()), __file__, str(spec),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    gradients = {float(k): torch.tensor(v, dtype=torch.float64)
                 for k, v in json.loads(out.read_text()).items()}  # fmt: skip

    exact = _trainer(chat_file, tmp_path, penalty_grad="exact")  # the same seed: same weights
    batch = fixed_batch(exact)
    reference = penalty_reference(
        exact, batch, fixed_draws(batch["labels"], exact.model.config.vocab_size)
    )
    ce = gradients[0.0]
    for coef in coefficients:
        error = relative_error(gradients[coef] - ce, coef * reference)
        floor = float32_floor(ce, coef * reference)
        assert error < TOLERANCE[("float32", "forward")] + FLOOR_FACTOR * floor, (coef, error)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _worker(sys.argv[1])


def test_a_float64_llama_gets_the_float32_steps(chat_file, tmp_path):
    """transformers' Llama in float64 (the library's API; the CLI's ``dtype`` stops at float32)
    rounds to float32 in its RMSNorm: the fd objective measures it once and takes the float32
    steps."""
    from fishertune.training.loss import MicroStepLoss

    trainer = _trainer(chat_file, tmp_path, penalty_grad="fd")
    trainer.model.double()
    assert trainer.model.get_input_embeddings().weight.dtype == torch.float64
    batch = fixed_batch(trainer)
    draws = fixed_draws(batch["labels"], trainer.model.config.vocab_size)
    precision: dict[str, bool] = {}
    loss = MicroStepLoss(trainer.args, trainer.accelerator, trainer._capture, trainer._sums,
                         trainer._stream, lambda logits, mask: draws[mask][:, None],
                         trainer.draw_probes, precision)  # fmt: skip
    rows = torch.arange(batch["labels"].shape[0])
    with trainer._capture.attached(trainer.model.get_input_embeddings()):
        loss.fd(trainer.model, batch, token_count(batch), 1.0, rows).backward()
    assert precision["float32_inside"] is True
