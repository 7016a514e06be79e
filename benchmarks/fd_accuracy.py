"""fd's penalty gradient at the paper presets' settings, relative to the penalty's own gradient.

The paper presets (``configs/paper/token-f.yaml``, ``logit-f.yaml``) train with bf16 autocast,
central differences, SDPA attention, activation checkpointing and ``penalty_coef`` 2e-6
(token-F) / 1e-6 (logit-F). Here a tiny Llama (the ``tiny`` preset's width, 128, 2 layers) takes
one micro-step with those settings; the penalty's part of fd's gradient (its step gradient minus
the CE's at ``X``, same kernels, same precision) is compared with ``lambda grad R`` by exact double
backward in float32 for the same draws (``tests/penalty_isolation.py``). Printed for each row:
the error relative to the penalty's gradient, the float32 floor every method shares
(``eps_32 ||grad CE|| / ||lambda grad R||``) and the penalty's share of the step's gradient.

    python benchmarks/fd_accuracy.py               # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# (label, kind, coefficient, bf16, scheme, fused CE)
ROWS = [
    ("paper token-F", "token-f", 2e-6, True, "central", False),
    ("paper logit-F", "logit-f", 1e-6, True, "central", False),
    ("paper token-F, fused CE", "token-f", 2e-6, True, "central", True),
    ("token-F float32 forward", "token-f", 2e-6, False, "forward", False),
    ("token-F float32 central", "token-f", 2e-6, False, "central", False),
    ("token-F float32 forward, fused CE", "token-f", 2e-6, False, "forward", True),
    ("token-F float32 forward, lambda 0.1", "token-f", 0.1, False, "forward", False),
    ("paper token-F, lambda 0.1", "token-f", 0.1, True, "central", False),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    import torch

    from penalty_isolation import (
        fixed_batch,
        fixed_draws,
        float32_floor,
        micro_step_gradient,
        penalty_reference,
        relative_error,
    )
    from test_trainer import trainer_for

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    common = {
        "dataset_name": "builtin:tiny-tasks",
        "tiny_hidden_size": args.hidden_size,
        "tiny_num_layers": args.layers,
        "tiny_num_heads": 4,
        "max_length": 128,
        "penalty_warmup_steps": 0,
        "penalty_coef": 1.0,
        "per_device_train_batch_size": args.batch,
        "loss_reduction": "sum",
    }
    print(f"# fd accuracy: {common}")
    print()
    print("| setting | lambda | error vs lambda grad R | float32 floor | penalty / CE gradient |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        chat = Path("builtin:tiny-tasks")
        references: dict[str, tuple] = {}
        for label, kind, coef, bf16, scheme, fused in ROWS:
            fd = trainer_for(chat, Path(tmp), **common, method=kind, penalty_grad="fd",
                             penalty_fd_scheme=scheme, penalty_fd_fused_ce=str(fused).lower(),
                             bf16=str(bf16).lower(), attn_implementation="sdpa",
                             activation_checkpointing="true")  # fmt: skip
            batch = fixed_batch(fd, args.batch)
            draws = fixed_draws(batch["labels"], fd.model.config.vocab_size)
            if kind not in references:
                exact = trainer_for(chat, Path(tmp), **common, method=kind, penalty_grad="exact")
                exact.model.load_state_dict(fd.model.state_dict())
                references[kind] = penalty_reference(exact, batch, draws, torch.tensor(1.0))
            reference = references[kind]
            normalizer = torch.tensor(1.0)  # the presets' sum reduction
            # the CE's gradient at X by the same kernels: the fd objective at lambda = 0 of a
            # trainer that takes the CE at X
            at_x = fd
            if fused:
                at_x = trainer_for(chat, Path(tmp), **common, method=kind, penalty_grad="fd",
                                   penalty_fd_scheme=scheme, bf16=str(bf16).lower(),
                                   attn_implementation="sdpa",
                                   activation_checkpointing="true")  # fmt: skip
                at_x.model.load_state_dict(fd.model.state_dict())
            ce = micro_step_gradient(at_x, at_x.model, batch, draws, 0.0, "fd", normalizer, bf16)
            step = micro_step_gradient(fd, fd.model, batch, draws, coef, "fd", normalizer, bf16)
            scaled = coef * reference
            error = relative_error(step - ce, scaled)
            floor = float32_floor(ce, scaled)
            share = float(scaled.norm() / ce.norm())
            print(f"| {label} | {coef:g} | {error:.2e} | {floor:.1e} | {share:.1e} |", flush=True)
    print(f"\n({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
