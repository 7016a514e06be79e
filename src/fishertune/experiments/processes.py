"""A run's stages as child processes: each in its own process group, its output appended to the
stage's log, and every one of them killed when the launcher is stopped (Ctrl-C, SIGTERM, a SLURM
preemption), so that no training outlives the runner or the job that started it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from fishertune.experiments.commands import format_command

__all__ = [
    "Launcher",
    "allow_children",
    "register_group",
    "stop_children",
    "subprocess_launcher",
    "unregister_group",
]

Launcher = Callable[[list[str], Path, dict[str, str]], int]
"""``launcher(command, log_path, env) -> return code``: runs one stage of one run, with the
experiment's ``env`` added to the environment."""

# Children of this process that are running now, so that stopping the runner (from any thread's
# point of view) can kill each one's process group; set when the runner is being stopped, so that
# no new child starts after that.
_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()
STOPPING = threading.Event()
# Process groups of children started by other means (the preloading server's forks).
_GROUPS: set[int] = set()


def register_group(pgid: int) -> None:
    """Have :func:`stop_children` kill the process group ``pgid`` too (a stage that is not a
    ``Popen`` of this process)."""
    with _CHILDREN_LOCK:
        _GROUPS.add(pgid)


def unregister_group(pgid: int) -> None:
    with _CHILDREN_LOCK:
        _GROUPS.discard(pgid)


def _kill_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group (an ``accelerate launch`` and its workers), then SIGKILL
    what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            # the group leader is gone; workers it left behind still share its group id
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def allow_children() -> None:
    """Let children start again after :func:`stop_children` (a launcher's start)."""
    STOPPING.clear()


def stop_children() -> None:
    """Kill the process group of every running child and start no new one (until
    :func:`allow_children`)."""
    STOPPING.set()
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
        groups = list(_GROUPS)
    for child in children:
        _kill_group(child)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


def _ignore_preemption_signal() -> None:
    # In a SLURM job the preemption / time-limit signal (USR2, submitit's) reaches every process
    # of the job step; only the job's own handler should act on it (it stops the child and
    # requeues), so children inherit an ignored disposition (kept across exec).
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def subprocess_launcher(
    command: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    *,
    ignore_preemption_signal: bool = False,
) -> int:
    """Run ``command`` with ``env`` added to the environment and its output appended to
    ``log_path``; return its exit status.

    The child runs in its own session (process group): when this call is interrupted (Ctrl-C,
    SIGTERM turned into an exception, ``SystemExit`` from a signal handler) or
    :func:`stop_children` is called, the whole group is terminated, so no training outlives the
    runner that started it. ``ignore_preemption_signal`` (inside a SLURM job, which has no other
    threads: ``preexec_fn`` is unsafe with threads) makes the child ignore USR2.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("a") as log:
        log.write(f"\n$ {format_command(command, env)}\n")
        log.flush()
        if STOPPING.is_set():
            log.write("not started: the runner is stopping\n")
            return -int(signal.SIGTERM)
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
            preexec_fn=_ignore_preemption_signal if ignore_preemption_signal else None,
        )
        with _CHILDREN_LOCK:
            _CHILDREN.add(process)
        try:
            return process.wait()
        except BaseException:
            _kill_group(process)
            raise
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(process)
