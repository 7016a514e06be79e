"""Shared fixtures: a small chat dataset in the Tulu 3 format."""

from __future__ import annotations

import json
from pathlib import Path

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
