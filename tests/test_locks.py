"""One lock protocol for every process that owns a folder: ``fishertune train`` (its output
folder) and ``fishertune experiment`` (its grid folder). Each holds ``.NAME.lock`` beside its
folder; a trainer or runner is refused a folder held by a live one, a folder inside one (except a
run's ``model/`` inside a runner's grid: the runner's own stage), and ``--overwrite_output_dir``
is refused a folder with a live holder anywhere inside it. Holders here are real processes that
take the lock and wait, so a refusal must name their PID."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fishertune.cli import main as cli_main
from fishertune.errors import FishertuneError
from fishertune.experiments.experiment_file import parse_experiment
from fishertune.experiments.runner import run_experiment
from fishertune.files import STATUS_FILE
from fishertune.locks import RunnerLock
from fishertune.training.output_dir import output_lock
from test_experiments import FakeLauncher, experiment, write_yaml
from test_faults import ENV
from test_trainer import base_args

HOLD = """
import sys
from fishertune.locks import RunnerLock, folder_lock
kind, folder = sys.argv[1:]
lock = RunnerLock(folder) if kind == "runner" else folder_lock(folder, "fishertune train")
with lock:
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


@pytest.fixture
def holder() -> Iterator:
    started: list[subprocess.Popen] = []

    def hold(kind: str, folder: Path) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD, kind, str(folder)],
            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(process)
        assert process.stdout.readline() == "held\n"
        return process

    yield hold
    for process in started:
        process.stdin.close()
        process.wait(timeout=30)


@pytest.fixture
def base_config(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "base.yaml", {"method": "baseline", "max_steps": 10,
                                               "dataset_name": "builtin:tiny-tasks"})  # fmt: skip


def a_grid(folder: Path) -> Path:
    """What a runner has written into its folder by the time it trains its first run."""
    model = folder / "runs" / "a" / "model"
    model.mkdir(parents=True)
    (model / "fishertune_run.json").write_text(json.dumps({"status": "running"}))
    (folder / STATUS_FILE).write_text(json.dumps({"runs": [{"name": "a"}]}))
    return folder


def contents(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert cli_main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_trainer_cannot_overwrite_or_enter_a_live_grid(chat_file, tmp_path, holder, capsys):
    grid = a_grid(tmp_path / "parent" / "grid")
    runner = holder("runner", grid)
    before = contents(tmp_path)
    named = f"fishertune experiment (PID {runner.pid} on "
    for output in (grid, grid / "runs", grid / "runs" / "a", tmp_path / "parent"):
        err = refused(capsys, base_args(chat_file, output, overwrite_output_dir="true"))
        assert named in err, err
    # a new folder inside the grid that is no run's model folder is refused too
    assert named in refused(capsys, base_args(chat_file, grid / "mine"))
    assert contents(tmp_path) == before  # nothing moved aside, deleted or left behind


def test_a_runners_own_stage_may_train_inside_its_grid(tmp_path):
    grid = a_grid(tmp_path / "grid")
    with RunnerLock(grid), output_lock(grid / "runs" / "a" / "model"):
        pass


def test_a_runner_or_trainer_cannot_start_on_a_live_trainers_folder(
    chat_file, tmp_path, base_config, holder, capsys
):
    out = tmp_path / "out"  # the grid's output_dir (test_experiments.experiment)
    trainer = holder("train", out)
    named = f"fishertune train (PID {trainer.pid} on "
    config = parse_experiment(experiment(tmp_path, base_config, seeds=[0]), tmp_path / "e.yaml")
    launcher = FakeLauncher()
    with pytest.raises(FishertuneError, match=re.escape(named)):
        run_experiment(config, launcher=launcher, log=lambda _: None)
    inside = experiment(tmp_path, base_config, seeds=[0], output_dir=str(out / "grid"))
    with pytest.raises(FishertuneError, match=re.escape(named)):
        run_experiment(parse_experiment(inside, tmp_path / "e.yaml"), launcher=launcher)
    assert launcher.calls == []
    assert named in refused(capsys, base_args(chat_file, out / "sub"))
    assert not out.exists()
