"""Shared fixtures: a small chat dataset in the Tulu 3 format.

The suite runs with one intra-op thread per process unless ``OMP_NUM_THREADS`` says otherwise:
many tests start training subprocesses, and two-thread processes on a 2-core machine contend
(8 min 10 s for the default suite against 4 min 58 s with one thread, same machine). Results do
not depend on it: every float comparison holds across thread counts and kernel sets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, children inherit it

import pytest

TOPICS = ["apples", "rivers", "stars", "clocks", "maps", "songs", "bridges", "gardens"]


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 two-turn conversations with a `source` (odd/even) column, as JSONL."""
    return write_chat_file(tmp_path_factory.mktemp("data") / "chat.jsonl")


def write_chat_file(path: Path) -> Path:
    """Writes the :func:`chat_file` conversations to ``path``."""
    rows = []
    for i in range(48):
        topic = TOPICS[i % len(TOPICS)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"say something about {topic} number {i}"},
                    {"role": "assistant", "content": f"{topic} are nice, {i} times over"},
                ],
                "source": "odd" if i % 2 else "even",
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
