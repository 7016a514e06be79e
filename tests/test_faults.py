"""Faults at the edges of a `fishertune train` run: signals at every stage, a full disk, a
read-only folder, a second trainer on the same folder.

Signals are real: in-process runs send themselves SIGTERM or SIGINT at an exact point (at the
start, in a training step, inside a checkpoint save, inside the final save) through the
handlers `fishertune` installs; a subprocess gets Ctrl-C from outside while a second trainer is
refused its folder. Whoever sends SIGINT sets its handler first (in this process, or in the child
before it starts): a suite started as a background job of a non-interactive shell inherits SIGINT
ignored, and fishertune keeps an inherited ignore. A full disk is a small tmpfs mounted in a
private mount namespace (`unshare`); where the machine cannot make one, a file-size limit
(RLIMIT_FSIZE) stands in for it.

What every case checks: one line on stderr and the exit status a script reads (130, 143, 1 or
2), a run record that tells the truth, and a resume that reaches the uninterrupted run's weights
bit for bit without a step past max_steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fishertune.cli import main as cli_main
from fishertune.files import RECORD_RESERVE, RUN_RECORD
from fishertune.training import cli as train_cli
from fishertune.training.trainer import FisherSFTTrainer
from test_trainer import base_args

RUN = {"method": "token-f", "penalty_coef": 0.05, "penalty_warmup_steps": 0, "max_steps": 3,
       "save_strategy": "steps", "save_steps": 1}  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": str(Path(__file__).parents[1] / "src")}  # fmt: skip


def record(folder: Path) -> dict:
    return json.loads((folder / RUN_RECORD).read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def last_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def straight(chat_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed one must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert cli_main(["train", *base_args(chat_file, out, **RUN)]) == 0
    return out


def _signal_once(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, sig: int,
                 when: callable, before: bool = False) -> None:  # fmt: skip
    """Patch ``owner.name`` to send this process ``sig`` (after the call, or ``before`` it)
    the first time ``when(self, *args, **kwargs)`` holds."""
    original = getattr(owner, name)
    sent = []

    def patched(self, *args, **kwargs):
        fire = not sent and when(self, *args, **kwargs)
        if fire and before:
            sent.append(sig)
            os.kill(os.getpid(), sig)
        result = original(self, *args, **kwargs)
        if fire and not before:
            sent.append(sig)
            os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(owner, name, patched)


def _in_step_2(self, model, *args, **kwargs) -> bool:
    return model.training and self.state.global_step == 1


def _saving_checkpoint_2(self, *args, **kwargs) -> bool:
    return self.state.global_step == 2


def _always(self, *args, **kwargs) -> bool:
    return True


# point: (trainer method that sends the signal, when, the latest complete checkpoint after it)
POINTS = {
    "mid-step": ("compute_loss", _in_step_2, 1),
    "mid-checkpoint": ("_save_optimizer_and_scheduler", _saving_checkpoint_2, 1),
    "mid-final-save": ("save_state", _always, 3),
}


@pytest.mark.parametrize(
    "point, sig",
    [("mid-step", signal.SIGTERM), ("mid-checkpoint", signal.SIGTERM),
     ("mid-final-save", signal.SIGTERM), ("mid-final-save", signal.SIGINT)],
)  # fmt: skip
def test_a_stop_anywhere_is_recorded_and_the_resume_is_the_straight_run(
    chat_file, tmp_path, capsys, monkeypatch, straight, point, sig
):
    _stop_and_resume(chat_file, tmp_path, capsys, monkeypatch, straight, point, sig)


def test_the_ctrl_c_cases_hold_when_sigint_is_inherited_ignored(
    chat_file, tmp_path, capsys, monkeypatch, straight
):
    """A process started as a background job of a non-interactive shell (as some CI runners
    start the suite) inherits SIGINT ignored; the tests that send it set its handler themselves."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _stop_and_resume(chat_file, tmp_path, capsys, monkeypatch, straight,
                         "mid-final-save", signal.SIGINT)  # fmt: skip
        # a child inherits the ignore too, unless it is started as the Ctrl-C tests start theirs
        child = subprocess.Popen([sys.executable, "-c", "print('ready', flush=True); input()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 preexec_fn=_ctrl_c_interrupts)  # fmt: skip
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGINT)
        try:
            assert child.wait(timeout=30) == -signal.SIGINT  # KeyboardInterrupt, uncaught
        finally:
            child.kill()
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt for the block, as it does in a process started from a
    terminal. One started as a background job of a non-interactive shell inherits SIGINT
    ignored, which fishertune rightly keeps: a test that sends SIGINT sets the handler itself."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_interrupts() -> None:
    """``preexec_fn`` of a child a test sends SIGINT: the default disposition, whatever this
    process inherited (Python then installs its KeyboardInterrupt handler in the child)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_and_resume(chat_file, tmp_path, capsys, monkeypatch, straight, point, sig) -> None:
    name, when, checkpoint = POINTS[point]
    out = tmp_path / "run"
    argv = ["train", *base_args(chat_file, out, **RUN)]
    with monkeypatch.context() as patch, _ctrl_c_raises():
        _signal_once(patch, FisherSFTTrainer, name, sig, when)
        status = cli_main(argv)
    expected = {signal.SIGTERM: (143, "terminated (SIGTERM)"),
                signal.SIGINT: (130, "interrupted (Ctrl-C)")}[sig]  # fmt: skip
    err = capsys.readouterr().err
    assert status == expected[0] and last_error_line(err) == f"error: {expected[1]}"
    assert "Traceback" not in err
    stopped = record(out)
    assert stopped["status"] == "failed" and stopped["error"] == expected[1]
    assert train_cli.latest_checkpoint(out).name == f"checkpoint-{checkpoint}"
    assert not (out / RECORD_RESERVE).exists()
    assert cli_main([*argv, "--resume", "true"]) == 0
    resumed = record(out)
    assert resumed["status"] == "completed" and resumed["global_step"] == 3
    assert not (out / "checkpoint-4").exists()
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"]["train_loss"] == pytest.approx(
        record(straight)["metrics"]["train_loss"], rel=1e-12
    )


def test_ctrl_c_while_loading_leaves_nothing_behind(chat_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    build = train_cli.build_trainer

    def interrupted(*args, **kwargs):
        trainer = build(*args, **kwargs)  # the model and data are loaded
        os.kill(os.getpid(), signal.SIGINT)
        return trainer

    monkeypatch.setattr(train_cli, "build_trainer", interrupted)
    with _ctrl_c_raises():
        assert cli_main(["train", *base_args(chat_file, out, **RUN)]) == 130
    assert last_error_line(capsys.readouterr().err) == "error: interrupted (Ctrl-C)"
    # transformers makes the (empty) folder when the trainer is built; no lock, no staging
    assert not list(out.rglob("*")) and not list(tmp_path.glob(".run.*"))


def test_record_modes_follow_the_umask(chat_file, tmp_path):
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        assert cli_main(["train", *base_args(chat_file, out, max_steps=1)]) == 0
    finally:
        os.umask(previous)
    assert (out / RUN_RECORD).stat().st_mode & 0o777 == 0o644


def _wait_for(condition: callable, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise AssertionError(process.communicate()[0][-3000:])
        time.sleep(0.1)


def test_a_second_trainer_is_refused_and_ctrl_c_ends_the_first(chat_file, tmp_path, capsys):
    """Two trainers on one folder: the second is refused in one line naming the first's PID
    (before it reads anything); Ctrl-C then stops the first with status 130, its record says so,
    and its lock no longer blocks anyone."""
    out = tmp_path / "run"
    argv = base_args(chat_file, out, max_steps=100000)
    first = subprocess.Popen(
        [sys.executable, "-m", "fishertune", "train", *argv],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_ctrl_c_interrupts,
    )  # fmt: skip
    try:
        _wait_for(lambda: (out / RUN_RECORD).is_file(), first)  # training has started
        assert cli_main(["train", *argv, "--resume", "true"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"another fishertune train (PID {first.pid} on " in err
        first.send_signal(signal.SIGINT)
        output = first.communicate(timeout=60)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, output[-3000:]
    assert last_error_line(output) == "error: interrupted (Ctrl-C)" and "Traceback" not in output
    assert record(out)["status"] == "failed" and record(out)["error"] == "interrupted (Ctrl-C)"
    assert not (tmp_path / ".run.lock").exists()


def test_a_lock_left_by_a_killed_trainer_is_taken_over(chat_file, tmp_path):
    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (tmp_path / ".run.lock").write_text(f"{dead} somehost\n")  # no process holds its flock
    assert cli_main(["train", *base_args(chat_file, out, max_steps=1)]) == 0


def _private_mounts() -> str | None:
    """Why this machine cannot mount a tmpfs in a private mount namespace (None: it can)."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    flags = "-m" if os.geteuid() == 0 else "-rm"
    probe = subprocess.run(["unshare", flags, "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, text=True)  # fmt: skip
    return None if probe.returncode == 0 else f"unshare {flags} + mount: {probe.stderr.strip()}"


def _train_in(mount: Path, options: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``fishertune train argv`` with a tmpfs (mount ``options``) at ``mount``, private to it;
    what the run left there is copied to ``mount``-copy (the tmpfs goes with the namespace)."""
    mount.mkdir()
    flags = "-m" if os.geteuid() == 0 else "-rm"
    train = shlex.join([sys.executable, "-m", "fishertune", "train", *argv])
    command = (f"mount -t tmpfs -o {options} tmpfs {mount} || exit 99; {train}; status=$?; "
               f"cp -r {mount} {mount}-copy; exit $status")  # fmt: skip
    return subprocess.run(["unshare", flags, "sh", "-c", command], env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _limited_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))


def test_a_full_disk_is_one_line_and_a_true_record(chat_file, tmp_path):
    """Checkpoints fill the disk (a 3 MB tmpfs holds about two of this model's): status 1, one
    line, and the record says failed (its reserve freed for it) with that line."""
    disk = tmp_path / "disk"
    argv = base_args(chat_file, disk / "run", **{**RUN, "max_steps": 50})
    if _private_mounts() is None:
        done = _train_in(disk, "size=3m", argv)
        left = tmp_path / "disk-copy" / "run"
    else:  # a file-size limit stands in for the full disk: saving a checkpoint fails (EFBIG)
        disk.mkdir()
        done = subprocess.run([sys.executable, "-m", "fishertune", "train", *argv], env=ENV,
                              capture_output=True, text=True, timeout=300,
                              preexec_fn=_limited_file_size)  # fmt: skip
        left = disk / "run"
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = last_error_line(done.stderr)
    assert line.startswith("error: ") and ("full" in line or "too large" in line), line
    written = record(left)
    assert written["status"] == "failed" and written["error"] == line.removeprefix("error: ")
    assert written["global_step"] >= 1 and train_cli.latest_checkpoint(left) is not None


def test_a_read_only_output_folder_is_refused_in_one_line(chat_file, tmp_path):
    why_not = _private_mounts()
    if why_not is not None and os.geteuid() == 0:
        pytest.skip(f"no read-only folder possible: root ignores modes and {why_not}")
    folder = tmp_path / "ro"
    argv = base_args(chat_file, folder / "run")
    if why_not is None:
        done = _train_in(folder, "ro,size=1m", argv)
    else:
        folder.mkdir(mode=0o555)
        done = subprocess.run([sys.executable, "-m", "fishertune", "train", *argv], env=ENV,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and "is not writable" in done.stderr, done.stderr
