"""The output projection's CE alone at a Llama-3 vocabulary: fishertune's fused kernel against the
dense CE and the fused CEs of torch and Liger Kernel, so a user sees which baseline CE is the
fastest on their machine.

    python benchmarks/fused_ce.py       # (1024, 256) x (128256, 256), float32, CPU, 1 thread
    python benchmarks/fused_ce.py --rows 512 --repeats 5
    python benchmarks/fused_ce.py --device cuda --dtype bf16 --rows 4096 --hidden 2048

Forward and backward of the summed CE of ``z = h W^T`` at ``N`` positions, best of ``--repeats``
after one warm-up call, each as a ratio to the dense CE and to fishertune's kernel, with the loss
(a wrong kernel shows there) and, on CUDA, ``torch.cuda.max_memory_allocated`` (reset before each
kernel's timed calls; the inputs and their gradients included). ``--dtype bf16`` runs the forward
under ``torch.autocast(device, torch.bfloat16)`` over float32 leaf tensors, as training does. The
rows:

- ``dense CE``: ``F.cross_entropy(h @ W.T)``, the (N, V) logits kept; ``ce_kernel: dense``, and
  the yardstick of every ratio.
- ``fishertune linear_scored_ce``: ``vocab.linear_scored_ce``, what the baseline runs by default
  (``ce_kernel: auto`` takes the linear kernel); it also returns the entropy and accuracy the step
  logs, the others the CE alone.
- ``torch linear_cross_entropy, reference`` / ``, chunked``: ``F.linear_cross_entropy`` as it
  comes and with ``LinearCrossEntropyOptions`` (its chunked path): torch's own fused CE, where
  this torch has it (torch 2.11 has neither).
- ``Liger fused linear CE``: ``LigerFusedLinearCrossEntropyLoss``, the fused CE that
  transformers' ``use_liger_kernel`` plugs in; Triton, so CUDA only.

A row that cannot run here is listed with why (not in this torch, not installed, needs CUDA), and
one that fails with its error. Which kernel is fastest decides the ratio a user should read in
``benchmarks/overhead.py`` (docs/fd.md). ``compare`` is also ``gpu_check.py``'s ``fused_ce``
check; torch is imported inside the functions, so that a driver importing ``table`` stays light.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

DENSE, FISHERTUNE, LIGER = "dense CE", "fishertune linear_scored_ce", "Liger fused linear CE"
TORCH_REFERENCE = "torch linear_cross_entropy, reference"
TORCH_CHUNKED = "torch linear_cross_entropy, chunked"
# fishertune's loss against the dense CE's, relative: past it the kernel is wrong
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}


def _steps(hidden: Any, weight: Any, targets: Any, device: str) -> dict[str, Callable | str]:
    """Each row's forward (a summed CE), or why it is not measured here."""
    import torch.nn.functional as F

    from fishertune.vocab import linear_scored_ce

    steps: dict[str, Callable | str] = {
        DENSE: lambda: F.cross_entropy(hidden @ weight.T, targets, reduction="sum"),
        FISHERTUNE: lambda: linear_scored_ce(hidden, weight, targets)[0],
        TORCH_REFERENCE: "not in this torch",
        TORCH_CHUNKED: "not in this torch",
    }
    torch_ce = getattr(F, "linear_cross_entropy", None)
    if torch_ce is not None:
        steps[TORCH_REFERENCE] = lambda: torch_ce(hidden, weight, targets, reduction="sum")
        try:
            from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

            steps[TORCH_CHUNKED] = lambda: torch_ce(
                hidden, weight, targets, reduction="sum", options=LinearCrossEntropyOptions()
            )
        except ImportError:  # a torch without the chunked path
            pass
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as err:  # absent, or a build that does not import (Triton)
        absent = isinstance(err, ModuleNotFoundError) and err.name == "liger_kernel"
        steps[LIGER] = "not installed" if absent else _first(err)  # e.g. no triton
    else:
        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        steps[LIGER] = "needs CUDA" if device != "cuda" else lambda: liger(weight, hidden, targets)
    return steps


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300].replace("|", "/")


def _measure(step: Callable, leaves: list, device: str, dtype: str, repeats: int) -> dict:
    """Best forward and backward of ``repeats`` after a warm-up; its loss and CUDA peak."""
    import torch

    cuda = device == "cuda"

    def once() -> tuple[float, float]:
        for t in leaves:
            t.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, torch.bfloat16, enabled=dtype == "bf16"):
            loss = step()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, float(loss.detach())

    once()  # lazy initialization, kernel compilation (Triton), the allocator's first blocks
    for t in leaves:
        t.grad = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds, loss = min(once() for _ in range(repeats))
    row = {"seconds": seconds, "loss": loss}
    if cuda:
        row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def compare(
    rows: int, hidden: int, vocab: int, device: str = "cpu", dtype: str = "fp32", repeats: int = 3
) -> list[dict[str, Any]]:
    """One row a kernel: ``kernel`` and ``seconds``, ``x_dense``, ``x_fishertune``, ``loss``,
    ``peak_mb`` (CUDA), or ``None`` for those with a ``note`` saying why it was not measured."""
    import torch

    generator = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=generator).to(device).requires_grad_()
    w = (0.02 * torch.randn(vocab, hidden, generator=generator)).to(device).requires_grad_()
    targets = torch.randint(vocab, (rows,), generator=generator).to(device)
    results = []
    for name, step in _steps(h, w, targets, device).items():
        row: dict[str, Any] = {"kernel": name, "seconds": None, "loss": None, "peak_mb": None}
        if isinstance(step, str):
            row["note"] = step
        else:
            try:
                row.update(_measure(step, [h, w], device, dtype, repeats))
            except Exception as err:  # recorded; the other kernels still run
                row["note"] = _first(err)
        results.append(row)
    times = {row["kernel"]: row["seconds"] for row in results}
    for row in results:
        for key, base in (("x_dense", times[DENSE]), ("x_fishertune", times[FISHERTUNE])):
            row[key] = row["seconds"] / base if row["seconds"] and base else None
    return results


def table(results: list[dict[str, Any]]) -> list[str]:
    """``compare``'s rows as a Markdown table."""
    columns = (("seconds", ".4g"), ("x_dense", ".2f"), ("x_fishertune", ".2f"))
    columns += (("peak_mb", ".0f"), ("loss", ".7g"))
    lines = [
        "| kernel | s | x dense | x fishertune | peak MB | loss | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in results:
        cells = ["-" if row[k] is None else format(row[k], spec) for k, spec in columns]
        lines.append(f"| {row['kernel']} | {' | '.join(cells)} | {row.get('note', '')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = compare(args.rows, args.hidden, args.vocab, args.device, args.dtype, args.repeats)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} thread(s)"
    autocast = "bf16 autocast over float32" if args.dtype == "bf16" else "float32"
    print(f"N={args.rows} d={args.hidden} V={args.vocab} {autocast}, {args.device} ({where}), "
          f"torch {torch.__version__}\n")  # fmt: skip
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
