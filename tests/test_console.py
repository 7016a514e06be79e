"""Child processes' stderr kept off the terminal (lm-eval's `git describe` noise)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from fishertune.console import child_stderr_captured


def test_child_stderr_is_captured_and_python_stderr_is_not(tmp_path, capfd, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="fishertune.console")
    with child_stderr_captured():
        # the real source of the noise: git outside a repository
        subprocess.run(["git", "describe", "--always"], cwd=tmp_path, check=False)
        print("progress bar", file=sys.stderr)
    err = capfd.readouterr().err
    assert "not a git repository" not in err
    assert "progress bar" in err
    assert "not a git repository" in caplog.text  # kept at DEBUG, not lost
    # the terminal's stderr is back afterwards
    subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('after\\n')"], check=True)
    assert capfd.readouterr().err == "after\n"


def test_captured_stderr_is_shown_when_the_block_fails(capfd) -> None:
    with pytest.raises(subprocess.CalledProcessError), child_stderr_captured():
        subprocess.run(
            [sys.executable, "-c", "import sys; sys.stderr.write('why it failed\\n'); sys.exit(3)"],
            check=True,
        )
    assert "why it failed" in capfd.readouterr().err
