"""``fishertune experiment --launcher slurm`` end to end on a real one-node SLURM cluster.

Start the cluster first (root; installs slurm-wlm and munge from Debian packages):

    sudo bash scripts/slurm_cluster.sh start
    FISHERTUNE_REQUIRE_SLURM=1 python -m pytest -m slow tests/test_slurm.py

A 2-method x 2-seed tiny grid is submitted as a job array; one job is told to stop mid-training
(``scancel --signal=USR2``, what SLURM sends before a time limit or a preemption), requeues itself
and resumes from its latest complete checkpoint, and must end with the same weights as the same
run trained without interruption by the local launcher. Without a cluster the test is skipped
with that reason, or fails when ``FISHERTUNE_REQUIRE_SLURM=1`` (CI sets it once the cluster
started).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from fishertune.experiments import cli as experiment_cli
from fishertune.experiments.experiment_file import load_experiment
from fishertune.experiments.slurm import grid_status
from fishertune.files import read_status, step_reached, training_done

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 24
pytestmark = pytest.mark.slow


def cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found"
    try:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"sinfo failed: {err}"
    states = state.stdout.split()
    if state.returncode != 0 or not any(s in ("idle", "mix", "alloc") for s in states):
        return f"no usable node (sinfo: {state.stdout.strip() or state.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    problem = cluster_problem()
    if problem is None:
        return
    message = f"SLURM cluster not running ({problem}): sudo bash scripts/slurm_cluster.sh start"
    if os.environ.get("FISHERTUNE_REQUIRE_SLURM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def grid_file(tmp_path: Path) -> Path:
    payload = {
        "base_config": str(REPO / "configs/tiny.yaml"),
        "output_dir": str(tmp_path / "out"),
        "overrides": {
            "max_steps": MAX_STEPS,
            "save_steps": 3,
            "save_total_limit": 2,
            "logging_steps": 1,
            "per_device_train_batch_size": 4,
            "tiny_hidden_size": 32,
            "dataset_fraction": 0.05,
            "report_to": "none",
            "disable_tqdm": True,
        },
        "methods": {
            "baseline": {"method": "baseline"},
            "token-f": {"method": "token-f", "penalty_coef": 0.1, "penalty_warmup_steps": 4},
        },
        "seeds": [0, 1],
        "evaluation": {"tasks": ["offline"], "limit": 4, "max_new_tokens": 4},
        "env": {"OMP_NUM_THREADS": "1"},
        "slurm": {"cpus_per_task": 1, "time": 20, "array_parallelism": 2, "job_name": "ft-test"},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_tiny_grid_on_slurm_survives_a_stopped_job(
    slurm_cluster: None, tmp_path: Path, capsys
) -> None:
    path = grid_file(tmp_path)
    config = load_experiment(path)
    assert experiment_cli.main(["--config", str(path), "--launcher", "slurm"]) == 0
    assert "4 submitted" in capsys.readouterr().out
    records = read_status(config.output_dir)
    jobs = {name: record["job_id"] for name, record in records.items()}
    assert len(jobs) == 4 and all(re.fullmatch(r"\d+_\d", job) for job in jobs.values())

    # stop token-f-seed0 once it has a complete checkpoint, before it finishes
    target = config.runs_dir / "token-f-seed0"
    wait_for(
        lambda: (step_reached(target / "model") or 0) >= 3,
        timeout=300,
        what="a checkpoint of token-f-seed0",
    )
    assert not training_done(target / "model"), "training finished before it could be stopped"
    subprocess.run(["scancel", "--signal=USR2", jobs["token-f-seed0"]], check=True)

    def all_completed() -> bool:
        return all(view.state == "completed" for view in grid_status(config))

    wait_for(all_completed, timeout=600, what="every run to complete")
    # SLURM requeued the stopped job once; the run resumed from its checkpoint
    shown = subprocess.run(
        ["scontrol", "show", "job", jobs["token-f-seed0"]], capture_output=True, text=True
    ).stdout
    assert "Restarts=1" in shown, shown
    train_log = (target / "train.log").read_text()
    launches = [line for line in train_log.splitlines() if line.startswith("$ ")]
    assert len(launches) == 2 and "--resume true" in launches[1], launches
    state = json.loads((target / "model" / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS

    # --status shows every run finished, with its job and step
    assert experiment_cli.main(["--config", str(path), "--status"]) == 0
    table = capsys.readouterr().out
    for name, job in jobs.items():
        assert re.search(rf"{name}\s+completed\s+{job}\s+{MAX_STEPS}\b", table), table
    # submitting again submits nothing
    assert experiment_cli.main(["--config", str(path), "--launcher", "slurm"]) == 0
    assert "4 skipped" in capsys.readouterr().out

    # the same run without interruption, by the local launcher: the same weights and scores
    reference = tmp_path / "reference"
    assert (
        experiment_cli.main(
            [
                "--config",
                str(path),
                "--only",
                "token-f-seed0",
                "--output_dir",
                str(reference),
                "--no_report",
            ]
        )
        == 0
    )
    resumed = weights(target / "model")
    straight = weights(reference / "runs" / "token-f-seed0" / "model")
    assert resumed.keys() == straight.keys()
    different = [k for k in resumed if not (resumed[k] == straight[k]).all()]
    assert different == [], f"tensors differ after the requeue: {different}"
    ours = json.loads((target / "evaluation.json").read_text())["metrics"]
    theirs = json.loads((reference / "runs/token-f-seed0/evaluation.json").read_text())["metrics"]
    assert ours == theirs

    # the report of the SLURM grid, as with the local launcher
    assert experiment_cli.main(["--config", str(path), "--report_only"]) == 0
    rows = list(csv.DictReader((config.report_dir / "results.csv").open()))
    assert [(row["row"], row["n"]) for row in rows] == [("baseline", "2"), ("token-f", "2")]
