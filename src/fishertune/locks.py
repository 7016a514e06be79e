"""The folder lock that every process owning a folder holds (a trainer its output folder, a
runner its grid): ``.NAME.lock`` beside the folder (:class:`HeldFolder`), naming its PID. One
protocol, so a trainer cannot replace a live grid and a runner cannot start on a live trainer's
folder; the run folder's names and records are :mod:`fishertune.files`.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.files import MODEL_SUBDIR, RUNNER, RUNS_SUBDIR

HOLDER_RETRY_S = 0.5  # how long a lock attempt retries when it meets a passing probe


def folder_lock_path(folder: str | os.PathLike) -> Path:
    """``.NAME.lock`` beside ``folder``: where its holder (a trainer, a runner) is recorded. It
    is beside the folder, not in it, so it stays put when the folder is moved aside or deleted."""
    path = Path(folder).resolve()
    return path.parent / f".{path.name}.lock"


def lock_holder(lock_path: str | os.PathLike) -> str | None:
    """``"WHAT (PID N on HOST)"`` when a live process holds the lock at ``lock_path``, else
    ``None`` (no file, or a file left by a dead process). Takes a shared lock for an instant."""
    try:
        with Path(lock_path).open() as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _describe_holder(handle.read(), "another process")
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:  # no lock file (most folders), or one this user cannot read
        pass
    return None


def _describe_holder(content: str, what: str) -> str:
    fields = content.split(maxsplit=2)  # "PID HOST [WHAT]"
    what = fields[2].strip() if len(fields) == 3 else what
    return f"{what} (PID {fields[0]} on {fields[1]})" if len(fields) >= 2 else what


def _runner_stage(folder: Path, enclosing: Path) -> bool:
    """Whether ``folder`` is a run's training folder inside the grid ``enclosing``: where the
    runner's own ``fishertune train`` stages work (``runs/NAME/model``)."""
    relative = folder.relative_to(enclosing).parts
    return len(relative) == 3 and relative[0] == RUNS_SUBDIR and relative[2] == MODEL_SUBDIR


def check_enclosing_holders(folder: str | os.PathLike) -> None:
    """Refuse ``folder`` when a folder that encloses it is held by a live trainer or runner: its
    holder may move it aside or delete it. A run's training folder inside a runner's grid is
    the runner's own stage and allowed."""
    path = Path(folder).resolve()
    for enclosing in path.parents:
        holder = lock_holder(folder_lock_path(enclosing)) if enclosing.parent != enclosing else None
        if holder is None:
            continue
        if holder.startswith(RUNNER + " ") and _runner_stage(path, enclosing):
            continue
        raise FishertuneError(
            f"{path} is inside {enclosing}, where {holder} is running; wait for it to end or "
            f"stop it (its lock: {folder_lock_path(enclosing)})"
        )


def check_no_holders_inside(folder: str | os.PathLike, why: str) -> None:
    """Refuse to replace or delete ``folder`` (``why``: the option that would) when a live
    trainer or runner holds a folder inside it (its ``.NAME.lock``, :func:`folder_lock_path`).
    A holder that starts inside once the caller holds ``folder`` is refused by its own check
    (:func:`check_enclosing_holders`), so one walk before the deletion is enough."""
    path = Path(folder).resolve()
    for root, _, names in os.walk(path):
        for name in names:
            if not (name.startswith(".") and name.endswith(".lock")):
                continue
            holder = lock_holder(Path(root) / name)
            if holder is not None:
                held = Path(root) / name[1 : -len(".lock")]
                raise FishertuneError(
                    f"{why}: {path} holds {held}, where {holder} is running; wait for it to "
                    f"end or stop it (its lock: {Path(root) / name})"
                )


class FolderLock:
    """``with FolderLock(lock_path, what, folder):`` one process at a time on ``folder``.

    An exclusive, non-blocking ``flock`` on ``lock_path``, which holds the owner's PID, host and
    ``what`` so that a refused process can name it (``"another {what} (PID N on HOST) is running
    on {folder}..."``). The kernel drops the lock when its owner dies, however it dies (SIGKILL
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
        deadline = time.monotonic() + HOLDER_RETRY_S
        while True:
            handle = self.path.open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                content = handle.read()
                handle.close()
                if time.monotonic() < deadline:
                    # it may be a probe (lock_holder), which lets go at once: try again briefly
                    time.sleep(0.05)
                    continue
                who = _describe_holder(content, self.what)
                raise FishertuneError(
                    f"another {who} is running on {self.folder}; wait for it to end or stop it "
                    f"(its lock: {self.path})"
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
        handle.write(f"{os.getpid()} {socket.gethostname()} {self.what}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self.path.unlink(missing_ok=True)  # while still held: see the class docstring
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class HeldFolder(FolderLock):
    """``with HeldFolder(folder, what):`` the one protocol of every process that owns a folder
    (``fishertune train`` its output folder, ``fishertune experiment`` its grid): a
    :class:`FolderLock` on :func:`folder_lock_path`, refused while a live holder has the folder
    or one that encloses it (:func:`check_enclosing_holders`). The enclosing folders are
    checked before the lock is taken (a refusal leaves nothing behind) and again once it is
    held: a holder that starts meanwhile sees this one's lock and is refused in turn."""

    def __init__(self, folder: str | os.PathLike, what: str) -> None:
        path = Path(folder).resolve()
        super().__init__(folder_lock_path(path), what, path)

    def __enter__(self) -> HeldFolder:
        check_enclosing_holders(self.folder)
        super().__enter__()
        try:
            check_enclosing_holders(self.folder)
        except BaseException:
            self.__exit__()
            raise
        return self


def folder_lock(folder: str | os.PathLike, what: str) -> HeldFolder:
    """The lock ``what`` (``fishertune train``, ``fishertune experiment``) holds on ``folder``."""
    return HeldFolder(folder, what)


class RunnerLock(HeldFolder):
    """``with RunnerLock(output_dir):`` one runner per output directory, and no trainer on it
    or around it while it runs: the :class:`HeldFolder` protocol, as ``fishertune
    experiment``."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        super().__init__(output_dir, RUNNER)
