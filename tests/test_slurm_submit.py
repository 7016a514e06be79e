"""Submitting a grid with ``--launcher slurm`` (submitit), without a SLURM cluster.

The jobs run through submitit's local and debug executors with the fake launcher of
test_experiments (it writes what ``fishertune train`` / ``evaluate`` leave behind); SLURM's view of
job ids is given by hand. tests/test_slurm.py runs the same path on a real one-node SLURM.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from fishertune.experiments import cli as experiment_cli
from fishertune.experiments.experiment_file import load_experiment, parse_experiment
from fishertune.experiments.grid import expand_grid
from fishertune.experiments.runner import run_experiment
from fishertune.experiments.slurm import (
    RunJob,
    format_status_table,
    grid_status,
    make_executor,
    submit_grid,
)
from fishertune.files import STATUS_FILE, read_status
from test_experiments import FakeLauncher, experiment, option, write_yaml

pytest.importorskip("submitit")
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def base_config(tmp_path: Path) -> Path:
    return write_yaml(
        tmp_path / "base.yaml",
        {"method": "baseline", "max_steps": 10, "dataset_name": "builtin:tiny-tasks"},
    )


def no_slurm(job_ids: Any) -> dict[str, str]:
    return {}


def wait_for(predicate: Any, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_submit_runs_each_job_records_it_and_resubmits_only_failures(
    tmp_path: Path, base_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submitit's local executor: real job processes, the job array's bookkeeping, a failure."""
    # the job processes unpickle the fake launcher: they need this folder on their path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), *sys.path]))
    config = parse_experiment(experiment(tmp_path, base_config, seeds=[0]), tmp_path / "e.yaml")
    lines: list[str] = []
    results = submit_grid(
        config,
        executor=make_executor(config, cluster="local"),
        states=no_slurm,
        launcher=FakeLauncher(fail={("train", "token-f-seed0")}),
        log=lines.append,
    )
    assert [r.status for r in results] == ["submitted", "submitted"]
    ids = {r.name: r.job_id for r in results}
    assert all(ids.values()) and len(set(ids.values())) == 2
    wait_for(
        lambda: (
            {e.get("status") for e in read_status(config.output_dir).values()}
            <= {"completed", "failed"}
        )
    )
    records = read_status(config.output_dir)
    ok, failed = records["baseline-seed0"], records["token-f-seed0"]
    assert ok["status"] == "completed" and ok["launcher"] == "slurm"
    assert ok["job_id"] == ids["baseline-seed0"] and Path(ok["slurm_log"]).is_file()
    assert (config.runs_dir / "baseline-seed0" / "evaluation.json").is_file()
    # the failure is recorded with its job id, its stage's log and the job's own log
    assert failed["status"] == "failed" and failed["stage"] == "train"
    assert failed["job_id"] == ids["token-f-seed0"]
    assert failed["log"] == str(config.runs_dir / "token-f-seed0" / "train.log")
    assert Path(failed["slurm_log"]).is_file()
    table = format_status_table(grid_status(config, states=no_slurm))
    assert "completed" in table and "failed" in table and ids["token-f-seed0"] in table

    # submitting again resubmits only the failed run (debug executor: nothing runs)
    again = submit_grid(
        config, executor=make_executor(config, cluster="debug"), states=no_slurm, log=lines.append
    )
    assert [(r.name, r.status) for r in again] == [
        ("baseline-seed0", "skipped"),
        ("token-f-seed0", "submitted"),
    ]
    assert read_status(config.output_dir)["token-f-seed0"]["job_id"] == again[1].job_id


def test_resubmission_leaves_queued_and_running_jobs_alone(
    tmp_path: Path, base_config: Path
) -> None:
    raw = experiment(tmp_path, base_config, seeds=[0, 1, 2, 3, 4, 5])
    raw["methods"] = {"baseline": {"method": "baseline"}}
    config = parse_experiment(raw, tmp_path / "e.yaml")
    run_experiment(config, launcher=FakeLauncher(), only=["baseline-seed0"], log=lambda _: None)
    status = json.loads((config.output_dir / STATUS_FILE).read_text())
    status["runs"] += [
        {"name": "baseline-seed1", "status": "submitted", "job_id": "101_0", "launcher": "slurm"},
        {"name": "baseline-seed2", "status": "running", "job_id": "101_1", "started": time.time()},
        {"name": "baseline-seed3", "status": "running", "job_id": "101_2"},  # vanished
        {"name": "baseline-seed5", "status": "submitted", "job_id": "99"},
    ]
    (config.output_dir / STATUS_FILE).write_text(json.dumps(status))
    # seed2 reached a complete checkpoint: --status shows the step
    checkpoint = config.runs_dir / "baseline-seed2" / "model" / "checkpoint-40"
    checkpoint.mkdir(parents=True)
    (checkpoint / "fishertune_checkpoint.json").write_text("{}")

    def slurm(job_ids: Any) -> dict[str, str]:
        return {
            job_id: state
            for job_id, state in {"101_0": "PENDING", "101_1": "RUNNING", "99": "TIMEOUT"}.items()
            if job_id in job_ids
        }

    views = {view.name: view for view in grid_status(config, states=slurm)}
    assert {name: view.state for name, view in views.items()} == {
        "baseline-seed0": "completed",
        "baseline-seed1": "queued",
        "baseline-seed2": "running",
        "baseline-seed3": "stopped",
        "baseline-seed4": "missing",
        "baseline-seed5": "failed",
    }
    assert views["baseline-seed2"].step == 40 and views["baseline-seed0"].step is None
    table = format_status_table(list(views.values()))
    assert "queued (PENDING)" in table and "101_1" in table and "ended TIMEOUT" in table

    results = submit_grid(
        config, executor=make_executor(config, cluster="debug"), states=slurm, log=lambda _: None
    )
    assert [r.status for r in results] == [
        "skipped",
        "queued",
        "running",
        "submitted",
        "submitted",
        "submitted",
    ]
    records = read_status(config.output_dir)
    assert records["baseline-seed1"]["job_id"] == "101_0"  # untouched
    assert records["baseline-seed2"]["job_id"] == "101_1"
    assert records["baseline-seed3"]["job_id"].startswith("DEBUG_")


def slurm_task(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, node: int) -> None:
    """The environment of task ``node`` of a 2-node array job, as SLURM and submitit set it."""
    for key, value in {
        "SUBMITIT_EXECUTOR": "slurm",
        "SUBMITIT_FOLDER": str(tmp_path / "slurm"),
        "SLURM_JOB_ID": "4242",
        "SLURM_ARRAY_JOB_ID": "4240",
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }.items():
        monkeypatch.setenv(key, value)


def test_multi_node_job_runs_one_accelerate_launch_per_node(
    tmp_path: Path, base_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accelerate = write_yaml(tmp_path / "zero3.yaml", {"distributed_type": "DEEPSPEED"})
    raw = experiment(
        tmp_path,
        base_config,
        seeds=[0],
        launcher="accelerate",
        accelerate_config=str(accelerate),
        slurm={"nodes": 2, "gpus_per_node": 8},
    )
    raw["methods"] = {"token-f": {"method": "token-f"}}
    config = parse_experiment(raw, tmp_path / "e.yaml")
    (run,) = expand_grid(config)

    slurm_task(monkeypatch, tmp_path, node=1)
    worker: list[tuple[list[str], Path]] = []

    def training_worker(command: list[str], log_path: Path, env: dict[str, str]) -> int:
        worker.append((command, log_path))  # a worker node's share: no files of its own
        return 0

    assert RunJob(config, run.name, training_worker)()["node"] == 1
    ((train, log_path),) = worker  # node 1 trains only
    assert train[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert option(train, "--num_processes") == "16"
    assert option(train, "--num_machines") == "2" and option(train, "--machine_rank") == "1"
    assert option(train, "--main_process_ip") == "gpu07"
    assert option(train, "--deepspeed_multinode_launcher") == "standard"
    port = option(train, "--main_process_port")
    assert 20000 <= int(port) < 40000
    assert log_path == run.run_dir / "train.node1.log"

    slurm_task(monkeypatch, tmp_path, node=0)
    main = FakeLauncher()
    record = RunJob(config, run.name, main)()
    assert [stage for stage, _ in main.calls] == ["train", "evaluate"]
    assert option(main.commands[0], "--machine_rank") == "0"
    assert option(main.commands[0], "--main_process_port") == port  # the same on every node
    assert record["status"] == "completed" and record["job_id"] == "4240_2"
    stored = read_status(config.output_dir)[run.name]
    assert stored["status"] == "completed" and stored["slurm_log"].endswith("4240_2_0_log.out")


def test_checkpoint_stops_the_training_and_hands_back_the_same_job(
    tmp_path: Path, base_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What submitit calls on USR2 (preemption, time limit) before it requeues the job."""
    from fishertune.experiments.processes import subprocess_launcher

    config = parse_experiment(experiment(tmp_path, base_config, seeds=[0]), tmp_path / "e.yaml")
    run = expand_grid(config)[0]
    slurm_task(monkeypatch, tmp_path, node=0)
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    pid_file = tmp_path / "child.pid"

    def sleeping_training(command: list[str], log_path: Path, env: dict[str, str]) -> int:
        code = (
            "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
        )
        return subprocess_launcher([sys.executable, "-c", code, str(pid_file)], log_path, env)

    job = RunJob(config, run.name, sleeping_training)
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            job()
        except Exception as err:  # the killed stage fails the job in this test's thread
            outcome["error"] = err

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=60)
    child = int(pid_file.read_text())
    assert read_status(config.output_dir)[run.name]["status"] == "running"
    delayed = job.checkpoint()
    assert read_status(config.output_dir)[run.name]["status"] in ("requeued", "failed")
    thread.join(timeout=30)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert delayed.function is job
    # submitit stores it with cloudpickle for the requeued job
    assert isinstance(pickle.loads(cloudpickle.dumps(delayed.function)), RunJob)
    assert "exited with status" in str(outcome["error"])
    assert signal.SIGUSR2  # the signal the children of a real job ignore


def test_cli_slurm_options(
    tmp_path: Path, base_config: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_yaml(tmp_path / "e.yaml", experiment(tmp_path, base_config, seeds=[0]))
    assert experiment_cli.main(["--config", str(path), "--status"]) == 0
    out = capsys.readouterr().out
    assert "baseline-seed0  missing" in out and "2 runs: 2 missing" in out
    config = load_experiment(path)
    with pytest.raises(Exception, match="--parallel / --gpus are for --launcher local"):
        experiment_cli.main(["--config", str(path), "--launcher", "slurm", "--parallel", "2"])
    assert not (config.output_dir / STATUS_FILE).exists()
    # no SLURM on this machine: one line saying so, nothing recorded
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(Exception, match="--launcher slurm: no SLURM on this machine"):
        experiment_cli.main(["--config", str(path), "--launcher", "slurm"])
    assert not (config.output_dir / STATUS_FILE).exists()


def test_local_runner_leaves_runs_of_live_slurm_jobs_alone(
    tmp_path: Path, base_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fishertune.errors import FishertuneError
    from fishertune.experiments import slurm
    from fishertune.experiments.stages import RunResult, update_status

    config = parse_experiment(experiment(tmp_path, base_config, seeds=[0]), tmp_path / "e.yaml")
    update_status(config, [RunResult("token-f-seed0", "running", launcher="slurm", job_id="77_1")])
    monkeypatch.setattr(slurm, "slurm_states", lambda ids, folder=None: {"77_1": "RUNNING"})
    launcher = FakeLauncher()
    with pytest.raises(FishertuneError, match=r"running for token-f-seed0 \(job 77_1\)"):
        run_experiment(config, launcher=launcher, log=lambda _: None)
    assert launcher.calls == []
    # once SLURM no longer runs it, the local runner takes the run over
    monkeypatch.setattr(slurm, "slurm_states", lambda ids, folder=None: {})
    results = run_experiment(config, launcher=launcher, log=lambda _: None)
    assert [r.status for r in results] == ["completed", "completed"]


def test_unknown_slurm_state_is_an_error_not_a_finished_job(monkeypatch, tmp_path):
    """squeue failing must not read as "the job is gone": that would resubmit a live run."""
    from fishertune.errors import FishertuneError
    from fishertune.experiments.slurm import slurm_states

    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue here
    with pytest.raises(FishertuneError, match=r"squeue failed .*jobs 12_0, 12_1"):
        slurm_states(["12_0", "12_1"], tmp_path)
