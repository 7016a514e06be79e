"""Stages forked from a process that has already imported torch, transformers and fishertune.

A grid of many short runs on a CPU spends much of its time importing: every ``python -m
fishertune.cli train`` (and ``evaluate``, and the ``measure`` stage) loads torch, transformers, TRL
and datasets again, several seconds each on a busy machine. ``fishertune experiment --preload``
starts one server process (``python -m fishertune.experiments.preload SOCKET``) that imports
them once and then forks a child per stage; the child behaves like the subprocess the local
launcher would have started: its own session (process group), the stage's environment added, its
output appended to the stage's log, ``MODULE.main(ARGS)`` run, its exit status sent back.

Only ``python -m MODULE ARGS`` commands of fishertune's own modules go through the server; any
other command (``accelerate launch``) runs as a plain subprocess. Forking is safe here because
the server never runs torch code: thread pools are created lazily, in the child, after
``OMP_NUM_THREADS`` is set from the stage's environment.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

__all__ = ["PRELOADED", "PreloadedLauncher", "main"]

# What the server imports before it forks (the modules the stages' commands run, and their
# heavy dependencies).
PRELOADED = (
    "torch",
    "transformers",
    "trl",
    "datasets",
    "fishertune.cli",
    "fishertune.training.cli",
    "fishertune.evaluation.cli",
    "fishertune.analysis.cli",
    "fishertune.analysis.measure",
)


def _read_line(stream: Any) -> dict[str, Any] | None:
    """The next JSON message of a socket's ``makefile("rb")`` (``None`` once it is closed)."""
    line = stream.readline()
    return json.loads(line) if line.endswith(b"\n") else None


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


def _child(conn: socket.socket) -> int:
    """In the forked child: become the stage (see the module docstring)."""
    request = _read_line(conn.makefile("rb"))
    if request is None:
        return 1
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    _send(conn, {"pid": os.getpid()})
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdout.reconfigure(line_buffering=True)
    os.environ.update(request["env"])
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    module, argv = request["module"], request["argv"]
    sys.argv = [module, *argv]
    try:
        code = importlib.import_module(module).main(argv)
        code = int(code or 0)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except Exception as err:  # the stage's failure: reported in its log like a crashed process
        from fishertune.errors import FishertuneError

        if isinstance(err, FishertuneError):
            print(f"error: {err}", file=sys.stderr)
            code = 2
        else:
            traceback.print_exc()
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(OSError):
        _send(conn, {"code": code})
    return code


def main(argv: list[str] | None = None) -> int:
    """The server: ``python -m fishertune.experiments.preload SOCKET``."""
    (path,) = sys.argv[1:] if argv is None else argv
    for name in PRELOADED:
        importlib.import_module(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        pid = os.fork()
        if pid == 0:
            server.close()
            code = 1
            try:
                code = _child(conn)
            finally:
                os._exit(code)
        conn.close()


class PreloadedLauncher:
    """A launcher (``launcher(command, log_path, env) -> status``) that runs ``python -m
    fishertune...`` stages as children of a preloaded server; :meth:`close` stops the server.

    Args:
        env: the server's added environment (the grid's ``env:``, e.g. ``OMP_NUM_THREADS``).
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="fishertune-preload-")
        self._socket = str(Path(self._dir) / "server.sock")
        self._server = subprocess.Popen(
            [sys.executable, "-m", "fishertune.experiments.preload", self._socket],
            stdout=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            text=True,
        )
        assert self._server.stdout is not None
        line = self._server.stdout.readline()
        if line.strip() != "ready":
            self.close()
            from fishertune.errors import FishertuneError

            raise FishertuneError("--preload: the preloading server did not start")
        self._lock = threading.Lock()
        self._groups: set[int] = set()

    def __call__(self, command: list[str], log_path: Path, env: dict[str, str]) -> int:
        from fishertune.experiments.processes import (
            STOPPING,
            register_group,
            subprocess_launcher,
            unregister_group,
        )

        if command[:2] != [sys.executable, "-m"] or not command[2].startswith("fishertune."):
            return subprocess_launcher(command, log_path, env)
        from fishertune.experiments.commands import format_command

        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log:
            log.write(f"\n$ {format_command(command, env)}\n")
            if STOPPING.is_set():
                log.write("not started: the runner is stopping\n")
                return -int(signal.SIGTERM)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self._socket)
        pid = None
        try:
            _send(conn, {"module": command[2], "argv": command[3:], "log": str(log_path),
                         "env": dict(env)})  # fmt: skip
            replies = conn.makefile("rb")
            started = _read_line(replies)
            if started is None:
                return 1
            pid = int(started["pid"])
            register_group(pid)
            done = _read_line(replies)
            if done is None:  # killed before it could answer
                return -int(signal.SIGTERM) if STOPPING.is_set() else 1
            return int(done["code"])
        except BaseException:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            raise
        finally:
            if pid is not None:
                unregister_group(pid)
            conn.close()

    def close(self) -> None:
        """Stop the server (children still running are the runner's to stop)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._server.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.unlink(self._socket)
            os.rmdir(self._dir)


if __name__ == "__main__":
    sys.exit(main())
