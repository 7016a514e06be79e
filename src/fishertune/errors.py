"""Errors that reach the user as one clear line."""

from __future__ import annotations


class FishertuneError(ValueError):
    """Bad input or configuration; the message names the file, line or field at fault.

    The CLI prints ``error: <message>`` and exits with status 2 instead of a traceback.
    """
