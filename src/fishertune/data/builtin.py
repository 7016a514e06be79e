"""The built-in data sets: their names, and the cache they are generated into on first use.

Both the reader (:mod:`fishertune.data.readers`, which resolves a source name) and the loaders
(:mod:`fishertune.data.chat`) need them; kept here, below both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fishertune.errors import FishertuneError

__all__ = ["BUILTIN_TINY_TASKS", "check_builtin", "tiny_tasks_dir"]

BUILTIN_TINY_TASKS = "builtin:tiny-tasks"


def _cache_root() -> Path:
    return Path(os.environ.get("FISHERTUNE_CACHE") or "~/.cache/fishertune").expanduser()


def tiny_tasks_dir() -> Path:
    """Directory of the built-in offline tasks, generated on first use.

    ``$FISHERTUNE_CACHE/tiny-tasks-<version>`` (default ``~/.cache/fishertune``), holding
    ``train.jsonl`` (2000), ``validation.jsonl`` (200) and ``test.jsonl`` (200) from
    ``write_tiny_tasks(seed=0)``. Written to a temporary folder and renamed, so processes that
    start together (one per GPU) never read a half-written file.
    """
    from fishertune.data.tasks import SPLITS, TASKS_VERSION, write_tiny_tasks

    target = _cache_root() / f"tiny-tasks-{TASKS_VERSION}"
    if all((target / f"{split}.jsonl").is_file() for split in SPLITS):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-tasks-", dir=target.parent))
    try:
        write_tiny_tasks(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its copy first (the target is not empty): use that one.
            if not all((target / f"{split}.jsonl").is_file() for split in SPLITS):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_builtin(source: str, split: str) -> None:
    """A built-in dataset name and split that exist, or one line naming the ones that do."""
    from fishertune.data.tasks import SPLITS

    if source != BUILTIN_TINY_TASKS:
        raise FishertuneError(f"unknown built-in dataset {source!r} (known: {BUILTIN_TINY_TASKS})")
    if split not in SPLITS:
        raise FishertuneError(
            f"{BUILTIN_TINY_TASKS} has no split {split!r} (splits: {', '.join(SPLITS)})"
        )
