"""Errors that reach the user as one clear line."""

from __future__ import annotations


class FishertuneError(ValueError):
    """Bad input or configuration; the message names the file, line or field at fault.

    The CLI prints ``error: <message>`` and exits with status 2 instead of a traceback.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's multi-line one."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
