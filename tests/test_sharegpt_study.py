"""The ShareGPT equivalence study: its data split, the preloaded launcher, and a shortened grid
end to end (base, two noise levels x five methods, two seeds) with its report's statistics checked
against a direct computation from the runs' own evaluation files."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from scipy import stats

from fishertune.errors import FishertuneError
from fishertune.experiments import cli as experiment_cli
from fishertune.experiments.experiment_file import load_experiment, parse_experiment
from fishertune.experiments.grid import expand_grid
from fishertune.experiments.runner import run_experiment
from fishertune.studies.equivalence.data import StudyData, prepare_study_data, text_chunks
from test_experiments import write_yaml

REPO = Path(__file__).resolve().parents[1]


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


WORDS = [
    "the",
    "model",
    "learns",
    "to",
    "answer",
    "short",
    "questions",
    "about",
    "plants",
    "rivers",
    "cities",
    "and",
    "numbers",
]


def conversation(i: int, turns: int = 2, user_chars: int = 60) -> list[dict[str, str]]:
    out = []
    for t in range(turns):
        words = " ".join(WORDS[(i + t + k) % len(WORDS)] for k in range(user_chars // 6))
        out.append({"from": "human" if t % 2 == 0 else "gpt", "value": f"{words} {i} {t}"})
    return out


def sharegpt_file(path: Path, groups: int = 120) -> Path:
    """A ShareGPT V3-style dump: most conversations in two records ``<id>_0``, ``<id>_1``; some
    with a long first turn (not usable as chat rows) and a few non-ASCII ones."""
    records = []
    for g in range(groups):
        first_turn = 400 if g % 10 == 3 else 60
        records.append({"id": f"g{g}_0", "conversations": conversation(g, 4, first_turn)})
        if g % 2 == 0:
            records.append({"id": f"g{g}_1", "conversations": conversation(g + 1, 2)})
        if g % 25 == 7:
            records[-1]["conversations"][1]["value"] = "Привет, как дела? " * 10
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


SMALL = StudyData(
    finetune=12,
    validation=6,
    test=6,
    pretrain_chars=4000,
    pretrain_validation_rows=4,
    first_turn_chars=120,
    conversation_chars=300,
    chunk_chars=120,
    vocab_size=300,
)


def test_text_chunks_cut_at_whitespace() -> None:
    text = "alpha beta gamma delta epsilon " * 5
    pieces = list(text_chunks(text, 20))
    assert all(0 < len(p) <= 20 for p in pieces)
    assert " ".join(pieces).split() == text.split()  # no word lost or cut
    assert list(text_chunks("x" * 45, 20)) == ["x" * 20, "x" * 20, "x" * 5]


def test_study_data_parts_are_disjoint_by_original_conversation(tmp_path: Path) -> None:
    source = sharegpt_file(tmp_path / "sharegpt.json")
    manifest = prepare_study_data(tmp_path / "data", source=str(source), sizes=SMALL)
    data = tmp_path / "data"
    chat = {split: read_jsonl(data / "chat" / f"{split}.jsonl") for split in
            ("train", "validation", "test")}  # fmt: skip
    assert {k: len(v) for k, v in chat.items()} == {"train": 12, "validation": 6, "test": 6}
    groups = {split: {row["group"] for row in rows} for split, rows in chat.items()}
    assert not groups["train"] & groups["validation"]
    assert not groups["train"] & groups["test"] and not groups["validation"] & groups["test"]
    for rows in chat.values():
        for row in rows:
            roles = [m["role"] for m in row["messages"]]
            assert roles[0] == "user" and roles[-1] == "assistant"
            assert len(row["messages"][0]["content"]) <= SMALL.first_turn_chars
            assert all(ord(ch) < 128 for m in row["messages"] for ch in m["content"])
    # part A: the text of other conversations only (no chat row's text appears in it)
    pretrain = " ".join(r["text"] for r in read_jsonl(data / "pretrain" / "train.jsonl"))
    for rows in chat.values():
        for row in rows:
            assert row["messages"][0]["content"] not in pretrain
    assert all(len(r["text"]) <= SMALL.chunk_chars for r in
               read_jsonl(data / "pretrain" / "train.jsonl"))  # fmt: skip
    assert manifest["parts"]["chat/train"]["rows"] == 12
    assert manifest["reader"]["format"] == "sharegpt"
    # the tokenizer: the tiny chat template, assistant turns marked
    from fishertune.data.tokenizer import load_chat_tokenizer

    tokenizer = load_chat_tokenizer(str(data / "tokenizer"))
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 5]) == [
        "<pad>",
        "<s>",
        "</s>",
        "<|assistant|>",
    ]
    assert len(tokenizer) <= SMALL.vocab_size
    # same settings: nothing is written again
    stamp = (data / "manifest.json").stat().st_mtime_ns
    assert prepare_study_data(data, source=str(source), sizes=SMALL) == manifest
    assert (data / "manifest.json").stat().st_mtime_ns == stamp
    # too few conversations for the sizes asked
    with pytest.raises(FishertuneError, match="too few usable conversations"):
        prepare_study_data(tmp_path / "d2", source=str(source), sizes=StudyData(finetune=10_000))


def test_preloaded_launcher_runs_stages_as_forks(tmp_path: Path) -> None:
    from fishertune.experiments.preload import PreloadedLauncher

    launcher = PreloadedLauncher({"OMP_NUM_THREADS": "1"})
    try:
        log = tmp_path / "a" / "stage.log"
        assert launcher([sys.executable, "-m", "fishertune.cli", "--version"], log, {}) == 0
        assert "fishertune " in log.read_text()
        code = launcher([sys.executable, "-m", "fishertune.cli", "nope"], log, {"X": "1"})
        assert code == 2 and "unknown command 'nope'" in log.read_text()
        # a FishertuneError from a stage: its one line in the log, status 2
        bad = [sys.executable, "-m", "fishertune.cli", "analyze", "--model", str(tmp_path),
               "--data", "builtin:tiny-tasks", "--record", str(tmp_path / "c.json")]  # fmt: skip
        assert launcher(bad, log, {}) == 2 and "not a saved model folder" in log.read_text()
    finally:
        launcher.close()


def test_shipped_sharegpt_equivalence_grid(tmp_path: Path) -> None:
    """The preset: base, then baseline + 3 levels x 4 regularizers, 6 seeds, matched row by
    row; the penalized arms differ by one cause each (same gradient mode, 2 draws or probes);
    the margin a fraction of NEFTune's effect; greedy answers generated; measured with 32 probes
    on 8 batches of two splits."""
    config = load_experiment("sharegpt-equivalence", output_dir=tmp_path / "out")
    runs = expand_grid(config)
    assert len(runs) == 1 + 6 * (1 + 3 * 4) and runs[0].name == "base"
    # a regime that overfits, with validation loss along training (not for the base)
    fine_tune = runs[1].overrides
    assert fine_tune["eval_strategy"] == "steps" and fine_tune["dataset_test_split"] == "validation"
    assert fine_tune["max_steps"] * fine_tune["per_device_train_batch_size"] > 4 * 100
    assert runs[0].overrides["eval_strategy"] == "no"
    options = config.report_options
    assert config.study == "equivalence" and options["ratio_margin"] == pytest.approx(0.25)
    assert options["margin"] is None  # an absolute margin can be wider than the effect to match
    assert config.evaluation.max_new_tokens > 0
    spec = config.measure
    assert spec is not None and spec.probes >= 32 and spec.batches >= 8
    assert spec.split == "validation,train" and spec.seeds == (0,)
    assert config.study_data is not None
    alphas: dict[str, set[float]] = {}
    for name, overrides in config.methods.items():
        if name == "baseline":
            continue
        level = name.rsplit("-r", 1)[1]
        alpha = overrides.get("neftune_alpha", overrides.get("penalty_match_neftune_alpha"))
        alphas.setdefault(level, set()).add(alpha)
        if overrides["method"] != "neftune":
            assert overrides["penalty_warmup_steps"] == 0
            assert overrides["penalty_grad"] == "fd" and overrides["penalty_fd_scheme"] == "central"
            assert overrides["penalty_samples"] == 2
    assert {level: len(values) for level, values in alphas.items()} == {"0.5": 1, "1": 1, "2": 1}
    ratios = sorted(next(iter(v)) for v in alphas.values())
    assert [r / ratios[1] for r in ratios] == pytest.approx([0.5, 1.0, 2.0], rel=1e-3)


def test_shortened_study_end_to_end(tmp_path: Path) -> None:
    """Data, base, two levels x (NEFTune, Hessian-trace, token-F unbiased and paper) and the
    baseline, two seeds, a few steps of a 32-wide model; seed 0 measured on two splits."""
    source = sharegpt_file(tmp_path / "sharegpt.json")
    data = tmp_path / "data"
    small = dict(SMALL.__dict__)
    tiny = {
        "tokenizer_name_or_path": str(data / "tokenizer"),
        "dataset_name": str(data / "chat"),
        "tiny_hidden_size": 32,
        "per_device_train_batch_size": 4,
        "max_length": 48,
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 1,
        "max_steps": 3,
        "save_strategy": "no",
        # validation loss along training, as the preset evaluates it
        "eval_strategy": "steps",
        "eval_steps": 1,
        "dataset_test_split": "validation",
    }
    methods: dict[str, Any] = {"baseline": {"method": "baseline"}}
    for tag, alpha in (("lo", 0.05), ("hi", 0.5)):
        methods[f"neftune-{tag}"] = {"method": "neftune", "neftune_alpha": alpha}
        matched = {"penalty_match_neftune_alpha": alpha, "penalty_warmup_steps": 0}
        methods[f"hessian-trace-{tag}"] = {"method": "hessian-trace", "penalty_grad": "fd",
                                           **matched}  # fmt: skip
        methods[f"token-f-paper-{tag}"] = {"method": "token-f", **matched}
        unbiased = {"method": "token-f", "penalty_estimator": "unbiased"}
        methods[f"token-f-unbiased-{tag}"] = {**unbiased, **matched}
    raw: dict[str, Any] = {
        "base_config": str(REPO / "configs/tiny.yaml"),
        "output_dir": str(tmp_path / "out"),
        "study_data": {"out": str(data), "source": str(source), **small},
        "overrides": tiny,
        "base": {"max_steps": 4, "dataset_name": str(data / "pretrain"), "eval_strategy": "no"},
        "methods": methods,
        "seeds": [0, 1],
        "evaluation": {
            "tasks": ["offline"],
            "dataset": str(data / "chat"),
            "max_new_tokens": 0,
            "max_length": 48,
        },
        "measure": {
            "dataset": str(data / "chat"),
            "split": "validation,train",
            "batches": 2,
            "batch_size": 2,
            "probes": 2,
            "max_length": 48,
            "checkpoints": False,
            "seeds": [0],
        },
        "report": {"study": "equivalence", "margin": 0.05, "ratio_margin": 0.25},
        "env": {"OMP_NUM_THREADS": "1"},
    }
    path = write_yaml(tmp_path / "study.yaml", raw)
    config = parse_experiment(raw, path)
    results = run_experiment(config, launcher=in_process, log=lambda _: None)
    assert all(r.status == "completed" for r in results), [(r.name, r.message) for r in results]
    measured = sorted(p.parent.name for p in config.runs_dir.glob("*/curvature.json"))
    assert measured == sorted(["base", *(f"{n}-seed0" for n in methods)])
    assert experiment_cli.main(["--config", str(path), "--report_only"]) == 0

    report = tmp_path / "out" / "report"
    summary = json.loads((report / "equivalence.json").read_text())
    assert finite_numbers(summary) == []
    base = summary["base"]
    assert base["hidden_size"] == 32 and base["steps"] == 4 and base["tokens_seen"] > 0
    assert set(base["curvature"]) == {"validation", "train"}
    assert len(summary["levels"]) == 2
    scale = math.sqrt(base["length"] * base["hidden_size"])
    for level, alpha in zip(summary["levels"], (0.05, 0.5), strict=True):
        assert level["alpha"] == alpha
        assert level["ratio"] == pytest.approx(alpha / scale / base["rms"], rel=1e-12)
        assert list(level["rows"]) == ["baseline", "neftune", "hessian-trace",
                                       "token-f-unbiased", "token-f-paper"]  # fmt: skip
        pairs = {(c["first"], c["second"], c["metric"]): c for c in level["comparisons"]}
        assert len(pairs) == 10
        # one comparison recomputed from the runs' evaluation files
        tag = "lo" if alpha == 0.05 else "hi"
        diffs = []
        for seed in (0, 1):
            first = json.loads((config.runs_dir / f"hessian-trace-{tag}-seed{seed}" /
                                "evaluation.json").read_text())["metrics"]  # fmt: skip
            second = json.loads((config.runs_dir / f"neftune-{tag}-seed{seed}" /
                                 "evaluation.json").read_text())["metrics"]  # fmt: skip
            diffs.append(first["offline/val_loss"] - second["offline/val_loss"])
        found = pairs[("hessian-trace", "neftune", "val_loss")]
        mean = sum(diffs) / 2
        half = stats.t.ppf(0.975, 1) * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2)
        assert found["mean"] == pytest.approx(mean, abs=1e-12)
        assert found["low"] == pytest.approx(mean - half, rel=1e-9)
        assert found["high"] == pytest.approx(mean + half, rel=1e-9)
        tost = stats.ttest_1samp(diffs, -0.05, alternative="greater").pvalue
        tost = max(tost, stats.ttest_1samp(diffs, 0.05, alternative="less").pvalue)
        assert found["tost_p"] == pytest.approx(tost, rel=1e-9)
        equivalent, detected = tost < 0.05, mean - half > 0 or mean + half < 0
        expected = {
            (True, True): "different, inside the margin",
            (True, False): "equivalent",
            (False, True): "different",
            (False, False): "no detectable difference",
        }[(equivalent, detected)]
        assert found["verdict_raw"] == expected  # uncorrected; "verdict" reads Holm's p
        assert found["p_value_holm"] >= found["p_value"]
        assert found["cause"] == "Taylor remainder + noise gradient variance"
        assert found["seeds"] == [0, 1]
    slope = summary["slopes"]["neftune"]
    assert slope["n"] == 4 and slope["low"] <= slope["slope"] <= slope["high"]
    for kind in ("neftune", "hessian-trace", "token-f-unbiased", "token-f-paper"):
        pick = summary["choice"][kind]
        assert pick["alpha"] in (0.05, 0.5) and pick["step_s"] > 0
        assert pick["test_vs_baseline"]["n"] == 2
    assert sorted(e["name"] for e in summary["curvature"]) == sorted(f"{n}-seed0" for n in methods)
    for entry in summary["curvature"]:
        assert set(entry["splits"]) == {"validation", "train"} and entry["seed"] == 0
    text = (report / "equivalence.md").read_text()
    for heading in ("## a/rms = ", "## Effect against a²", "## What to pick", "## Curvature",
                    "## Reading"):  # fmt: skip
        assert heading in text
    assert "Gauss-Newton gap" in text and "estimator bias" in text
    # the validation curve read from the runs' own trainer_state.json
    along = summary["levels"][1]["along_training"]
    lasts, bests = [], []
    for seed in (0, 1):
        state = json.loads((config.runs_dir / f"baseline-seed{seed}" / "model" /
                            "trainer_state.json").read_text())  # fmt: skip
        curve = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
        assert sorted(curve) == [1, 2, 3]
        lasts.append(curve[3])
        bests.append(min(curve.values()))
    assert along["rows"]["baseline"]["val_curve_last"]["mean"] == pytest.approx(sum(lasts) / 2)
    assert along["rows"]["baseline"]["val_curve_best"]["mean"] == pytest.approx(sum(bests) / 2)
    assert "## Along training" in text
    for png in ("equivalence_pairs.png", "equivalence_ratio.png", "equivalence_slope.png",
                "equivalence_choice.png"):  # fmt: skip
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def study_grid(tmp_path: Path, out: str = "data") -> dict[str, Any]:
    """A one-run grid whose data comes from its study_data: block, named by ``{study_data}``."""
    source = sharegpt_file(tmp_path / "sharegpt.json")
    base = write_yaml(
        tmp_path / "base.yaml",
        {"method": "baseline", "max_steps": 2, "dataset_name": "builtin:tiny-tasks"},
    )
    return {
        "base_config": str(base),
        "output_dir": str(tmp_path / "out"),
        "study_data": {"study": "equivalence", "out": out, "source": str(source), **SMALL.__dict__},
        "overrides": {"dataset_name": "{study_data}/chat"},
        "methods": {"baseline": {"method": "baseline"}},
        "seeds": [0],
        "evaluation": {"tasks": ["offline"], "limit": 4, "dataset": "{study_data}/chat"},
    }


def test_study_data_out_is_inside_the_grids_output_folder(tmp_path: Path, monkeypatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    raw = study_grid(tmp_path)
    config = parse_experiment(raw, write_yaml(tmp_path / "e.yaml", raw))
    data = tmp_path / "out" / "data"
    assert config.study_data is not None and config.study_data.out == data
    assert config.overrides["dataset_name"] == str(data / "chat")
    assert config.evaluation.dataset == str(data / "chat")
    # --output_dir moves the data with the grid
    moved = load_experiment(tmp_path / "e.yaml", output_dir=tmp_path / "other")
    assert moved.study_data is not None and moved.study_data.out == tmp_path / "other" / "data"
    assert moved.overrides["dataset_name"] == str(tmp_path / "other" / "data" / "chat")
    # the placeholder without a study_data: block names the field
    del raw["study_data"]
    with pytest.raises(FishertuneError, match=r"overrides\.dataset_name: .*no study_data"):
        parse_experiment(raw, tmp_path / "e.yaml")


def test_dry_run_prepares_no_study_data(tmp_path: Path, monkeypatch, capsys) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_yaml(tmp_path / "e.yaml", study_grid(tmp_path))
    assert experiment_cli.main(["--config", str(path), "--dry_run"]) == 0
    assert "study data: would be prepared in" in capsys.readouterr().out
    assert not (tmp_path / "out").exists() and list(elsewhere.iterdir()) == []


def test_study_data_of_other_sizes_is_refused_not_rewritten(tmp_path: Path) -> None:
    source = sharegpt_file(tmp_path / "sharegpt.json")
    data = tmp_path / "data"
    prepare_study_data(data, source=str(source), sizes=SMALL)
    rows = (data / "chat" / "train.jsonl").read_bytes()
    other = StudyData(**{**SMALL.__dict__, "finetune": 10})
    with pytest.raises(FishertuneError, match=r"^[^\n]*finetune 12 \(asked 10\)[^\n]*$"):
        prepare_study_data(data, source=str(source), sizes=other)
    assert (data / "chat" / "train.jsonl").read_bytes() == rows
    # a folder that holds something else is not written into either
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FishertuneError, match="not study data"):
        prepare_study_data(tmp_path / "busy", source=str(source), sizes=SMALL)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    # nothing beside the folder is left by a preparation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "data", "sharegpt.json"]


def test_runner_prepares_study_data_under_its_lock(tmp_path: Path, monkeypatch) -> None:
    from fishertune.locks import folder_lock_path, lock_holder
    from fishertune.studies.equivalence import data as sharegpt_data
    from test_experiments import FakeLauncher

    raw = study_grid(tmp_path)
    config = parse_experiment(raw, write_yaml(tmp_path / "e.yaml", raw))
    held: list[str | None] = []
    real = sharegpt_data.prepare_study_data

    def watched(*args: Any, **kwargs: Any) -> dict[str, Any]:
        held.append(lock_holder(folder_lock_path(config.output_dir)))
        return real(*args, **kwargs)

    monkeypatch.setattr(sharegpt_data, "prepare_study_data", watched)
    results = run_experiment(config, launcher=FakeLauncher(), log=lambda _: None)
    assert [r.status for r in results] == ["completed"]
    assert len(held) == 1 and held[0] is not None
    assert (config.output_dir / "data" / "manifest.json").is_file()


def test_slurm_launcher_prepares_study_data_before_submitting(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fishertune.experiments.slurm import submit_grid
    from fishertune.locks import folder_lock_path, lock_holder

    raw = study_grid(tmp_path)
    config = parse_experiment(raw, write_yaml(tmp_path / "e.yaml", raw))
    manifest = config.output_dir / "data" / "manifest.json"

    class Executor:
        def __init__(self) -> None:
            self.seen: list[tuple[bool, str | None]] = []

        @contextlib.contextmanager
        def batch(self) -> Any:
            yield

        def submit(self, job: Any) -> Any:
            holder = lock_holder(folder_lock_path(config.output_dir))
            self.seen.append((manifest.is_file(), holder))
            return SimpleNamespace(job_id="7", paths=SimpleNamespace(stdout=tmp_path / "log"))

    executor = Executor()
    no_jobs = lambda ids: {}  # noqa: E731
    submit_grid(config, executor=executor, states=no_jobs, dry_run=True, log=lambda _: None)
    assert not manifest.exists() and executor.seen == []
    results = submit_grid(config, executor=executor, states=no_jobs, log=lambda _: None)
    assert [r.status for r in results] == ["submitted"]
    assert len(executor.seen) == 1 and executor.seen[0][0] and executor.seen[0][1] is not None
