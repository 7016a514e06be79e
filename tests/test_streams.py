"""Named random streams: one pure seed function of (seed, step, micro-step, rank, stream)."""

from __future__ import annotations

import itertools

import torch

from fishertune.streams import Stream, stream_generator, stream_seed


def test_seeds_are_the_documented_polynomial():
    """``sum_i key_i 1000003^(4 - i) mod 2^62``, written out here: the seeds runs were trained
    with (changing them changes every run's draws)."""
    p = 1_000_003
    for key in [(0, 0, 0, 0, 0), (42, 7, 3, 1, 2), (123456, 99999, 15, 7, 3)]:
        seed, step, micro, rank, stream = key
        expected = (seed * p**4 + step * p**3 + micro * p**2 + rank * p + stream) % 2**62
        assert stream_seed(seed, step, micro, rank, Stream(stream)) == expected
    assert [int(s) for s in Stream] == [0, 1, 2, 3]


def test_streams_differ_and_repeat():
    keys = itertools.product([0, 1], [0, 5], [0, 1], [0, 1], list(Stream))
    seeds = [stream_seed(*key) for key in keys]
    assert len(set(seeds)) == len(seeds)
    draw = [
        torch.rand(3, generator=stream_generator(torch.device("cpu"), 1, 2, 3, 0, stream))
        for stream in (Stream.PENALTY_TARGETS, Stream.PENALTY_TARGETS, Stream.NEFTUNE)
    ]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
