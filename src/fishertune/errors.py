"""Errors that reach the user as one clear line."""

from __future__ import annotations

import os
import shutil


class FishertuneError(ValueError):
    """Bad input or configuration; the message names the file, line or field at fault.

    The CLI prints ``error: <message>`` and exits with status 2 instead of a traceback.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's multi-line one."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), as a shell reports it
TERMINATED = 143  # after SIGTERM (128 + SIGTERM), which the commands turn into SystemExit(143)

# Text of the write errors that libraries raise without an OSError on a full disk or a
# file-size limit: torch.save's RuntimeErrors (seen: "basic_ios::clear: iostream error", then
# "[enforce fail at inline_container.cc] . unexpected pos", or "PytorchStreamWriter failed
# writing file ...: file write failed") and safetensors' SafetensorError ("... (os error 28)").
_WRITE_FAILURES = (
    "file write failed",
    "PytorchStreamWriter failed",
    "iostream error",
    "unexpected pos",
    "os error",
)
_FULL_BELOW = 1 << 20  # bytes free under which a folder's disk counts as full


def describe_fault(
    err: BaseException, folder: str | os.PathLike | None = None
) -> tuple[str, int] | None:
    """``(one line, exit status)`` for a stop that is not a bug: Ctrl-C (130), SIGTERM (143),
    and faults of the machine rather than the code (1): an ``OSError`` (full disk, read-only
    folder, missing permission), also when a library wrapped it, and the write and format
    errors of torch and safetensors. ``None`` for anything else (a bug: its traceback matters).

    With ``folder`` (where the command was writing), a fault while its disk is full says so
    first: torch's own words for it ("unexpected pos ...") do not.
    """
    fault = _fault(err)
    if fault is None or fault[1] != 1 or folder is None:
        return fault
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return fault
    if free < _FULL_BELOW:
        return f"the disk holding {folder} is full: {fault[0]}", 1
    return fault


def _fault(err: BaseException) -> tuple[str, int] | None:
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)", INTERRUPTED
    if isinstance(err, SystemExit):
        return ("terminated (SIGTERM)", TERMINATED) if err.code == TERMINATED else None
    seen: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    for link in seen:
        if isinstance(link, OSError):
            where = (
                f" ({link.filename})"
                if link.filename and str(link.filename) not in str(link)
                else ""
            )
            return f"{first_line(link)}{where}", 1
    for link in seen:
        text = str(link)
        if type(link).__name__ == "SafetensorError" or any(w in text for w in _WRITE_FAILURES):
            return first_line(link), 1
    return None
