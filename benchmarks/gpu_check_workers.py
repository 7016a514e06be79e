"""``gpu_check.py``'s worker processes, driver side: each job runs in its own process
(``gpu_check.py --worker JSON``) and answers on stdout in ``RESULT`` lines; the shared time
budget; each check's outcome recorded without stopping the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

RESULT = "RESULT "  # prefix of a worker's answer lines on stdout
ENTRY = Path(__file__).resolve().with_name("gpu_check.py")  # what a worker process runs


# Each job runs in its own process (``--worker``): a crash, an OOM or a hung kernel in one
# costs only that job, each process's CUDA peak is its own, and the driver never holds a CUDA
# context that would take memory from the measurements.
def emit(reply: TextIO, payload: Any) -> None:
    print(RESULT + json.dumps(payload), file=reply, flush=True)


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:500]


class Budget:
    """Wall-clock budget shared by all checks."""

    def __init__(self, seconds: float) -> None:
        self.start = time.time()
        self.end = self.start + seconds

    def left(self, until: float | None = None) -> float:
        return max(0.0, min(self.end, until or self.end) - time.time())


class WorkerError(RuntimeError):
    pass


def worker_env(options: dict[str, Any]) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    # the batch search runs near the memory limit: expandable segments keep fragmentation from
    # failing a batch that fits
    env.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    if options["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(options["threads"])
    return env


def run_worker(options: dict[str, Any], job: dict[str, Any], timeout: float) -> list[Any]:
    """Run one worker job; its answers, also those given before a crash or the timeout.

    Raises ``WorkerError`` (with the end of its stderr) when it gave no answer or failed."""
    if timeout <= 1:
        raise WorkerError("time budget spent before it could start")
    command = [sys.executable, str(ENTRY), "--worker"]
    command.append(json.dumps({"job": job, "options": options}))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=worker_env(options)
        )
        stdout, stderr, failure = done.stdout, done.stderr, done.returncode != 0
        reason = f"exit status {done.returncode}"
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else err.stderr or ""
        failure, reason = True, f"stopped by the time budget after {timeout:.0f} s"
    answers = [
        json.loads(line[len(RESULT) :]) for line in stdout.splitlines() if line.startswith(RESULT)
    ]
    if failure:
        error = WorkerError(f"worker {job['type']}: {reason}; stderr ends:\n{stderr[-3000:]}")
        error.answers = answers  # type: ignore[attr-defined]
        raise error
    return answers


def run_check(name: str, function: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    started = time.time()
    try:
        result = function()
        ok, error = bool(result.pop("ok")), result.pop("error", None)
    except Exception as err:  # recorded; the other checks still run
        result, ok = {}, False
        error = str(err) if isinstance(err, WorkerError) else traceback.format_exc()[-3000:]
    wall = time.time() - started
    return {"ok": ok, "error": error, "wall_s": wall, "result": result, "skipped": False}
