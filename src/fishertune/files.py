"""Writing run records so that an interruption never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# The records fishertune writes into a run folder, named here once for every reader and writer.
RUN_RECORD = "fishertune_run.json"  # a finished `fishertune train` run: settings and outcome
CHECKPOINT_RECORD = "fishertune_checkpoint.json"  # in checkpoint-N/: it is complete


def write_json_atomic(
    path: str | os.PathLike, payload: Any, *, sort_keys: bool = False, allow_nan: bool = True
) -> Path:
    """Write ``payload`` as JSON to a temporary file beside ``path``, then rename it over
    ``path``: readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(payload, file, indent=2, sort_keys=sort_keys, allow_nan=allow_nan)
            file.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json_record(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable (a record that is not
    there yet, or one written by an interrupted writer before records were atomic)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
