"""Keeping other programs' noise off the user's terminal.

Libraries sometimes run child processes whose stderr is inherited from ours: lm-eval runs
``git describe`` on every evaluation, which prints "fatal: not a git repository" outside a git
checkout. No Python-level setting reaches a child's stderr, so :func:`child_stderr_captured`
points file descriptor 2 elsewhere for the duration, while Python's own ``sys.stderr`` (progress
bars, our messages) keeps writing to the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["LIBRARY_LOGGERS", "child_stderr_captured"]

# Libraries that attach their own terminal handler to their logger (and stop propagation):
# the demo quiets them, `fishertune train` sends them to its train.log too.
LIBRARY_LOGGERS = ("transformers", "datasets", "trl", "accelerate", "peft", "torch")

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def child_stderr_captured() -> Iterator[None]:
    """Capture what child processes and C code write to stderr during the block.

    On success the captured text goes to this module's logger at DEBUG level (nothing on the
    terminal); if the block raises, it is written to the terminal before the exception
    propagates, so nothing that explains a failure is lost. Python code inside the block still
    writes to the terminal through ``sys.stderr``, except logging handlers created earlier on
    the old stream, whose records are captured likewise.
    """
    try:
        terminal = os.dup(2)
    except OSError:  # no stderr at all: nothing to protect
        yield
        return
    sys.stderr.flush()
    python_stderr = sys.stderr
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, encoding="utf-8")
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = python_stderr
            os.dup2(terminal, 2)
            os.close(terminal)
            sink.seek(0)
            captured = sink.read().decode("utf-8", errors="replace")
            if captured and failed:
                python_stderr.write(captured)
                python_stderr.flush()
            elif captured:
                logger.debug("stderr of child processes: %s", captured.rstrip())
