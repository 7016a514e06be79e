"""The output projection's CE alone at a Llama-3 vocabulary: fishertune's fused kernel against
torch's ``F.linear_cross_entropy`` (its chunked path and its reference path) and the dense CE.

    python benchmarks/fused_ce.py       # (1024, 256) x (128256, 256), float32, 1 thread
    python benchmarks/fused_ce.py --rows 512 --repeats 5

Forward and backward of the summed CE of ``z = h W^T`` at ``N`` positions, best of ``--repeats``,
each as a ratio to the dense CE (``F.cross_entropy(h @ W.T)``), side by side in one run. Which
baseline kernel is fastest on a machine decides the ratio a user should read in
``benchmarks/overhead.py`` (docs/fd.md). fishertune's kernel (``vocab.linear_scored_ce``) also
returns the step's entropy and accuracy; torch's returns the CE alone.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _time(
    step: Callable[[], torch.Tensor], tensors: list[torch.Tensor], repeats: int
) -> tuple[float, float]:
    best, value = float("inf"), float("nan")
    for _ in range(repeats):
        for t in tensors:
            t.grad = None
        start = time.perf_counter()
        loss = step()
        loss.backward()
        best = min(best, time.perf_counter() - start)
        value = float(loss)
    return best, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from fishertune.vocab import linear_scored_ce

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.hidden, generator=generator).requires_grad_()
    weight = (0.02 * torch.randn(args.vocab, args.hidden, generator=generator)).requires_grad_()
    targets = torch.randint(args.vocab, (args.rows,), generator=generator)
    steps: dict[str, Callable[[], torch.Tensor]] = {
        "dense CE": lambda: F.cross_entropy(hidden @ weight.T, targets, reduction="sum"),
        "fishertune linear_scored_ce": lambda: linear_scored_ce(hidden, weight, targets)[0],
        "torch linear_cross_entropy, reference": lambda: F.linear_cross_entropy(
            hidden, weight, targets, reduction="sum"
        ),
    }
    try:
        from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

        steps["torch linear_cross_entropy, chunked"] = lambda: F.linear_cross_entropy(
            hidden, weight, targets, reduction="sum", options=LinearCrossEntropyOptions()
        )
    except ImportError:  # a torch without the chunked path
        pass
    results = {name: _time(step, [hidden, weight], args.repeats) for name, step in steps.items()}
    dense = results["dense CE"][0]
    print(f"N={args.rows} d={args.hidden} V={args.vocab} float32, {args.threads} thread(s), "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"{'kernel':40s} {'best s':>8s} {'x dense':>8s}  value")
    for name, (seconds, value) in results.items():
        print(f"{name:40s} {seconds:8.2f} {seconds / dense:8.2f}  {value:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
