"""Run records that an interruption never leaves half written, readable by whoever may read
the folder; the lock that keeps one process per output folder."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError

# The records fishertune writes into a run folder, named here once for every reader and writer.
RUN_RECORD = "fishertune_run.json"  # a finished `fishertune train` run: settings and outcome
CHECKPOINT_RECORD = "fishertune_checkpoint.json"  # in checkpoint-N/: it is complete
RECORD_RESERVE = ".fishertune_run.reserve"  # space kept free for the run record's last word
RESERVE_BYTES = 256 * 1024  # a run record is a few kB: room for it many times over


def write_json_atomic(
    path: str | os.PathLike, payload: Any, *, sort_keys: bool = False, allow_nan: bool = True
) -> Path:
    """Write ``payload`` as JSON to a temporary file beside ``path``, then rename it over
    ``path``: readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the record from the team
        with os.fdopen(fd, "w") as file:
            json.dump(payload, file, indent=2, sort_keys=sort_keys, allow_nan=allow_nan)
            file.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def reserve_space(path: str | os.PathLike, size: int = RESERVE_BYTES) -> Path:
    """Allocate ``size`` bytes at ``path`` (real blocks, not a sparse file) for
    :func:`write_json_reserved` to free when the disk is full."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:  # a file system without fallocate: write the bytes
        os.write(fd, bytes(size))
    finally:
        os.close(fd)
    return path


def write_json_reserved(
    path: str | os.PathLike, payload: Any, reserve: str | os.PathLike, **options: Any
) -> Path:
    """:func:`write_json_atomic`; when that fails for lack of space (a full disk or quota, a
    file-size limit), free ``reserve`` (:func:`reserve_space`) and write again, so a run's
    record can still say how the run ended. Raises the ``OSError`` when that fails too."""
    try:
        return write_json_atomic(path, payload, **options)
    except OSError:
        if not Path(reserve).is_file():
            raise
        Path(reserve).unlink()
        return write_json_atomic(path, payload, **options)


def read_json_record(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable (a record that is not
    there yet, or one written by an interrupted writer before records were atomic)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    # os.umask only reads the mask by setting it: set it back at once, one thread at a time
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


class FolderLock:
    """``with FolderLock(lock_path, what, folder):`` one process at a time on ``folder``.

    An exclusive, non-blocking ``flock`` on ``lock_path``, which holds the owner's PID and host
    so that a refused process can name it (``"another {what} (PID N on HOST) is running on
    {folder}..."``). The kernel drops the lock when its owner dies, however it dies (SIGKILL
    included), so a lock file left by a dead process is simply taken over. The file is removed
    on release; a process that opened it just before then finds, once it holds the lock, that
    the path now names another file (or none) and starts again on the new one.
    """

    def __init__(self, lock_path: str | os.PathLike, what: str, folder: str | os.PathLike) -> None:
        self.path = Path(lock_path)
        self.what = what
        self.folder = Path(folder)
        self._handle: Any = None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = self.path.open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().split()
                handle.close()
                who = f"PID {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
                raise FishertuneError(
                    f"another {self.what} ({who}) is running on {self.folder}; wait for it to "
                    f"end or stop it (its lock: {self.path})"
                ) from None
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()  # released and removed by its previous owner meanwhile: again
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self.path.unlink(missing_ok=True)  # while still held: see the class docstring
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
