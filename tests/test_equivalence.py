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
from fishertune.experiments.experiment_file import parse_experiment
from fishertune.experiments.grid import expand_grid
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
        if "analyze" not in command:
            return super().__call__(command, log_path, env)
        self.calls.append(("measure", run_dir.name))
        self.commands.append(command)
        if ("measure", run_dir.name) in self.fail:
            return 3
        entry = {"step": 7, "loss": {"mean": 2.0}, "trace_f": {"mean": 5.0}}
        Path(option(command, "--record")).write_text(json.dumps({"final": entry}))
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


# A run's "measure" entry in fishertune_experiment.json as the code wrote it while the stage was
# its own program (fishertune.experiments.curvature, its flags' defaults: 2 batches of 8, 4
# probes, max_length 128, the validation split, every checkpoint, float32): the block of the
# shipped sharegpt-equivalence preset, every value given, and one that left them to that program.
OLD_MEASURE_EXPLICIT = """{"dataset": "builtin:tiny-tasks", "split": "validation,train",
"batches": 8, "batch_size": 4, "probes": 32, "max_length": 128, "checkpoints": false,
"seeds": [0]}"""
OLD_MEASURE_DEFAULTS = """{"split": "validation", "seeds": [0]}"""


def test_a_folder_measured_by_the_former_program_is_not_measured_again(
    tmp_path: Path, base_config: Path
) -> None:
    """Folders whose settings record holds the former measure program's entry stay measured when
    the block, read by analyze, means the same measurement; a block that relied on the former
    defaults now means analyze's, and those runs are measured again (and only measured)."""
    from fishertune.experiments.stages import stale_block, stored_settings

    raw = staged(tmp_path, base_config)
    raw["measure"] = json.loads(OLD_MEASURE_EXPLICIT)  # read unchanged, under analyze's names
    config = parse_experiment(raw, tmp_path / "e.yaml")
    assert config.measure.stored["data"] == "builtin:tiny-tasks"
    assert config.measure.stored["program"] == "analyze"
    run_experiment(config, launcher=StageLauncher(), log=lambda _: None)
    records = sorted(config.runs_dir.glob("*/fishertune_experiment.json"))
    assert len(records) == 5

    def store(entry: str) -> None:
        for path in records:
            settings = json.loads(path.read_text())
            path.write_text(json.dumps({**settings, "measure": json.loads(entry)}))

    store(OLD_MEASURE_EXPLICIT)
    again = StageLauncher()
    assert {r.status for r in run_experiment(config, launcher=again, log=lambda _: None)} == {
        "skipped"
    }
    assert again.calls == []
    # another number is another measurement
    raw["measure"]["probes"] = 16
    changed = parse_experiment(raw, tmp_path / "e.yaml")
    remeasure = StageLauncher()
    run_experiment(changed, launcher=remeasure, only=["baseline-seed0"], log=lambda _: None)
    assert remeasure.calls == [("measure", "baseline-seed0")]

    # the former defaults, given explicitly now, are what the old entry meant
    store(OLD_MEASURE_DEFAULTS)
    former = {"batches": 2, "batch_size": 8, "probes": 4, "max_length": 128,
              "checkpoints": True, "split": "validation", "seeds": [0]}  # fmt: skip
    raw["measure"] = former
    config = parse_experiment(raw, tmp_path / "e.yaml")
    kept = StageLauncher()
    assert {r.status for r in run_experiment(config, launcher=kept, log=lambda _: None)} == {
        "skipped"
    }
    assert kept.calls == []
    # left out, they are analyze's (8 batches of 4, 16 probes, ...): measured again, only that
    old = {"measure": json.loads(OLD_MEASURE_DEFAULTS)}
    raw["measure"] = {"split": "validation", "seeds": [0]}
    config = parse_experiment(raw, tmp_path / "e.yaml")
    assert stale_block(old, stored_settings(config, expand_grid(config)[0]), "measure")
    redo = StageLauncher()
    run_experiment(config, launcher=redo, only=["baseline-seed0"], log=lambda _: None)
    assert redo.calls == [("measure", "baseline-seed0")]


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
    assert "fishertune analyze" in out and "--record" in out and "--model_name_or_path" in out
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
        ({"report": {"study": "equivalence", "margin": -1}}, "report.margin: expected a positive"),
        (
            {"report": {"study": "equivalence", "ratio_margin": 1.5}},
            r"report.ratio_margin: expected a number in \(0, 1\)",
        ),
        ({"measure": {"seeds": [0, 0]}}, "measure.seeds: seeds repeat"),
        ({"study_data": {"study": "equivalence", "finetune": 3}}, "study_data.out: missing"),
        (
            {"study_data": {"study": "equivalence", "out": "d", "finetune": "x"}},
            "study_data.finetune: expected a number",
        ),
    ],
)
def test_bad_stage_blocks_name_the_field(
    tmp_path: Path, base_config: Path, change: dict[str, Any], message: str
) -> None:
    raw = staged(tmp_path, base_config)
    raw.update(change)
    with pytest.raises(FishertuneError, match=message):
        parse_experiment(raw, tmp_path / "e.yaml")
    raw = experiment(tmp_path, base_config, report={"study": "equivalence", "ratio_margin": 0.25})
    with pytest.raises(FishertuneError, match="needs a base: and a measure: block"):
        parse_experiment(raw, tmp_path / "e.yaml")
    # an absolute margin alone is not enough: it can be wider than NEFTune's own effect
    raw = staged(tmp_path, base_config, report={"study": "equivalence", "margin": 0.02})
    with pytest.raises(FishertuneError, match=r"report\.ratio_margin: the equivalence study needs"):
        parse_experiment(raw, tmp_path / "e.yaml")


# --------------------------------------------------------------- the report's reading, simulated

ALPHAS = (0.7661, 3.8305, 7.661)  # a/rms 0.1, 0.5, 1 at the study's rms, L and d


def simulated_study(
    neftune_effect: dict[float, float], ratios: dict[str, float], *, runaway_seeds: tuple = ()
) -> tuple[dict[str, Any], list[Any]]:
    """Ten seeds with known truths: the baseline's seed noise shared by every method of a seed,
    NEFTune's true effect per level, each regularizer's true effect a fixed ratio of NEFTune's;
    the Hessian-trace runs of ``runaway_seeds`` at the largest level end far above (their penalty
    logged negative)."""
    import random

    from fishertune.studies.equivalence.runs import StudyRun

    rng = random.Random(11)
    base = {"rms": 0.05985, "length": 128, "hidden_size": 128, "val_loss": 4.61,
            "test_loss": 4.59, "steps": 800, "train_loss": 4.0, "tokens_seen": 1.0e6,
            "parameters": 1_000_000, "curvature": {}}  # fmt: skip
    runs = []

    def run(kind: str, seed: int, alpha: float, value: float, away: Any = None) -> None:
        values = {"val_loss": value, "test_loss": value - 0.02, "step_s": 0.2}
        runs.append(StudyRun(f"{kind}-{alpha}-{seed}", kind, seed, alpha, values, {}, away))

    for seed in range(10):
        shared = 4.575 + rng.gauss(0, 0.003)
        run("baseline", seed, 0.0, shared + rng.gauss(0, 0.0003))
        for alpha in ALPHAS:
            effect = neftune_effect[alpha]
            run("neftune", seed, alpha, shared + effect + rng.gauss(0, 0.0003))
            for kind, ratio in ratios.items():
                value = shared + ratio * effect + rng.gauss(0, 0.0003)
                away = None
                if kind == "hessian-trace" and alpha == ALPHAS[-1] and seed in runaway_seeds:
                    value, away = value + 0.15, {"reason": "penalty negative", "step": 30}
                run(kind, seed, alpha, value, away)
    return base, runs


A2_LAW = {alpha: 0.013 * (alpha / ALPHAS[-1]) ** 2 for alpha in ALPHAS}
RATIOS = {"hessian-trace": 1.0, "token-f-unbiased": 1.0, "token-f-paper": 0.2}


def test_report_reproduces_known_ratios_and_leaves_undetected_levels_unmatched() -> None:
    """True ratios 1, 1 and 0.2 of NEFTune's effect; NEFTune's effect 0.00013 at a/rms 0.1 (not
    detectable with these seeds), 0.00325 and 0.013 above; two Hessian-trace seeds run away."""
    from fishertune.studies.equivalence.markdown import format_markdown
    from fishertune.studies.equivalence.summary import summarize

    base, runs = simulated_study(A2_LAW, RATIOS, runaway_seeds=(3, 7))
    summary = summarize(base, runs, ratio_margin=0.25)
    low, middle, top = summary["levels"]
    assert not low["neftune_effect"]["detected"]
    assert {e["verdict"] for e in low["reproduction"].values()} == {"no effect to match"}
    for level in (middle, top):
        assert level["neftune_effect"]["detected"]
        found = level["reproduction"]
        assert found["token-f-unbiased"]["verdict"] == "reproduces NEFTune's effect"
        paper = found["token-f-paper"]
        assert paper["verdict"] == "different: less than NEFTune's effect"
        assert paper["ratio"]["low"] < 0.2 < paper["ratio"]["high"]
    # the runaways are their own outcome, and the rest of the arm still matches NEFTune
    hessian = top["reproduction"]["hessian-trace"]
    assert hessian["excluded"] == [3, 7] and len(hessian["seeds"]) == 8
    assert hessian["verdict"] == "reproduces NEFTune's effect"
    assert summary["runaways"] == [{
        "kind": "hessian-trace", "alpha": ALPHAS[-1], "count": 2, "of": 10,
        "seeds": [{"seed": 3, "reason": "penalty negative", "step": 30},
                  {"seed": 7, "reason": "penalty negative", "step": 30}],
    }]  # fmt: skip
    chain = next(c for c in top["comparisons"]
                 if (c["first"], c["second"], c["metric"]) == ("hessian-trace", "neftune",
                                                               "val_loss"))  # fmt: skip
    assert chain["excluded"] == [3, 7] and chain["seeds"] == [0, 1, 2, 4, 5, 6, 8, 9]
    # the a^2 law holds by construction: no level contradicts it
    neftune = summary["predictions"]["neftune"]
    assert neftune["status"] == "tested" and [e["alpha"] for e in neftune["levels"]] == [
        ALPHAS[0],
        ALPHAS[1],
    ]
    for entry in neftune["levels"]:
        assert entry["factor"] == pytest.approx((entry["alpha"] / ALPHAS[-1]) ** 2)
        assert entry["difference"]["low"] <= 0.0 <= entry["difference"]["high"]
        assert not entry["verdict"].startswith("different")
    text = format_markdown(summary)
    for heading in ("## Does each regularizer reproduce NEFTune's effect?", "## Runaway runs",
                    "## The a² law as a prediction", "## Multiple comparisons (Holm"):  # fmt: skip
        assert heading in text
    reading = text.split("## Reading")[1].splitlines()
    first = next(line for line in reading if line.startswith("- a/rms 0.1:"))
    assert first.endswith("no effect to match; nothing is called equivalent here.")


def test_report_tells_a_flat_effect_from_the_a2_law_and_corrects_for_the_family() -> None:
    """NEFTune's effect absent below the largest level (as the first study measured): the a²
    prediction at the middle level is contradicted. Holm's adjusted p-values follow the hand
    step-down over each family, and verdicts that only pass uncorrected are listed as changed."""
    from fishertune.studies.equivalence.summary import summarize

    flat = {ALPHAS[0]: 0.0, ALPHAS[1]: 0.0, ALPHAS[2]: 0.013}
    base, runs = simulated_study(flat, RATIOS)
    summary = summarize(base, runs, ratio_margin=0.25)
    middle = summary["predictions"]["neftune"]["levels"][1]
    assert middle["predicted"] == pytest.approx(0.013 * 0.25, abs=0.001)
    assert middle["difference"]["high"] < 0
    assert middle["verdict"] == "different: less than the a² prediction"
    assert [e["verdict"] for e in summary["levels"][1]["reproduction"].values()] == [
        "no effect to match"
    ] * 3
    family = next(f for f in summary["corrections"] if f["name"] == "cause chain (val loss)")
    tests = [c for level in summary["levels"] for c in level["comparisons"]
             if c["metric"] == "val_loss"]  # fmt: skip
    assert family["tests"] == len(tests) == 15
    ranked = sorted(tests, key=lambda c: c["p_value"])
    assert ranked[0]["p_value_holm"] == pytest.approx(min(1.0, 15 * ranked[0]["p_value"]))
    second = max(ranked[0]["p_value_holm"], min(1.0, 14 * ranked[1]["p_value"]))
    assert ranked[1]["p_value_holm"] == pytest.approx(second)
    for c in tests:
        raw = "different" if c["p_value"] < 0.05 else "no detectable difference"
        holm = "different" if c["p_value_holm"] < 0.05 else "no detectable difference"
        assert (c["verdict_raw"], c["verdict"]) == (raw, holm)
    changed = [c for c in tests if c["verdict_raw"] != c["verdict"]]
    assert len(family["changed"]) == len(changed)
    assert all(x["raw"] == "different" and x["holm"] != "different" for x in family["changed"])


def test_runaway_reads_the_logged_penalty_old_and_new_and_failed_trainings(tmp_path: Path) -> None:
    """A penalty negative to the end (from the step it turned negative for good), a transient dip
    (not a runaway), a non-finite loss, a training the guard stopped; ``penalty_term`` as old run
    folders logged it."""
    from fishertune.files import RUN_RECORD, TRAINER_STATE, RunFolder
    from fishertune.studies.equivalence.runs import runaway

    def folder(name: str, history: list[dict[str, Any]], record: dict[str, Any]) -> RunFolder:
        model = tmp_path / name / "model"
        model.mkdir(parents=True)
        (model / TRAINER_STATE).write_text(json.dumps({"log_history": history}))
        (model / RUN_RECORD).write_text(json.dumps(record))
        return RunFolder(tmp_path / name)

    done = {"status": "completed", "global_step": 50}
    steps = [10, 20, 30, 40, 50]
    away = folder("a", [{"step": s, "penalty": p} for s, p in
                        zip(steps, [0.3, -0.1, 0.2, -0.4, -0.9], strict=True)], done)  # fmt: skip
    assert runaway(away) == {"reason": "penalty negative", "step": 40}
    dip = folder("b", [{"step": s, "penalty": p} for s, p in
                       zip(steps, [0.3, -0.1, 0.2, 0.4, 0.9], strict=True)], done)  # fmt: skip
    assert runaway(dip) is None
    old = folder("c", [{"step": s, "penalty_term": p} for s, p in
                       zip(steps, [0.3, -0.1, -0.2, -0.4, -0.9], strict=True)], done)  # fmt: skip
    assert runaway(old) == {"reason": "penalty negative", "step": 20}
    nan = folder("d", [{"step": 10, "loss": 2.0}, {"step": 20, "loss": float("nan")}], done)
    assert runaway(nan) == {"reason": "diverged", "step": 20}
    stopped = folder("e", [], {"status": "failed", "global_step": 17})
    assert runaway(stopped) == {"reason": "diverged", "step": 17}


def test_validation_curve_keeps_the_last_entry_of_a_step_and_finds_the_best(tmp_path: Path) -> None:
    """eval_loss every 2 steps, a minimum at step 4, and the closing evaluation repeating step 8."""
    from fishertune.files import RunFolder
    from fishertune.studies.equivalence.runs import validation_curve

    history = [{"loss": 5.0, "step": 1}, {"eval_loss": 4.6, "step": 2},
               {"eval_loss": 4.5, "step": 4}, {"eval_loss": 4.55, "step": 6},
               {"eval_loss": 4.7, "step": 8}, {"eval_loss": 4.71, "step": 8}]  # fmt: skip
    state = tmp_path / "model" / "trainer_state.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"log_history": history}))
    curve = validation_curve(RunFolder(tmp_path))
    assert curve == {"val_curve_last": 4.71, "val_curve_best": 4.5, "val_curve_best_step": 4.0,
                     "val_curve_rise": pytest.approx(0.21)}  # fmt: skip
    state.write_text(json.dumps({"log_history": history[:1]}))
    assert validation_curve(RunFolder(tmp_path)) == {}


def test_along_training_reports_the_baselines_rise_and_shares_of_neftunes_best() -> None:
    """Known truths on the best validation loss: the baseline overfits by 0.05 after its best,
    NEFTune lowers the best by 0.02 at every level, token-F unbiased by the same, token-F paper by
    half of it; the paired intervals and ratios must find them."""
    import random

    from fishertune.studies.equivalence.markdown import format_markdown
    from fishertune.studies.equivalence.summary import summarize

    base, runs = simulated_study(A2_LAW, RATIOS)
    rng = random.Random(5)
    shared = {seed: 4.4 + rng.gauss(0, 0.01) for seed in range(10)}
    gains = {"baseline": 0.0, "neftune": 0.02, "hessian-trace": 0.02, "token-f-unbiased": 0.02,
             "token-f-paper": 0.01}  # fmt: skip
    for r in runs:
        best = shared[r.seed] - gains[r.kind] + rng.gauss(0, 0.0005)
        rise = 0.05 if r.kind == "baseline" else 0.01
        r.values.update(val_curve_best=best, val_curve_last=best + rise + rng.gauss(0, 0.0005),
                        val_curve_best_step=20.0, val_curve_rise=rise)  # fmt: skip
    summary = summarize(base, runs, ratio_margin=0.25)
    for level in summary["levels"]:
        along = level["along_training"]
        rise = along["baseline_rise"]
        assert rise["low"] < 0.05 < rise["high"] and rise["high"] - rise["low"] < 0.005
        found = along["best_vs_baseline"]
        assert found["neftune"]["low"] < -0.02 < found["neftune"]["high"]
        assert "ratio" not in found["neftune"]
        unbiased, paper = found["token-f-unbiased"]["ratio"], found["token-f-paper"]["ratio"]
        assert unbiased["kind"] == paper["kind"] == "bounded"
        assert unbiased["low"] < 1.0 < unbiased["high"] and paper["low"] < 0.5 < paper["high"]
        assert paper["high"] < 0.75
        assert along["rows"]["baseline"]["val_curve_best"]["n"] == 10
    text = format_markdown(summary)
    assert "## Along training: the last and the best validation loss" in text
    assert "The baseline's last − best validation loss" in text
    # runs without a curve (older folders) leave the section out
    for r in runs:
        for key in ("val_curve_best", "val_curve_last", "val_curve_best_step", "val_curve_rise"):
            r.values.pop(key)
    summary = summarize(base, runs, ratio_margin=0.25)
    assert all(level["along_training"] is None for level in summary["levels"])
    assert "## Along training" not in format_markdown(summary)


def test_estimator_noise_is_the_one_direction_relative_sd_per_batch() -> None:
    """A measurement of 8 batches with 32 probes and 16 target draws per batch, each direction's
    value of standard deviation 0.3 (Tr(H_X) = 2) and 0.5 (Tr(F_X) = 1.25): the estimators' own
    standard errors ``sqrt(sum_b (sd / sqrt(c))^2) / n`` must give back 0.3 / 2 and 0.5 / 1.25."""
    import math

    from fishertune.studies.equivalence.runs import _curvature

    def trace(mean: float, sd: float, count: int) -> dict[str, float]:
        se = math.sqrt(8 * (sd / math.sqrt(count)) ** 2) / 8
        return {"mean": mean, "se_estimator": se, "se_batches": 0.01, "num_batches": 8}

    entry = {"embedding_rms": 0.06, "loss": {"mean": 4.5}, "trace_h": trace(2.0, 0.3, 32),
             "trace_f": trace(1.25, 0.5, 16), "gap": trace(0.75, 0.1, 32)}  # fmt: skip
    found = _curvature({"probes": 32, "fisher_draws": 16, "splits": {"validation": entry}})
    assert found["validation"]["trace_h_noise"] == pytest.approx(0.15, rel=1e-12)
    assert found["validation"]["trace_f_noise"] == pytest.approx(0.4, rel=1e-12)
    # an older record without the settings: no noise figure, the rest as before
    old = _curvature({"splits": {"validation": entry}})["validation"]
    assert math.isnan(old["trace_h_noise"]) and old["trace_f"] == 1.25


def test_a_different_effect_of_the_other_sign_is_called_so() -> None:
    """NEFTune's measured effect can change sign between levels (helping at small noise, hurting
    at large): a negative ratio is "opposite in sign", not "more" by its absolute size."""
    from fishertune.studies.equivalence.comparisons import match_verdict

    def verdict(ratio: float, tost_p: float = 0.5, differ_p: float = 0.001, high=None) -> str:
        fieller = {"ratio": ratio, "kind": "bounded", "low": ratio - 1, "high": high or ratio + 1}
        return match_verdict({"ratio": fieller}, tost_p, differ_p, "the a² prediction")

    assert verdict(-4.5) == "different: opposite in sign to the a² prediction"
    # a negative point ratio whose interval reaches 0: an effect not shown to go the other way
    assert verdict(-0.2, high=0.3) == "different: less than the a² prediction"
    assert verdict(0.4) == "different: less than the a² prediction"
    assert verdict(1.6) == "different: more than the a² prediction"
    assert verdict(-4.5, differ_p=0.2) == "inconclusive"
    assert verdict(1.02, tost_p=0.01) == "reproduces the a² prediction"


def test_the_choice_leaves_runaway_runs_out() -> None:
    """A level's loss for the practitioner's choice is over the runs that behaved; an arm whose
    every run ran away is said to, not ranked by the losses of its runaway runs."""
    from fishertune.studies.equivalence.markdown import format_markdown
    from fishertune.studies.equivalence.summary import summarize

    base, runs = simulated_study(A2_LAW, RATIOS, runaway_seeds=(3, 7))
    summary = summarize(base, runs, ratio_margin=0.25)
    pick = summary["choice"]["hessian-trace"]
    top = [r for r in runs if r.kind == "hessian-trace" and r.alpha == pick["alpha"]]
    kept = [r.values["val_loss"] for r in top if r.runaway is None]
    assert pick["val_loss"]["n"] == len(kept) and pick["val_loss"]["mean"] == pytest.approx(
        sum(kept) / len(kept)
    )
    for r in runs:
        if r.kind == "hessian-trace":
            r.runaway = {"reason": "penalty negative", "step": 20}
    summary = summarize(base, runs, ratio_margin=0.25)
    assert summary["choice"]["hessian-trace"] == {"ran_away": True}
    assert "| Hessian-trace | every run ran away |" in format_markdown(summary)
