"""Named random streams of a training run, each seeded by a pure function of where it is used.

Torch only. Every random choice a training step makes comes from its own generator, seeded by
``(seed, optimizer step, micro-step, rank, stream)`` and nothing else: a resumed run (or a rerun
with the same seed) draws exactly what an uninterrupted one would, whatever ran before, and two
streams never share draws.
"""

from __future__ import annotations

import enum

import torch

__all__ = ["Stream", "stream_generator", "stream_seed"]


class Stream(enum.IntEnum):
    """What a generator is for. The values are part of the seeds: never renumber."""

    PENALTY_TARGETS = 0  # the penalty's draws y'
    NEFTUNE = 1  # NEFTune's embedding noise
    PENALTY_ROWS = 2  # the rows a penalty_fraction < 1 penalizes
    DROPOUT = 3  # the seed of the penalty's forwards (their dropout masks agree)


def stream_seed(seed: int, step: int, micro_step: int, rank: int, stream: Stream) -> int:
    """A seed in ``[0, 2^62)`` from ``(seed, step, micro_step, rank, stream)``: the polynomial
    ``sum_i key_i * 1000003^(4 - i)`` reduced modulo ``2^62`` (distinct for distinct keys while
    each part stays below 1000003)."""
    value = 0
    for part in (seed, step, micro_step, rank, int(stream)):
        value = (value * 1_000_003 + int(part)) % (2**62)
    return value


def stream_generator(
    device: torch.device, seed: int, step: int, micro_step: int, rank: int, stream: Stream
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by :func:`stream_seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, step, micro_step, rank, stream))
    return generator
