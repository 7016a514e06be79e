"""The penalties under torch FSDP2 sharding on CPU: 2 processes over gloo (torchrun).

accelerate (1.15) enables FSDP only over an accelerator backend, so a CPU launch through it
cannot shard. torch itself shards on CPU: this test builds the trainer as ``fishertune train``
does, applies ``fully_shard`` to its model (per decoder layer, then the root) and checks that one
``compute_loss`` + backward gives the unsharded model's gradient: exactly for the baseline, and
for every fd variant within the same tolerance to exact double backward as without sharding.
Both ranks get the same batch and the same draws, so FSDP's gradient average equals the
single-model gradient.

This file is also the worker: ``torchrun --nproc_per_node 2 tests/test_fsdp.py DATA OUT``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

PENALTY = {"method": "token-f", "penalty_coef": 1.0, "penalty_warmup_steps": 0}
CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": {"method": "baseline"},
    "exact": {**PENALTY, "penalty_grad": "exact"},
    "fd-forward-split": {**PENALTY, "penalty_grad": "fd", "penalty_fd_scheme": "forward",
                         "penalty_fd_backward": "split"},
    "fd-central-split": {**PENALTY, "penalty_grad": "fd", "penalty_fd_scheme": "central",
                         "penalty_fd_backward": "split"},
    "fd-forward-joint": {**PENALTY, "penalty_grad": "fd", "penalty_fd_scheme": "forward",
                         "penalty_fd_backward": "joint"},
    # compared with their own unsharded gradient (same draws / probes): the unbiased score term
    # (in the CE backward at X: no hand accumulation under FSDP), matched weights, hessian-trace
    "same-unbiased-matched": {**PENALTY, "penalty_grad": "fd", "penalty_fd_scheme": "central",
                              "penalty_estimator": "unbiased", "penalty_match_neftune_alpha": 20},
    "same-hessian-trace": {"method": "hessian-trace", "penalty_coef": 1.0,
                           "penalty_warmup_steps": 0, "penalty_grad": "fd"},
    # the default kernel: linear unsharded; on the sharded weight it turns to chunked
    "same-auto-baseline": {"method": "baseline", "ce_kernel": "auto"},
}  # fmt: skip
TOLERANCE = {"forward": 2e-2, "central": 2e-3}


def _argv(data: str, output_dir: str, overrides: dict[str, Any]) -> list[str]:
    options = {
        "model_name_or_path": "builtin:tiny-llama", "tiny_hidden_size": 32,
        "tiny_num_layers": 2, "tiny_num_heads": 2, "dataset_name": data, "max_length": 64,
        "max_steps": 1, "bf16": "false", "activation_checkpointing": "false", "use_cpu": "true",
        "report_to": "none", "save_strategy": "no", "disable_tqdm": "true",
        "output_dir": output_dir, "seed": 0, "ce_kernel": "chunked", **overrides,
    }  # fmt: skip
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def _worker(data: str, out: str) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fishertune.training.cli import build_trainer, parse_args

    def gradient(trainer: Any, batch: dict[str, Any]) -> Any:
        model = trainer.model
        model.train()
        model.zero_grad()
        with trainer._capture.attached(model.get_input_embeddings()):
            trainer.compute_loss(model, dict(batch)).backward()
        grads = []
        for param in model.parameters():
            grad = param.grad
            grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            grads.append(grad.flatten())
        return torch.cat(grads)

    results: dict[str, Any] = {}
    unsharded: dict[str, Any] = {}
    sharded: dict[str, Any] = {}
    mesh = None
    for name, overrides in CONFIGS.items():
        trainer = build_trainer(*parse_args(_argv(data, f"{out}/{name}", overrides)))
        # rank-independent draws, so that both ranks (and the reference) see the same y'
        trainer._stream = lambda stream, device: torch.Generator(device=device).manual_seed(
            1000 + stream
        )
        rows = [trainer.train_dataset[i] for i in range(4)]
        batch = trainer._prepare_inputs(trainer.data_collator(rows))  # the same on both ranks
        unsharded[name] = gradient(trainer, batch)
        if name == "exact":
            continue  # double backward under FSDP2 is not claimed; the reference is unsharded
        mesh = mesh or init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
        for layer in trainer.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(trainer.model, mesh=mesh)
        sharded[name] = gradient(trainer, batch)
        if name == "same-auto-baseline":
            results["auto_kernel_after_sharding"] = trainer._fd_precision.get("linear_ce")
    results["world_size"] = int(os.environ["WORLD_SIZE"])
    base = unsharded["baseline"]
    results["baseline"] = ((sharded["baseline"] - base).norm() / base.norm()).item()
    exact = unsharded["exact"] - base
    for name in CONFIGS:
        if name.startswith("fd"):
            results[name] = {
                "sharded_vs_exact": ((sharded[name] - base - exact).norm() / exact.norm()).item(),
                "unsharded_vs_exact": (
                    (unsharded[name] - base - exact).norm() / exact.norm()
                ).item(),
            }
        if name == "same-auto-baseline":  # against its own unsharded (linear) gradient
            own = unsharded[name]
            results[name] = ((sharded[name] - own).norm() / own.norm()).item()
        elif name.startswith("same"):
            own = unsharded[name] - base
            results[name] = ((sharded[name] - base - own).norm() / own.norm()).item()
    if os.environ["RANK"] == "0":
        Path(out, "results.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fd_penalties_under_fsdp2_sharding(tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"count to {i}"},
                      {"role": "assistant", "content": " ".join(map(str, range(i % 7 + 2)))}]}
        for i in range(16)
    ]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), __file__, str(data), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["baseline"] < 1e-5
    for name in CONFIGS:
        if name.startswith("fd"):
            tolerance = TOLERANCE[name.split("-")[1]]
            assert results[name]["unsharded_vs_exact"] < tolerance, (name, results[name])
            assert results[name]["sharded_vs_exact"] < tolerance, (name, results[name])
        if name.startswith("same"):
            assert results[name] < 1e-4, (name, results[name])
    assert results["auto_kernel_after_sharding"] is False  # auto: chunked on the sharded head


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
