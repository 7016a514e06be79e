"""Experiment grids: expansion, the resumable runner, aggregation over seeds, report files.

Most tests run the grid through a fake launcher that writes what ``fishertune train`` and
``fishertune evaluate`` leave behind (``trainer_state.json``, ``fishertune_run.json``,
``evaluation.json``) with known numbers; one test runs the real commands on a tiny model.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fishertune.cli import main as cli_main
from fishertune.errors import FishertuneError
from fishertune.experiments import cli as experiment_cli
from fishertune.experiments.checks import validate_grid
from fishertune.experiments.commands import evaluate_command, override_flags, train_command
from fishertune.experiments.experiment_file import load_experiment, parse_experiment
from fishertune.experiments.grid import expand_grid
from fishertune.experiments.report import load_run_records, write_report
from fishertune.experiments.report_tables import RunRecord, aggregate, format_markdown
from fishertune.experiments.runner import run_experiment
from fishertune.files import STATUS_FILE, read_status

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Offline metrics the fake evaluation writes: method -> per-seed values.
VAL_LOSS = {"baseline": [3.0, 3.2, 3.4], "token-f": [2.0, 2.5, 3.0]}
EXACT = {"baseline": [0.5, 0.6, 0.7], "token-f": [0.1, 0.2, 0.3]}


def write_yaml(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path


@pytest.fixture
def base_config(tmp_path: Path) -> Path:
    return write_yaml(
        tmp_path / "base.yaml",
        {"method": "baseline", "max_steps": 10, "dataset_name": "builtin:tiny-tasks"},
    )


def experiment(tmp_path: Path, base_config: Path, **changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "base_config": str(base_config),
        "output_dir": str(tmp_path / "out"),
        "overrides": {"max_steps": 7, "learning_rate": 0.1},
        "methods": {
            "baseline": {"method": "baseline"},
            "token-f": {"method": "token-f", "penalty_coef": 0.5, "learning_rate": 0.2},
        },
        "seeds": [0, 1, 2],
        "evaluation": {"tasks": ["offline"], "limit": 10},
    }
    payload.update(changes)
    return payload


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


class FakeLauncher:
    """Stands in for the subprocesses: writes synthetic run files, records what was launched."""

    def __init__(self, fail: set[tuple[str, str]] | None = None, silent: set[str] = frozenset()):
        self.calls: list[tuple[str, str]] = []  # (stage, run name)
        self.commands: list[list[str]] = []
        self.envs: list[dict[str, str]] = []
        self.fail = fail or set()  # (stage, run name) pairs that exit with status 3
        self.silent = silent  # run names whose evaluation exits 0 without writing its file

    def __call__(self, command: list[str], log_path: Path, env: dict[str, str]) -> int:
        stage = "train" if "train" in command else "evaluate"
        run_dir = log_path.parent
        self.calls.append((stage, run_dir.name))
        self.commands.append(command)
        self.envs.append(env)
        log_path.write_text(" ".join(command))
        if (stage, run_dir.name) in self.fail:
            return 3
        spec = json.loads((run_dir / "fishertune_experiment.json").read_text())
        method, seed = spec["method"], spec["seed"]
        if stage == "train":
            model_dir = Path(option(command, "--output_dir"))
            model_dir.mkdir(parents=True, exist_ok=True)
            history = [
                {
                    "step": step,
                    "loss": 4.0 - step / 10 + seed,
                    "ce_loss": 3.9 - step / 10 + seed,
                    "grad_norm": 1.0 + seed,
                    **(
                        {"penalty": 1.0 / step, "penalty_coef": min(step / 20, 1.0)}
                        if method != "baseline"
                        else {}
                    ),
                }
                for step in (10, 20, 30)
            ]
            (model_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))
            record = {"status": "completed", "method": method, "seed": seed, "wall_time_s": 1.5}
            (model_dir / "fishertune_run.json").write_text(json.dumps(record))
        else:
            if run_dir.name in self.silent:
                return 0
            values = {
                "offline/val_loss": VAL_LOSS[method][seed],
                "offline/exact_match": EXACT[method][seed],
                "offline/n_test": 10,
            }
            directions = {"offline/val_loss": False, "offline/exact_match": True}
            Path(option(command, "--output")).write_text(
                json.dumps({"metrics": values, "higher_is_better": directions})
            )
        return 0


# ----------------------------------------------------------------------------- grid expansion


def test_grid_names_order_and_override_precedence(tmp_path: Path, base_config: Path) -> None:
    raw = experiment(
        tmp_path,
        base_config,
        ablations={
            "no-warmup": {"penalty_warmup_steps": 0, "learning_rate": 0.3},
            "data-10pct": {"dataset_fraction": 0.1},
        },
        ablation_methods={"no-warmup": ["token-f"], "data-10pct": ["token-f"]},
        ablation_seeds=[5],
    )
    config = parse_experiment(raw, tmp_path / "exp.yaml")
    runs = expand_grid(config)
    assert [r.name for r in runs] == [
        "baseline-seed0",
        "baseline-seed1",
        "baseline-seed2",
        "token-f-seed0",
        "token-f-seed1",
        "token-f-seed2",
        "token-f-no-warmup-seed5",
        "token-f-data-10pct-seed5",
    ]
    by_name = {r.name: r for r in runs}
    # overrides < method < ablation < seed
    assert by_name["baseline-seed1"].overrides == {
        "max_steps": 7,
        "learning_rate": 0.1,
        "method": "baseline",
        "seed": 1,
    }
    assert by_name["token-f-seed2"].overrides["learning_rate"] == 0.2
    ablated = by_name["token-f-no-warmup-seed5"]
    assert ablated.overrides["learning_rate"] == 0.3
    assert ablated.overrides["penalty_warmup_steps"] == 0
    assert ablated.overrides["penalty_coef"] == 0.5
    assert ablated.overrides["seed"] == 5
    assert list(ablated.overrides)[-1] == "seed"  # last on the command line, so it wins there too
    assert ablated.group == "token-f-no-warmup"
    assert by_name["token-f-data-10pct-seed5"].overrides["dataset_fraction"] == 0.1
    assert ablated.run_dir == tmp_path / "out" / "runs" / "token-f-no-warmup-seed5"
    assert ablated.model_dir == ablated.run_dir / "model"
    assert ablated.base_config == base_config.resolve()


def test_ablation_methods_default_list_and_seeds(tmp_path: Path, base_config: Path) -> None:
    ablations = {"uniform-sampling": {"penalty_sampling": "uniform"}}
    every = parse_experiment(
        experiment(tmp_path, base_config, ablations=ablations), tmp_path / "e.yaml"
    )
    names = [r.name for r in expand_grid(every)]
    assert "baseline-uniform-sampling-seed0" in names  # default: every method
    assert len(names) == 12
    chosen = parse_experiment(
        experiment(tmp_path, base_config, ablations=ablations, ablation_methods=["token-f"]),
        tmp_path / "e.yaml",
    )
    ablated = [r for r in expand_grid(chosen) if r.ablation]
    assert [r.name for r in ablated] == [f"token-f-uniform-sampling-seed{s}" for s in (0, 1, 2)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"methodz": {}}, "unknown key(s) methodz"),
        ({"seeds": []}, "seeds: expected a non-empty list"),
        ({"seeds": [0, 0]}, "seeds repeat"),
        ({"methods": {"a": {"output_dir": "x"}}}, "methods.a.output_dir: set by the grid"),
        ({"methods": {"a": {"seed": 3}}}, "methods.a.seed: set by the grid"),
        ({"methods": {"bad/name": {}}}, "must start with a letter or digit"),
        ({"ablations": {"x": {}}, "ablation_methods": ["nope"]}, "unknown method(s) ['nope']"),
        ({"launcher": "slurm"}, "launcher: 'slurm' is not one of"),
        ({"num_processes": 8}, "need launcher: accelerate"),
        ({"evaluation": {"taskz": ["offline"]}}, "evaluation: unknown key(s) taskz"),
        # the block is checked by `fishertune evaluate`'s own parser, naming the key
        ({"evaluation": {"limit": -1}}, "evaluation.limit: must be positive"),
        ({"evaluation": {"dtype": "f16"}}, "evaluation.dtype: invalid choice"),
        ({"evaluation": {"merge_adapter": "yes"}}, "evaluation.merge_adapter: expected true/false"),
        ({"evaluation": {"output": "x.json"}}, "evaluation.output: set by the grid"),
        ({"env": {"OMP_NUM_THREADS": [1]}}, "env.OMP_NUM_THREADS: expected a string"),
        ({"slurm": {"partitionz": "gpu"}}, "slurm.partitionz: not a submitit SLURM parameter"),
        ({"slurm": {"time": "1:2:3:4"}}, "slurm.time: expected minutes or SLURM's"),
        ({"slurm": {"nodes": 2}}, "slurm.nodes: more than one node needs launcher: accelerate"),
        ({"slurm": {"gpus_per_node": 0}}, "slurm.gpus_per_node: must be at least 1"),
        (
            {"launcher": "accelerate", "num_processes": 8, "slurm": {"gpus_per_node": 4}},
            "num_processes 8 differs from nodes x gpus_per_node = 1 x 4",
        ),
        (
            {"methods": {"a-b": {}, "a": {}}, "ablations": {"b": {}}},
            "two runs are both named 'a-b-seed0'",
        ),
    ],
)
def test_bad_experiment_files_name_the_field(
    tmp_path: Path, base_config: Path, changes: dict[str, Any], message: str
) -> None:
    path = write_yaml(tmp_path / "bad.yaml", experiment(tmp_path, base_config, **changes))
    with pytest.raises(FishertuneError) as info:
        load_experiment(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("time", "minutes"),
    [(90, 90), ("45", 45), ("10:30", 11), ("48:00:00", 2880), ("2-12", 3600), ("1-00:00:30", 1441)],
)
def test_slurm_time_limits_in_slurm_formats(
    tmp_path: Path, base_config: Path, time: Any, minutes: int
) -> None:
    config = parse_experiment(
        experiment(tmp_path, base_config, slurm={"time": time}), tmp_path / "e.yaml"
    )
    assert config.slurm.time_min == minutes


def test_slurm_block_and_command_line_overrides(tmp_path: Path, base_config: Path) -> None:
    raw = experiment(
        tmp_path,
        base_config,
        launcher="accelerate",
        num_processes=16,
        slurm={"nodes": 2, "partition": "gpu", "mem": 480, "setup": "module load cuda"},
    )
    path = write_yaml(tmp_path / "e.yaml", raw)
    config = load_experiment(path)
    # gpus_per_node follows from num_processes / nodes; mem in GB; one setup line
    assert (config.slurm.nodes, config.slurm.gpus_per_node) == (2, 8)
    assert config.slurm.submitit["mem"] == "480G"
    assert config.slurm.submitit["setup"] == ["module load cuda"]
    assert config.slurm_dir == config.output_dir / "slurm"
    overrides = experiment_cli.parse_set(
        ["partition=debug", "time=48:00:00", "array_parallelism=2"], "--slurm", raw_keys=("time",)
    )
    config = load_experiment(path, slurm=overrides)
    assert config.slurm.submitit["partition"] == "debug" and config.slurm.time_min == 48 * 60
    assert config.slurm.submitit["array_parallelism"] == 2 and config.slurm.nodes == 2


def test_slurm_block_hands_other_keys_to_submitit_which_checks_them(
    tmp_path: Path, base_config: Path
) -> None:
    """Keys that are not fishertune's go to submitit's SLURM executor by name (slurm_<key>);
    a misspelt one is refused at load by submitit's own check, in one line naming the field;
    the old sbatch: mapping is answered with where its options go now."""
    from fishertune.experiments.slurm import make_executor

    raw = experiment(tmp_path, base_config,
                     slurm={"constraint": "h100", "exclusive": True, "qos": "high",
                            "additional_parameters": {"mail_type": "END"}})  # fmt: skip
    config = load_experiment(write_yaml(tmp_path / "e.yaml", raw))
    make_executor(config, cluster="debug")  # submitit takes every parameter
    assert config.slurm.submitit == {"constraint": "h100", "exclusive": True, "qos": "high",
                                     "additional_parameters": {"mail_type": "END"}}  # fmt: skip
    for bad, field in (({"partiton": "gpu"}, "slurm.partiton"), ({"sbatch": {"x": 1}},
                                                                  "slurm.sbatch")):  # fmt: skip
        path = write_yaml(tmp_path / "bad.yaml", experiment(tmp_path, base_config, slurm=bad))
        with pytest.raises(FishertuneError) as err:
            load_experiment(path)
        message = str(err.value)
        assert field in message and "\n" not in message
    assert not (tmp_path / ".submitit-check").exists()


def test_load_experiment_command_line_changes(tmp_path: Path, base_config: Path) -> None:
    path = write_yaml(
        tmp_path / "e.yaml",
        experiment(tmp_path, base_config, ablations={"x": {}}, ablation_seeds=[0, 1]),
    )
    config = load_experiment(
        path, output_dir=tmp_path / "smoke", seeds=[4], overrides={"max_steps": 2}
    )
    runs = expand_grid(config)
    assert {r.seed for r in runs} == {4}
    assert all(r.overrides["max_steps"] == 2 for r in runs)
    # the command-line value sits below the method's own settings
    assert all(
        r.overrides["learning_rate"] == (0.2 if r.method == "token-f" else 0.1) for r in runs
    )
    assert config.runs_dir == tmp_path / "smoke" / "runs"


# ----------------------------------------------------------------------------- commands


def test_override_flags_follow_hf_argparser_conventions() -> None:
    flags = override_flags({"bf16": True, "a": 5, "tasks": ["x", "y"], "kw": {"k": 1}})
    assert flags == ["--bf16", "true", "--a", "5", "--tasks", "x", "y", "--kw", '{"k": 1}']


def test_train_and_evaluate_commands(tmp_path: Path, base_config: Path) -> None:
    from fishertune.evaluation.cli import build_parser as evaluate_parser

    raw = experiment(
        tmp_path,
        base_config,
        launcher="accelerate",
        accelerate_config=str(base_config),
        num_processes=8,
    )
    config = parse_experiment(raw, tmp_path / "e.yaml")
    run = expand_grid(config)[4]  # token-f-seed1
    command = train_command(config, run)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert option(command, "--num_processes") == "8"
    assert option(command, "--config_file") == str(base_config.resolve())
    # accelerate's own -m (run a module), then the fishertune command
    assert command[command.index("-m", 3) : command.index("-m", 3) + 3] == [
        "-m",
        "fishertune.cli",
        "train",
    ]
    assert option(command, "--config") == str(base_config.resolve())
    assert option(command, "--penalty_coef") == "0.5"
    assert option(command, "--seed") == "1"
    assert option(command, "--output_dir") == str(run.model_dir)
    assert "--resume" not in command and "--overwrite_output_dir" not in command

    evaluate = evaluate_command(config, run)
    assert evaluate[:4] == [sys.executable, "-m", "fishertune.cli", "evaluate"]
    # every flag the runner passes exists in `fishertune evaluate`
    args = evaluate_parser().parse_args(evaluate[4:])
    assert args.model == str(run.model_dir)
    assert args.output == str(run.run_dir / "evaluation.json")
    assert args.tasks == "offline" and args.limit == 10 and args.seed == 1


def test_evaluation_block_is_evaluates_own_flags(tmp_path: Path, base_config: Path) -> None:
    """Every option of `fishertune evaluate` can be set in the block, and reaches the command as
    that option: switches, repeated options, comma lists, k=v mappings."""
    from fishertune.evaluation.cli import build_parser as evaluate_parser

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    block = {
        "tasks": ["offline", "mmlu"],
        "dtype": "bfloat16",
        "merge_adapter": True,
        "allow_training_data": False,
        "include_path": [str(tasks)],
        "model_args": {"max_length": 512, "parallelize": True},
        "limit": 0.5,
        "data_format": "sharegpt",
    }
    config = parse_experiment(
        experiment(tmp_path, base_config, evaluation=block), tmp_path / "e.yaml"
    )
    run = expand_grid(config)[0]
    args = evaluate_parser().parse_args(evaluate_command(config, run)[4:])
    assert args.tasks == "offline,mmlu" and config.evaluation.tasks == ("offline", "mmlu")
    assert args.dtype == "bfloat16" and args.merge_adapter and not args.allow_training_data
    assert args.include_path == [str(tasks)] and args.limit == 0.5
    assert args.model_args == "max_length=512,parallelize=True"
    assert args.data_format == "sharegpt" and args.seed == run.seed
    assert config.evaluation.batch_size == 8  # evaluate's own default


def test_measure_block_is_the_measure_programs_flags(tmp_path: Path, base_config: Path) -> None:
    """The measure: block holds fishertune analyze's options, analyze's defaults where left out
    (float32 unless it says otherwise); without a dataset the run's training data is measured;
    the stage is `fishertune analyze --record` into the run's curvature.json."""
    from fishertune.analysis.cli import build_parser as measure_parser
    from fishertune.experiments.commands import measure_command

    block = {"batches": 3, "checkpoints": True, "split": ["validation", "train"], "seeds": [1]}
    config = parse_experiment(experiment(tmp_path, base_config, measure=block), tmp_path / "e.yaml")
    run = expand_grid(config)[1]  # baseline-seed1
    command = measure_command(config, run)
    assert command[2:4] == ["fishertune.cli", "analyze"]
    args = measure_parser().parse_args(command[4:])
    assert (args.batches, args.checkpoints, args.split) == (3, True, "validation,train")
    assert args.probes == 16 and args.data == "builtin:tiny-tasks" and args.dtype == "float32"
    # curvature.json holds no noise increase: the least of it is measured
    assert (args.alphas, args.noise_samples, args.no_progress) == ("1", 2, True)
    assert args.record == str(run.run_dir / "curvature.json") and args.output is None
    assert config.measure.measures(1) and not config.measure.measures(0)
    default = parse_experiment(experiment(tmp_path, base_config, measure={}), tmp_path / "e.yaml")
    spec = default.measure
    parsed = measure_parser().parse_args(["--model", "m", "--data", "d"])
    for name in ("batches", "batch_size", "probes", "max_length", "split", "checkpoints", "seed"):
        assert getattr(spec, name) == getattr(parsed, name)  # analyze's own defaults
    assert (spec.batches, spec.probes, spec.split, spec.checkpoints) == (8, 16, "train", False)
    # the former program's name of --data is read as it
    renamed = experiment(tmp_path, base_config, measure={"dataset": "x.jsonl", "batches": 2})
    spec = parse_experiment(renamed, tmp_path / "e.yaml").measure
    assert spec.data == "x.jsonl" and spec.stored["data"] == "x.jsonl"


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"probes": 1}, "measure.probes: expected an integer >= 2, got 1"),
        ({"split": "a,a"}, "measure.split: repeated split in 'a,a'"),
        ({"batches": "two"}, "measure.batches: invalid int value: 'two'"),
        ({"record": "x.json"}, "measure.record: set by the grid for each run"),
        ({"dataset": "x", "data": "y"}, "measure.dataset: the same option as measure.data"),
        ({"alphas": "1,x"}, "measure: --alphas: expected comma-separated numbers"),
    ],
)
def test_measure_block_is_checked_by_analyze(
    tmp_path: Path, base_config: Path, block: dict[str, Any], message: str
) -> None:
    raw = experiment(tmp_path, base_config, measure=block)
    with pytest.raises(FishertuneError, match=re.escape(message)):
        parse_experiment(raw, tmp_path / "e.yaml")


# ----------------------------------------------------------------------------- runner


def test_grid_runs_then_resumes_without_relaunching(tmp_path: Path, base_config: Path) -> None:
    config = parse_experiment(experiment(tmp_path, base_config), tmp_path / "e.yaml")
    launcher = FakeLauncher()
    results = run_experiment(config, launcher=launcher, log=lambda _: None)
    assert [r.status for r in results] == ["completed"] * 6
    assert len(launcher.calls) == 12  # train + evaluate per run

    again = FakeLauncher()
    results = run_experiment(config, launcher=again, log=lambda _: None)
    assert again.calls == []
    assert [r.status for r in results] == ["skipped"] * 6

    # evaluation settings changed: training is reused, evaluation runs again
    changed_eval = experiment(tmp_path, base_config, evaluation={"tasks": ["offline"], "limit": 5})
    config = parse_experiment(changed_eval, tmp_path / "e.yaml")
    relaunch = FakeLauncher()
    run_experiment(config, launcher=relaunch, only=["token-f-seed0"], log=lambda _: None)
    assert relaunch.calls == [("evaluate", "token-f-seed0")]


# baseline-seed0's fishertune_experiment.json as the code wrote it while the evaluation: and
# measure: blocks were dataclasses stored whole (EvaluationSpec, MeasureSpec), for
# experiment(...) with measure: {batches: 1, probes: 2, split: "validation,train", seeds: [0]};
# only the preset's path is filled in.
OLD_RECORD = """{
  "name": "baseline-seed0",
  "method": "baseline",
  "ablation": null,
  "seed": 0,
  "base_config": "@BASE_CONFIG@",
  "base_config_sha256": "@SHA256@",
  "overrides": {
    "max_steps": 7,
    "learning_rate": 0.1,
    "method": "baseline",
    "seed": 0
  },
  "evaluation": {
    "tasks": [
      "offline"
    ],
    "limit": 10,
    "batch_size": null,
    "max_new_tokens": null,
    "max_length": null,
    "dataset": null,
    "include_path": [],
    "num_fewshot": null,
    "model_args": null,
    "device": null,
    "alpacaeval_questions": null,
    "mtbench_questions": null,
    "answer_max_new_tokens": null,
    "extra_args": []
  },
  "measure": {
    "batches": 1,
    "batch_size": 8,
    "probes": 2,
    "fisher_draws": null,
    "max_length": 128,
    "split": "validation,train",
    "checkpoints": true,
    "seed": 0,
    "seeds": [
      0
    ],
    "dataset": null
  }
}
"""


def test_an_old_run_folder_stays_evaluated(tmp_path: Path, base_config: Path) -> None:
    """A run folder whose settings record has the old shape is neither evaluated nor measured
    again; another data set still makes its evaluation (or measurement) stale."""
    import hashlib

    from fishertune.experiments.stages import same_settings, stale_block, stored_settings

    # the old record's measurement: its values given where analyze's defaults differ
    measure = {"batches": 1, "batch_size": 8, "probes": 2, "max_length": 128, "checkpoints": True,
               "split": "validation,train", "seeds": [0]}  # fmt: skip
    config = parse_experiment(experiment(tmp_path, base_config), tmp_path / "e.yaml")
    run_experiment(config, launcher=FakeLauncher(), log=lambda _: None)
    record = config.runs_dir / "baseline-seed0" / "fishertune_experiment.json"
    sha = hashlib.sha256(base_config.read_bytes()).hexdigest()
    old = OLD_RECORD.replace("@BASE_CONFIG@", str(base_config)).replace("@SHA256@", sha)
    stored = json.loads(old)
    del stored["measure"]  # this grid has no measure: block (its entry is checked below)
    record.write_text(json.dumps(stored, indent=2))

    again = FakeLauncher()
    run_experiment(config, launcher=again, log=lambda _: None)
    assert again.calls == []

    measured = parse_experiment(
        experiment(tmp_path, base_config, measure=measure), tmp_path / "e.yaml"
    )
    current = stored_settings(measured, expand_grid(measured)[0])
    assert same_settings(json.loads(old), current)
    assert not stale_block(json.loads(old), current, "measure")
    # the preset found at another path (a new environment, another checkout) with the same
    # content is the same training; other content is not
    moved = {**json.loads(old), "base_config": "/elsewhere/site-packages/fishertune/tiny.yaml"}
    assert same_settings(moved, current)
    assert not same_settings({**moved, "base_config_sha256": "0" * 64}, current)
    other = parse_experiment(
        experiment(tmp_path, base_config, measure={**measure, "dataset": "other.jsonl"}),
        tmp_path / "e.yaml",
    )
    assert stale_block(json.loads(old), stored_settings(other, expand_grid(other)[0]), "measure")

    changed = parse_experiment(
        experiment(
            tmp_path, base_config, evaluation={"tasks": ["offline"], "limit": 10, "dataset": "x"}
        ),
        tmp_path / "e.yaml",
    )
    record.write_text(json.dumps(stored, indent=2))
    relaunch = FakeLauncher()
    run_experiment(changed, launcher=relaunch, only=["baseline-seed0"], log=lambda _: None)
    assert relaunch.calls == [("evaluate", "baseline-seed0")]


def test_a_launch_that_raises_fails_that_run_only(tmp_path: Path, base_config: Path) -> None:
    """An OSError while launching one run (a missing executable, a full disk) is that run's
    failure; the other runs of the grid still run."""
    config = parse_experiment(experiment(tmp_path, base_config), tmp_path / "e.yaml")
    fake = FakeLauncher()

    def launcher(command: list[str], log_path: Path, env: dict[str, str]) -> int:
        if log_path.parent.name == "baseline-seed1":
            raise FileNotFoundError("accelerate: command not found")
        return fake(command, log_path, env)

    results = run_experiment(config, launcher=launcher, log=lambda _: None)
    status = {r.name: r.status for r in results}
    assert status.pop("baseline-seed1") == "failed"
    assert set(status.values()) == {"completed"} and len(status) == 5
    failed = read_status(config.output_dir)["baseline-seed1"]
    assert "command not found" in failed["message"]


def test_moved_preset_with_the_same_content_is_not_a_change(
    tmp_path: Path, base_config: Path
) -> None:
    """Runs are matched to their preset by content: a checkout or environment that moved (an
    installed preset's path changes with the venv) does not make finished runs "other settings";
    an edited preset does."""
    config = parse_experiment(experiment(tmp_path, base_config), tmp_path / "e.yaml")
    run_experiment(config, launcher=FakeLauncher(), only=["token-f-seed0"], log=lambda _: None)
    moved = tmp_path / "elsewhere" / "base.yaml"
    moved.parent.mkdir()
    moved.write_bytes(base_config.read_bytes())
    config = parse_experiment(experiment(tmp_path, moved), tmp_path / "e.yaml")
    again = FakeLauncher()
    run_experiment(config, launcher=again, only=["token-f-seed0"], log=lambda _: None)
    assert again.calls == []
    moved.write_text(moved.read_text() + "learning_rate: 0.5\n")
    with pytest.raises(FishertuneError, match=r"token-f-seed0"):
        run_experiment(config, launcher=FakeLauncher(), only=["token-f-seed0"], log=lambda _: None)


def test_run_with_changed_training_settings_is_refused(tmp_path: Path, base_config: Path) -> None:
    config = parse_experiment(experiment(tmp_path, base_config), tmp_path / "e.yaml")
    run_experiment(config, launcher=FakeLauncher(), only=["token-f"], log=lambda _: None)
    raw = experiment(tmp_path, base_config)
    raw["methods"]["token-f"]["penalty_coef"] = 0.25
    changed = parse_experiment(raw, tmp_path / "e.yaml")
    launcher = FakeLauncher()
    with pytest.raises(FishertuneError, match=r"token-f-seed0, token-f-seed1, token-f-seed2"):
        run_experiment(changed, launcher=launcher, log=lambda _: None)
    assert launcher.calls == []  # refused before anything is launched
    # runs never started with the old settings are not in the way
    run_experiment(changed, launcher=launcher, only=["baseline"], log=lambda _: None)
    assert len(launcher.calls) == 6


def test_interrupted_training_resumes_or_restarts(tmp_path: Path, base_config: Path) -> None:
    config = parse_experiment(experiment(tmp_path, base_config, seeds=[0]), tmp_path / "e.yaml")
    runs = {r.name: r for r in expand_grid(config)}
    # baseline: killed after a complete checkpoint; token-f: killed before the first one
    checkpoint = runs["baseline-seed0"].model_dir / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "fishertune_checkpoint.json").write_text('{"step": 4}')
    runs["token-f-seed0"].model_dir.mkdir(parents=True)
    (runs["token-f-seed0"].model_dir / "README.md").write_text("partial")
    launcher = FakeLauncher()
    run_experiment(config, launcher=launcher, log=lambda _: None)
    train = {cmd[cmd.index("--output_dir") + 1]: cmd for cmd in launcher.commands if "train" in cmd}
    assert option(train[str(runs["baseline-seed0"].model_dir)], "--resume") == "true"
    token_f = train[str(runs["token-f-seed0"].model_dir)]
    assert option(token_f, "--overwrite_output_dir") == "true"
    assert "--resume" not in token_f


def test_failing_run_is_recorded_and_the_grid_goes_on(tmp_path: Path, base_config: Path) -> None:
    config = parse_experiment(experiment(tmp_path, base_config), tmp_path / "e.yaml")
    launcher = FakeLauncher(fail={("train", "baseline-seed1")}, silent={"token-f-seed2"})
    results = run_experiment(config, launcher=launcher, log=lambda _: None)
    status = {r.name: r for r in results}
    assert status["baseline-seed1"].status == "failed"
    assert status["baseline-seed1"].stage == "train"
    assert status["baseline-seed1"].returncode == 3
    assert ("evaluate", "baseline-seed1") not in launcher.calls  # no evaluation of a failed run
    assert status["token-f-seed2"].status == "failed"  # exit 0 without its evaluation.json
    assert "evaluation.json is missing" in status["token-f-seed2"].message
    assert [status[n].status for n in ("baseline-seed2", "token-f-seed0", "token-f-seed1")] == [
        "completed"
    ] * 3
    recorded = json.loads((config.output_dir / STATUS_FILE).read_text())["runs"]
    assert [(e["name"], e["status"]) for e in recorded if e["status"] == "failed"] == [
        ("baseline-seed1", "failed"),
        ("token-f-seed2", "failed"),
    ]
    assert Path(recorded[1]["log"]).read_text().startswith(sys.executable)

    # the next invocation retries only the failed stages, and the status file is updated
    retry = FakeLauncher()
    run_experiment(config, launcher=retry, log=lambda _: None)
    assert retry.calls == [
        ("train", "baseline-seed1"),
        ("evaluate", "baseline-seed1"),
        ("evaluate", "token-f-seed2"),
    ]
    recorded = json.loads((config.output_dir / STATUS_FILE).read_text())["runs"]
    assert {e["status"] for e in recorded} == {"completed", "skipped"}


def test_whole_grid_is_validated_before_the_first_run(
    tmp_path: Path, base_config: Path, capsys
) -> None:
    """A bad method or option in the last run is found before the first run trains."""
    raw = experiment(tmp_path, base_config)
    raw["methods"]["token-f"]["method"] = "token-ff"
    config = parse_experiment(raw, tmp_path / "e.yaml")
    launcher = FakeLauncher()
    for dry_run in (True, False):
        with pytest.raises(
            FishertuneError, match=r"run token-f-seed0 \(method 'token-f'\).*token-ff"
        ):
            run_experiment(config, launcher=launcher, dry_run=dry_run, log=lambda _: None)
    assert launcher.calls == []
    assert not (config.output_dir / "runs").exists()
    # an option that belongs to another method, and an unknown option, likewise
    raw = experiment(tmp_path, base_config)
    raw["methods"]["baseline"]["penalty_coef"] = 0.1
    with pytest.raises(FishertuneError, match=r"baseline-seed0.*penalty_coef given with method"):
        run_experiment(parse_experiment(raw, tmp_path / "e.yaml"), launcher=launcher)
    raw = experiment(tmp_path, base_config)
    raw["overrides"]["learning_ratez"] = 0.1
    path = write_yaml(tmp_path / "e.yaml", raw)
    assert cli_main(["experiment", "--config", str(path), "--dry_run"]) == 2
    assert "learning_ratez" in capsys.readouterr().err
    assert launcher.calls == []


def test_failed_attempt_does_not_block_the_corrected_rerun(
    tmp_path: Path, base_config: Path
) -> None:
    raw = experiment(tmp_path, base_config, seeds=[0])
    config = parse_experiment(raw, tmp_path / "e.yaml")
    # the first attempt dies early: a partial model folder, no checkpoint
    launcher = FakeLauncher(fail={("train", "token-f-seed0")})
    run_experiment(config, launcher=launcher, log=lambda _: None)
    model_dir = config.runs_dir / "token-f-seed0" / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "partial.bin").write_text("debris")
    # corrected settings: the debris is cleared and the run trains from scratch
    raw["methods"]["token-f"]["penalty_coef"] = 0.25
    corrected = parse_experiment(raw, tmp_path / "e.yaml")
    retry = FakeLauncher()
    results = run_experiment(corrected, launcher=retry, log=lambda _: None)
    assert [r.status for r in results] == ["skipped", "completed"]
    assert not (model_dir / "partial.bin").exists()
    train = next(cmd for cmd in retry.commands if "train" in cmd)
    assert "--overwrite_output_dir" not in train and "--resume" not in train
    spec = json.loads(
        (config.runs_dir / "token-f-seed0" / "fishertune_experiment.json").read_text()
    )
    assert spec["overrides"]["penalty_coef"] == 0.25
    # but a folder holding a checkpoint of other settings is never cleared
    raw["methods"]["token-f"]["penalty_coef"] = 0.5
    checkpoint = model_dir / "checkpoint-2"
    (model_dir / "fishertune_run.json").unlink()
    checkpoint.mkdir()
    (checkpoint / "fishertune_checkpoint.json").write_text("{}")
    with pytest.raises(FishertuneError, match=r"token-f-seed0 under .* hold runs trained"):
        run_experiment(parse_experiment(raw, tmp_path / "e.yaml"), launcher=retry)
    assert checkpoint.is_dir()


def test_one_runner_per_output_directory(tmp_path: Path, base_config: Path) -> None:
    import os
    import subprocess

    from fishertune.locks import RunnerLock, folder_lock_path

    config = parse_experiment(experiment(tmp_path, base_config, seeds=[0]), tmp_path / "e.yaml")
    with RunnerLock(config.output_dir):
        launcher = FakeLauncher()
        with pytest.raises(FishertuneError, match=rf"PID {os.getpid()} on .* is running on"):
            run_experiment(config, launcher=launcher, log=lambda _: None)
        assert launcher.calls == []
    # a lock file left by a runner that died is taken over
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    folder_lock_path(config.output_dir).write_text(f"{dead.stdout.strip()} somehost\n")
    results = run_experiment(config, launcher=FakeLauncher(), log=lambda _: None)
    assert [r.status for r in results] == ["completed", "completed"]


def test_parallel_runs_get_their_own_gpus_in_queue_order(tmp_path: Path, base_config: Path) -> None:
    import threading
    import time

    from fishertune.experiments.runner import gpu_slots

    assert gpu_slots(2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert gpu_slots(3, []) == [None, None, None]  # no GPU: CPU runs side by side
    with pytest.raises(FishertuneError, match="--parallel 3 with 2 GPU"):
        gpu_slots(3, ["0", "1", "2", "3"], per_run=2)

    class Concurrent(FakeLauncher):
        def __init__(self) -> None:
            super().__init__()
            self.active: dict[str, str] = {}  # CUDA_VISIBLE_DEVICES -> run
            self.lock = threading.Lock()
            self.peak = 0
            self.devices: dict[str, set[str]] = {}

        def __call__(self, command: list[str], log_path: Path, env: dict[str, str]) -> int:
            devices = env["CUDA_VISIBLE_DEVICES"]
            with self.lock:
                assert devices not in self.active, "two runs on the same GPUs"
                self.active[devices] = log_path.parent.name
                self.peak = max(self.peak, len(self.active))
                self.devices.setdefault(log_path.parent.name, set()).add(devices)
                code = super().__call__(command, log_path, env)
            time.sleep(0.05)
            with self.lock:
                del self.active[devices]
            return code

    config = parse_experiment(experiment(tmp_path, base_config), tmp_path / "e.yaml")
    launcher = Concurrent()
    lines: list[str] = []
    results = run_experiment(
        config, launcher=launcher, parallel=2, gpus=["0", "1", "2", "3"], log=lines.append
    )
    assert [r.status for r in results] == ["completed"] * 6
    assert launcher.peak == 2
    assert all(len(devices) == 1 for devices in launcher.devices.values())  # a run keeps its GPUs
    assert {d for ds in launcher.devices.values() for d in ds} == {"0,1", "2,3"}
    # queued in order: the first two runs start first
    first_two = [name for stage, name in launcher.calls if stage == "train"][:2]
    assert sorted(first_two) == ["baseline-seed0", "baseline-seed1"]
    # a quiet console: one line per run with its status and time, no commands
    assert len(lines) == 6 and all(": completed in " in line for line in lines)
    assert not any("fishertune train" in line for line in lines)


STOPPABLE_RUNNER = """
import sys, subprocess
from pathlib import Path
from fishertune.experiments.experiment_file import load_experiment
from fishertune.experiments.processes import subprocess_launcher
from fishertune.experiments.runner import run_experiment

def launcher(command, log_path, env):
    # a 'training' that starts a grandchild and waits: both must die with the runner
    child = ["-c", "import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
             "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(120)", sys.argv[2]]
    return subprocess_launcher([sys.executable, *child], log_path, env)

run_experiment(load_experiment(sys.argv[1]), launcher=launcher)
"""


def test_stopping_the_runner_stops_its_children(tmp_path: Path, base_config: Path) -> None:
    import signal
    import subprocess
    import time

    path = write_yaml(tmp_path / "e.yaml", experiment(tmp_path, base_config, seeds=[0]))
    pid_file = tmp_path / "grandchild.pid"
    runner = subprocess.Popen(
        [sys.executable, "-c", STOPPABLE_RUNNER, str(path), str(pid_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and runner.poll() is None, runner.stdout.read().decode()
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=60) == 128 + signal.SIGTERM
    # the whole process group went: gone, or a zombie not reaped yet (its parent died; a loaded
    # machine's init reaps it late), within a grace period
    deadline = time.time() + 20
    while not _process_gone(grandchild):
        assert time.time() < deadline, f"process {grandchild} still runs"
        time.sleep(0.1)
    status = json.loads((tmp_path / "out" / STATUS_FILE).read_text())["runs"]
    assert [(e["name"], e["status"]) for e in status] == [("baseline-seed0", "interrupted")]


def _process_gone(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_run_that_finished_as_the_runner_stopped_is_recorded_completed(
    tmp_path: Path, base_config: Path
) -> None:
    """The stop lands just as a run's last stage has written its product: the status file
    says completed, as --status (which reads the run folders) does, not interrupted."""
    from fishertune.experiments.slurm import grid_status

    config = parse_experiment(experiment(tmp_path, base_config, seeds=[0]), tmp_path / "e.yaml")
    fake = FakeLauncher()

    def stopped_after_evaluating(command: list[str], log_path: Path, env: dict[str, str]) -> int:
        code = fake(command, log_path, env)
        if "evaluate" in command:
            raise KeyboardInterrupt
        return code

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, launcher=stopped_after_evaluating, log=lambda _: None)
    first = expand_grid(config)[0].name
    assert read_status(config.output_dir)[first]["status"] == "completed"
    views = {view.name: view.state for view in grid_status(config, states=lambda ids: {})}
    assert views[first] == "completed"


# ----------------------------------------------------------------------------- aggregation


def record(name: str, method: str, seed: int, ablation: str | None = None, **metrics: float):
    return RunRecord(name=name, method=method, ablation=ablation, seed=seed, metrics=metrics)


def test_aggregate_mean_std_and_best_by_direction() -> None:
    records = [
        record("a0", "a", 0, loss=1.0, acc=0.2),
        record("a1", "a", 1, loss=2.0, acc=0.4),
        record("a2", "a", 2, loss=6.0, acc=0.9),
        record("b0", "b", 0, loss=2.0, acc=0.6),
        record("b1", "b", 1, loss=4.0),  # acc missing in one seed
        record("c0", "c", 0, loss=3.0, acc=0.5),
    ]
    table = aggregate(records, higher_is_better={"loss": False, "acc": True})
    assert table.rows == ["a", "b", "c"]
    assert table.columns == ["loss", "acc"]
    a_loss = table.cells["a"]["loss"]
    # mean 3, sample variance ((1-3)^2 + (2-3)^2 + (6-3)^2) / 2 = 7
    assert a_loss.mean == pytest.approx(3.0) and a_loss.std == pytest.approx(math.sqrt(7.0))
    # acc 0.2, 0.4, 0.9: mean 0.5, sample variance (0.09 + 0.01 + 0.16) / 2 = 0.13
    assert table.cells["a"]["acc"].std == pytest.approx(math.sqrt(0.13))
    assert table.cells["b"]["acc"].n == 1 and table.cells["b"]["acc"].std is None
    assert table.n_runs == {"a": 3, "b": 2, "c": 1}
    # lower is better for loss: b and c tie at 3.0 with a; all three marked
    assert table.best["loss"] == {"a", "b", "c"}
    # higher is better for acc: b's 0.6 beats a's 0.5 and c's 0.5
    assert table.best["acc"] == {"b"}
    flipped = aggregate(records, higher_is_better={"loss": True, "acc": False})
    assert flipped.best["loss"] == {"a", "b", "c"} and flipped.best["acc"] == {"a", "c"}
    unknown = aggregate(records, higher_is_better={})
    assert unknown.best == {"loss": set(), "acc": set()}

    text = format_markdown(table, digits=2)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "|" in line}
    assert "**0.60 (n=1)**" in lines["b"]
    assert "0.50 ± 0.36" in lines["a"] and "**" not in lines["a"].split(" | ")[3]
    assert "loss ↓" in text and "acc ↑" in text


def test_aggregate_single_and_distinct_means() -> None:
    records = [record("x", "x", 0, loss=1.5), record("y0", "y", 0, loss=1.0)]
    records.append(record("y1", "y", 1, loss=1.2))
    table = aggregate(records, higher_is_better={"loss": False})
    assert table.best["loss"] == {"y"}
    assert table.cells["y"]["loss"].mean == pytest.approx(1.1)
    assert table.cells["y"]["loss"].std == pytest.approx(math.sqrt(0.02))


# ----------------------------------------------------------------------------- reports and CLI


def test_report_files_from_fake_runs(tmp_path: Path, base_config: Path) -> None:
    raw = experiment(
        tmp_path,
        base_config,
        ablations={"no-warmup": {"penalty_warmup_steps": 0}},
        ablation_methods=["token-f"],
        ablation_seeds=[0, 1],
    )
    config = parse_experiment(raw, tmp_path / "e.yaml")
    run_experiment(config, launcher=FakeLauncher(), log=lambda _: None)
    records = load_run_records(config.runs_dir, [r.name for r in expand_grid(config)])
    assert len(records) == 8
    assert records[0].log_history[0]["ce_loss"] == pytest.approx(2.9)
    assert records[0].wall_time_s == 1.5
    written = write_report(records, config.report_dir, title="fake")
    assert set(written) == {
        "results_md",
        "results_csv",
        "benchmarks_png",
        "training_curves_png",
        "ablations_csv",
        "ablations_png",
        "training_curves_ablations_png",
    }
    for key, path in written.items():
        if key.endswith("_png"):
            assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000

    with (config.report_dir / "results.csv").open() as handle:
        rows = {row["row"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"baseline", "token-f"}
    assert float(rows["token-f"]["offline/val_loss_mean"]) == pytest.approx(2.5)
    assert float(rows["token-f"]["offline/val_loss_std"]) == pytest.approx(0.5)
    assert float(rows["baseline"]["offline/exact_match_std"]) == pytest.approx(0.1)
    # lower val_loss is better (token-f), higher exact_match is better (baseline)
    assert (
        rows["token-f"]["offline/val_loss_best"],
        rows["baseline"]["offline/val_loss_best"],
    ) == (
        "1",
        "0",
    )
    assert rows["baseline"]["offline/exact_match_best"] == "1"
    assert "offline/n_test_mean" not in rows["baseline"]  # counts are not results

    markdown = (config.report_dir / "results.md").read_text()
    assert "| token-f | 3 | **2.500 ± 0.500** |" in markdown
    assert "| baseline | 3 | 3.200 ± 0.200 | **0.600 ± 0.100** |" in markdown
    with (config.report_dir / "ablations.csv").open() as handle:
        ablation_rows = [row["row"] for row in csv.DictReader(handle)]
    assert ablation_rows == ["token-f", "token-f-no-warmup"]  # the reference row first


def test_cli_runs_grid_and_rebuilds_report(
    tmp_path: Path, base_config: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from fishertune.experiments import runner

    raw = experiment(tmp_path, base_config, seeds=[0, 1], env={"OMP_NUM_THREADS": 1})
    path = write_yaml(tmp_path / "e.yaml", raw)
    launcher = FakeLauncher(fail={("evaluate", "token-f-seed1")})
    monkeypatch.setattr(runner, "subprocess_launcher", launcher)
    assert cli_main(["experiment", "--config", str(path), "--dry-run"]) == 0
    assert launcher.calls == []
    assert "OMP_NUM_THREADS=1 fishertune train --config" in capsys.readouterr().out

    assert cli_main(["experiment", "--config", str(path)]) == 1  # one run failed
    out = capsys.readouterr().out
    assert "3/4 runs finished, 1 failed" in out
    assert launcher.envs == [{"OMP_NUM_THREADS": "1"}] * 8
    report = tmp_path / "out" / "report"
    assert (report / "results.md").is_file()
    assert "token-f-seed1" in (report / "results.md").read_text()  # listed as incomplete

    (report / "results.md").unlink()
    calls = len(launcher.calls)
    assert experiment_cli.main(["--config", str(path), "--report-only"]) == 0
    assert len(launcher.calls) == calls  # nothing launched
    assert (report / "results.md").is_file() and (report / "training_curves.png").is_file()
    # a report of these runs under other settings is refused, naming them
    with pytest.raises(FishertuneError, match="baseline-seed0, baseline-seed1, token-f-seed0"):
        experiment_cli.main(["--config", str(path), "--report_only", "--max_steps", "3"])

    assert cli_main(["experiment", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: experiment file not found" in capsys.readouterr().err
    with pytest.raises(FishertuneError, match="--set 'max_steps': expected KEY=VALUE"):
        experiment_cli.main(["--config", str(path), "--set", "max_steps", "--dry_run"])


# ----------------------------------------------------------------------------- shipped configs


def test_shipped_tiny_experiments_expand_and_parse(tmp_path: Path) -> None:
    """Every run of the tiny grids gives `fishertune train` a valid configuration."""
    from fishertune.demo import METHOD_ORDER, method_overrides
    from fishertune.training.cli import parse_args

    main = load_experiment(REPO / "configs/experiments/tiny.yaml")
    assert list(main.methods) == list(METHOD_ORDER) and main.seeds == (0, 1, 2)
    assert main.evaluation.tasks == ("offline",)
    assert main.base_config == (REPO / "configs/tiny.yaml").resolve()
    # `fishertune demo` reads the same methods section
    assert method_overrides(REPO / "configs/experiments/tiny.yaml") == main.methods
    ablations = load_experiment(REPO / "configs/experiments/tiny-ablations.yaml")
    runs = expand_grid(main) + expand_grid(ablations)
    assert len(runs) == 12 + 24
    seen = {}
    for run in runs:
        if run.seed != 0:
            continue  # seeds change nothing else; parsing is the slow part
        command = train_command(main, run)
        argv = command[command.index("train") + 1 :]
        _, training_args, _ = parse_args(argv)
        seen[run.group] = training_args
        assert training_args.method == run.overrides["method"]
        assert training_args.output_dir == str(run.model_dir)
    assert seen["token-f"].penalty_coef > 1e-3  # tiny-model scale, not the 8B paper's 2e-6
    assert seen["token-f-no-warmup"].penalty_warmup_steps == 0
    assert seen["logit-f-uniform-sampling"].penalty_sampling == "uniform"
    assert seen["neftune"].neftune_alpha == 5.0


def test_shipped_paper_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = yaml.safe_load((REPO / "configs/experiments/paper.yaml").read_text())
    assert set(raw["methods"]) == {"baseline", "neftune", "token-f", "logit-f"}
    assert raw["methods"]["token-f"] == {"base_config": "paper/token-f"}  # a preset name
    assert raw["launcher"] == "accelerate" and raw["num_processes"] == 8
    assert raw["evaluation"]["tasks"] == ["mmlu", "ifeval", "truthfulqa_mc2"]
    # the judge question files are the user's to download: stand-ins in the working directory
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FishertuneError, match=r"evaluation\.alpacaeval_questions: data/alpaca"):
        load_experiment(REPO / "configs/experiments/paper.yaml")
    (tmp_path / "data/mt_bench").mkdir(parents=True)
    (tmp_path / "data/alpaca_eval.json").write_text("[]")
    (tmp_path / "data/mt_bench/question.jsonl").write_text("")
    config = load_experiment(REPO / "configs/experiments/paper.yaml")
    runs = expand_grid(config)
    evaluate = evaluate_command(config, runs[0])
    assert option(evaluate, "--mtbench_questions") == str(tmp_path / "data/mt_bench/question.jsonl")
    assert option(evaluate, "--answers_dir") == str(runs[0].run_dir / "answers")
    assert option(evaluate, "--model_id") == "baseline-seed123"
    assert len(runs) == 12 + 2 * 3 * 3
    assert all(r.overrides.get("dataset_fraction") == 0.1 for r in runs if r.ablation)
    assert config.accelerate_config == (REPO / "configs/accelerate/deepspeed_zero3.yaml").resolve()
    # on SLURM: one node, 8 GPUs, the accelerate launch of ZeRO-3 with 8 processes
    assert (config.slurm.nodes, config.slurm.gpus_per_node, config.num_processes) == (1, 8, 8)
    assert config.slurm.time_min == 48 * 60 and config.slurm.submitit["exclusive"] is True
    # every run's configuration is one `fishertune train` accepts, checked on a CPU-only machine
    validate_grid(config, runs)


# ----------------------------------------------------------------------------- end to end


def test_real_grid_end_to_end(tmp_path: Path) -> None:
    """`fishertune experiment` launching the real train and evaluate commands: 1 run, 2 steps."""
    path = write_yaml(
        tmp_path / "e2e.yaml",
        {
            "base_config": str(REPO / "configs/tiny.yaml"),
            "output_dir": str(tmp_path / "out"),
            "overrides": {
                "max_steps": 2,
                "logging_steps": 1,
                "per_device_train_batch_size": 4,
                "tiny_hidden_size": 32,
                "save_strategy": "no",
                "report_to": "none",
                "disable_tqdm": True,
                "dataset_fraction": 0.05,
            },
            "methods": {"token-f": {"method": "token-f", "penalty_coef": 0.1}},
            "seeds": [0],
            "evaluation": {"tasks": ["offline"], "limit": 4, "max_new_tokens": 4},
            "env": {"OMP_NUM_THREADS": "1"},  # 2 threads on a busy 2-core machine: 10x slower
        },
    )
    assert experiment_cli.main(["--config", str(path)]) == 0
    run_dir = tmp_path / "out" / "runs" / "token-f-seed0"
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert math.isfinite(evaluation["metrics"]["offline/val_loss"])
    history = json.loads((run_dir / "model" / "trainer_state.json").read_text())["log_history"]
    assert any("penalty" in entry and "ce_loss" in entry for entry in history)
    rows = list(csv.DictReader((tmp_path / "out" / "report" / "results.csv").open()))
    assert rows[0]["row"] == "token-f" and rows[0]["n"] == "1"
    assert (tmp_path / "out" / "report" / "training_curves.png").read_bytes()[:8] == PNG_MAGIC
