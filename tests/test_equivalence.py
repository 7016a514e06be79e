"""The grid's base: and measure: stages, and the equivalence study end to end.

The stages' bookkeeping (order, reuse of the base model, failures, resumption, the SLURM refusal)
runs through a fake launcher; one test runs a shortened equivalence grid with the real training,
evaluation and measurement code (in this process, to keep it fast) and checks its report.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
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
    ],
)
def test_bad_stage_blocks_name_the_field(
    tmp_path: Path, base_config: Path, change: dict[str, Any], message: str
) -> None:
    raw = staged(tmp_path, base_config)
    raw.update(change)
    with pytest.raises(FishertuneError, match=message):
        parse_experiment(raw, tmp_path / "e.yaml")
    raw = experiment(tmp_path, base_config, report={"study": "equivalence"})
    with pytest.raises(FishertuneError, match="needs a base: and a measure: block"):
        parse_experiment(raw, tmp_path / "e.yaml")


def test_shipped_equivalence_grid(tmp_path: Path) -> None:
    """The preset: base, then baseline + 5 levels x 3 methods, 3 seeds, matched coefficients."""
    from fishertune.experiments.grid import load_experiment

    config = load_experiment("equivalence", output_dir=tmp_path / "out")
    runs = expand_grid(config)
    assert len(runs) == 1 + 3 * (1 + 5 * 3) and runs[0].name == "base"
    assert config.study == "equivalence" and config.measure is not None
    neftune = {r.method: r.overrides for r in runs if r.overrides.get("method") == "neftune"}
    ratios = []
    for name, overrides in neftune.items():
        level = name.removeprefix("neftune-")
        token, logit = config.methods[f"token-f-{level}"], config.methods[f"logit-f-{level}"]
        # lambda_eq = alpha^2 / (6 L d) with the preset's L = 25, d = 128; no warm-up
        coef = overrides["neftune_alpha"] ** 2 / (6 * 25 * 128)
        assert token["penalty_coef"] == pytest.approx(coef, rel=2e-3)
        assert logit["penalty_coef"] == token["penalty_coef"]
        assert token["penalty_warmup_steps"] == logit["penalty_warmup_steps"] == 0
        ratios.append(overrides["neftune_alpha"] / math.sqrt(25 * 128) / 0.0506)
    assert min(ratios) == pytest.approx(0.05, rel=1e-2)
    assert max(ratios) == pytest.approx(2.0, rel=1e-2)


# ----------------------------------------------------------------------------- end to end


def in_process(command: list[str], log_path: Path, env: dict[str, str]) -> int:
    """Runs a stage's ``python -m MODULE ARGS`` as ``MODULE.main(ARGS)`` in this process (a fresh
    interpreter per stage costs several seconds of imports), its output in the stage's log."""
    module, args = command[2], command[3:]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = importlib.import_module(module).main(args)
    except FishertuneError as err:
        out.write(f"error: {err}\n")
        code = 2
    log_path.write_text(out.getvalue())
    return code


def finite_numbers(value: Any, where: str = "") -> list[str]:
    """Paths of every non-finite number in a JSON document (``None`` is not a number)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in finite_numbers(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in finite_numbers(v, f"{where}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [where]
    return []


def test_shortened_equivalence_grid_end_to_end(tmp_path: Path) -> None:
    """Base, then one noise level (a/rms = 0.5) x baseline / NEFTune / token-F / logit-F, one
    seed, a few steps of a 32-wide model: the alphas placed from the base's own measurement (the
    preset's documented step), the report's structure and that every number in it is finite."""
    tiny = {
        "tiny_hidden_size": 32,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 1,
        "dataset_fraction": 0.02,
        "max_steps": 4,
        "save_steps": 2,
        "save_total_limit": 5,
    }
    raw: dict[str, Any] = {
        "base_config": str(REPO / "configs/tiny.yaml"),
        "output_dir": str(tmp_path / "out"),
        "overrides": tiny,
        "base": {"max_steps": 6, "save_steps": 6, "dataset_fraction": 0.05},
        "methods": {"baseline": {"method": "baseline"}},
        "seeds": [0],
        "evaluation": {"tasks": ["offline"], "limit": 4, "max_new_tokens": 4},
        "measure": {"batches": 1, "batch_size": 2, "probes": 2, "max_length": 64},
        "report": {"study": "equivalence"},
        "env": {"OMP_NUM_THREADS": "1"},
    }
    path = write_yaml(tmp_path / "equivalence.yaml", raw)
    config = parse_experiment(raw, path)
    results = run_experiment(config, launcher=in_process, only=["base"], log=lambda _: None)
    assert [r.status for r in results] == ["completed"], results

    base = json.loads((config.runs_dir / "base" / "curvature.json").read_text())["final"]
    rms, length, d = base["embedding_rms"], base["typical_length"], base["hidden_size"]
    assert d == 32 and rms > 0
    alpha = 0.5 * rms * math.sqrt(length * d)
    coef = alpha**2 / (6 * length * d)
    raw["methods"].update(
        {
            "neftune-r0.5": {"method": "neftune", "neftune_alpha": alpha},
            "token-f-r0.5": {"method": "token-f", "penalty_coef": coef, "penalty_warmup_steps": 0},
            "logit-f-r0.5": {"method": "logit-f", "penalty_coef": coef, "penalty_warmup_steps": 0},
        }
    )
    write_yaml(path, raw)
    config = parse_experiment(raw, path)
    results = run_experiment(config, launcher=in_process, log=lambda _: None)
    assert [r.status for r in results] == ["skipped"] + ["completed"] * 4, [
        (r.name, r.message) for r in results
    ]
    assert experiment_cli.main(["--config", str(path), "--report_only"]) == 0

    report_dir = tmp_path / "out" / "report"
    summary = json.loads((report_dir / "equivalence.json").read_text())
    assert finite_numbers(summary) == []
    (level,) = summary["levels"]
    assert level["ratio"] == pytest.approx(0.5)  # recomputed from the base's measurement
    assert level["alpha"] == pytest.approx(alpha, rel=1e-9)
    assert level["lambda_eq"] == pytest.approx(coef, rel=1e-9)
    assert list(level["rows"]) == ["baseline", "neftune", "token-f", "logit-f"]
    for row in level["rows"].values():
        for key in ("val_loss", "delta_val_loss", "trace_f", "trace_h", "gap", "exact_match"):
            assert row[key]["n"] == 1 and math.isfinite(row[key]["mean"])
        # the gap is Tr(H_X) - Tr(F_X) of the same measurement
        assert row["gap"]["mean"] == pytest.approx(row["trace_h"]["mean"] - row["trace_f"]["mean"])
    assert level["rows"]["baseline"]["delta_val_loss"]["mean"] == pytest.approx(0.0, abs=1e-12)
    neftune = level["rows"]["neftune"]
    assert neftune["delta_val_loss"]["mean"] == pytest.approx(
        neftune["val_loss"]["mean"] - level["rows"]["baseline"]["val_loss"]["mean"]
    )
    assert set(level["agreement"]) == {"token-f", "logit-f"}
    for run in summary["runs"]:
        # step 0 (the base model), the checkpoint at step 2, the final model at step 4
        assert [point[0] for point in run["trajectory"]] == [0, 2, 4]

    text = (report_dir / "equivalence.md").read_text()
    assert "## a/rms = 0.5 (alpha = " in text and "## Reading" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    table = [lines[start], *lines[start + 2 : start + 6]]
    assert table[0].startswith("| method | val loss | Δ val loss | Tr(F_X) | Tr(H_X) |")
    assert [line.split(" | ")[0] for line in table[1:]] == [
        "| baseline",
        "| NEFTune",
        "| token-F",
        "| logit-F",
    ]
    assert "token-F vs NEFTune, validation loss" in text and "Gauss-Newton gap" in text
    assert "## Agreement by level" in text and "## Paired by seed" in text
    # one seed: the paired difference is the plain difference of the two runs
    assert level["paired_vs_neftune"]["token-f"]["mean"] == pytest.approx(
        level["rows"]["token-f"]["val_loss"]["mean"] - neftune["val_loss"]["mean"]
    )
    for name in ("val_loss", "curvature", "trajectories"):
        assert (report_dir / f"equivalence_{name}.png").read_bytes()[:8] == PNG_MAGIC
