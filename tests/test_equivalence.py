"""The grid's base: and measure: stages, and the equivalence study end to end.

The stages' bookkeeping (order, reuse of the base model, failures, resumption, the SLURM refusal)
runs through a fake launcher; one test runs a shortened equivalence grid with the real training,
evaluation and measurement code (in this process, to keep it fast) and checks its report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fishertune.errors import FishertuneError
from fishertune.experiments import cli as experiment_cli
from fishertune.experiments.grid import expand_grid, parse_experiment
from fishertune.experiments.runner import run_experiment
from fishertune.files import STATUS_FILE
from test_experiments import FakeLauncher, experiment, option, write_yaml

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class StageLauncher(FakeLauncher):
    """The fake launcher plus the ``measure`` stage (a ``curvature.json`` with known numbers)."""

    def __call__(self, command: list[str], log_path: Path, env: dict[str, str]) -> int:
        run_dir = log_path.parent
        if "evaluate" in command and run_dir.name == "base":
            self.calls.append(("evaluate", "base"))
            self.commands.append(command)
            metrics = {"metrics": {"offline/val_loss": 2.5}}
            Path(option(command, "--output")).write_text(json.dumps(metrics))
            return 0
        if "fishertune.experiments.curvature" not in command:
            return super().__call__(command, log_path, env)
        self.calls.append(("measure", run_dir.name))
        self.commands.append(command)
        if ("measure", run_dir.name) in self.fail:
            return 3
        entry = {"step": 7, "loss": {"mean": 2.0}, "trace_f": {"mean": 5.0}}
        Path(option(command, "--output")).write_text(json.dumps({"final": entry}))
        return 0


def staged(tmp_path: Path, base_config: Path, **changes: Any) -> dict[str, Any]:
    raw = experiment(tmp_path, base_config, seeds=[0, 1], **changes)
    raw["base"] = {"max_steps": 50, "learning_rate": 0.3}
    raw["measure"] = {"batches": 1, "probes": 2}
    return raw


@pytest.fixture
def base_config(tmp_path: Path) -> Path:
    return write_yaml(
        tmp_path / "base.yaml",
        {"method": "baseline", "max_steps": 10, "dataset_name": "builtin:tiny-tasks"},
    )


def test_base_stage_runs_first_and_every_run_starts_from_its_model(
    tmp_path: Path, base_config: Path
) -> None:
    config = parse_experiment(staged(tmp_path, base_config), tmp_path / "e.yaml")
    runs = expand_grid(config)
    assert [r.name for r in runs][:2] == ["base", "baseline-seed0"]
    base = runs[0]
    # base YAML < overrides < base: block; the grid's seed
    assert base.overrides == {"max_steps": 50, "learning_rate": 0.3, "seed": 0}
    assert base.run_dir == tmp_path / "out" / "runs" / "base"
    for run in runs[1:]:
        assert run.overrides["model_name_or_path"] == str(tmp_path / "out/runs/base/model")

    launcher = StageLauncher()
    results = run_experiment(config, launcher=launcher, parallel=2, log=lambda _: None)
    assert [r.status for r in results] == ["completed"] * 5
    # the base's three stages come before anything else, even with two slots
    assert launcher.calls[:3] == [("train", "base"), ("evaluate", "base"), ("measure", "base")]
    assert {name for _, name in launcher.calls[3:]} == {r.name for r in runs[1:]}
    assert len(launcher.calls) == 15  # train, evaluate, measure per run
    for command in launcher.commands[3:]:
        if "train" in command:
            assert option(command, "--model_name_or_path") == str(base.model_dir)
    recorded = json.loads((config.output_dir / STATUS_FILE).read_text())["runs"]
    assert recorded[0]["name"] == "base" and recorded[0]["status"] == "completed"

    # resumable: nothing to do; --only a run whose base is done does not retrain the base
    again = StageLauncher()
    assert {r.status for r in run_experiment(config, launcher=again, log=lambda _: None)} == {
        "skipped"
    }
    assert again.calls == []
    # new measure: settings: only the measure stage runs again, the scores are kept
    raw = staged(tmp_path, base_config)
    raw["measure"]["probes"] = 3
    config = parse_experiment(raw, tmp_path / "e.yaml")
    remeasure = StageLauncher()
    run_experiment(config, launcher=remeasure, only=["token-f-seed1"], log=lambda _: None)
    assert remeasure.calls == [("measure", "token-f-seed1")]
    assert (config.runs_dir / "token-f-seed1" / "evaluation.json").is_file()


def test_only_a_run_trains_its_missing_base_first_and_a_failed_base_blocks_the_rest(
    tmp_path: Path, base_config: Path
) -> None:
    config = parse_experiment(staged(tmp_path, base_config), tmp_path / "e.yaml")
    launcher = StageLauncher(fail={("train", "base")})
    lines: list[str] = []
    results = run_experiment(config, launcher=launcher, only=["token-f"], log=lines.append)
    assert launcher.calls == [("train", "base")]
    assert [r.name for r in results] == ["base", "token-f-seed0", "token-f-seed1"]
    assert [r.status for r in results] == ["failed"] * 3
    assert "the base stage failed" in results[1].message
    assert lines[-1] == "the base stage failed: 2 runs not started"
    recorded = {
        e["name"]: e for e in json.loads((config.output_dir / STATUS_FILE).read_text())["runs"]
    }
    assert recorded["token-f-seed0"]["stage"] == "base"

    retry = StageLauncher()
    results = run_experiment(config, launcher=retry, only=["token-f"], log=lambda _: None)
    assert retry.calls[:3] == [("train", "base"), ("evaluate", "base"), ("measure", "base")]
    assert [r.status for r in results] == ["completed"] * 3


def test_dry_run_lists_the_base_first(tmp_path: Path, base_config: Path, capsys) -> None:
    path = write_yaml(tmp_path / "e.yaml", staged(tmp_path, base_config))
    assert experiment_cli.main(["--config", str(path), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "# [1/5] base"
    assert "fishertune.experiments.curvature" in out and "--model_name_or_path" in out
    assert not (tmp_path / "out" / "runs").exists()


def test_slurm_refuses_the_grid_before_its_base_is_done(tmp_path: Path, base_config: Path) -> None:
    from fishertune.experiments.slurm import submit_grid

    config = parse_experiment(staged(tmp_path, base_config), tmp_path / "e.yaml")
    with pytest.raises(FishertuneError, match=r"base stage is not finished.*--only base"):
        submit_grid(config, dry_run=True, states=lambda ids, folder=None: {}, log=lambda _: None)
    # the base alone may be submitted; once it is done, the grid may
    results = submit_grid(
        config, only=["base"], dry_run=True, states=lambda ids, folder=None: {}, log=lambda _: None
    )
    assert [(r.name, r.status) for r in results] == [("base", "planned")]
    run_experiment(config, launcher=StageLauncher(), only=["base"], log=lambda _: None)
    results = submit_grid(
        config, dry_run=True, states=lambda ids, folder=None: {}, log=lambda _: None
    )
    assert results[0].status == "skipped" and {r.status for r in results[1:]} == {"planned"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": {"base": {"method": "baseline"}}}, "methods.base: the name is taken"),
        (
            {"methods": {"a": {"method": "baseline", "model_name_or_path": "x"}}},
            "methods.a.model_name_or_path: set by the grid",
        ),
        ({"measure": {"probes": 1}}, "measure.probes: expected an integer >= 2"),
        ({"measure": {"probez": 1}}, "measure: unknown key"),
        ({"report": {"study": "other"}}, "report.study: 'other' is not one of"),
        ({"report": {"margin": -1}}, "report.margin: expected a positive number"),
        ({"measure": {"seeds": [0, 0]}}, "measure.seeds: seeds repeat"),
        ({"study_data": {"finetune": 3}}, "study_data.out: missing"),
        ({"study_data": {"out": "d", "finetune": "x"}}, "study_data.finetune: expected a number"),
    ],
)
def test_bad_stage_blocks_name_the_field(
    tmp_path: Path, base_config: Path, change: dict[str, Any], message: str
) -> None:
    raw = staged(tmp_path, base_config)
    raw.update(change)
    with pytest.raises(FishertuneError, match=message):
        parse_experiment(raw, tmp_path / "e.yaml")
    raw = experiment(tmp_path, base_config, report={"study": "equivalence", "margin": 0.01})
    with pytest.raises(FishertuneError, match="needs a base: and a measure: block"):
        parse_experiment(raw, tmp_path / "e.yaml")
    raw = staged(tmp_path, base_config, report={"study": "equivalence"})
    with pytest.raises(FishertuneError, match=r"report\.margin: the equivalence study needs"):
        parse_experiment(raw, tmp_path / "e.yaml")
