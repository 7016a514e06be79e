"""Run management of `fishertune train`: divergence guard, overwrite, resume, validation, logs.

Every run is the real CLI (or trainer) on a 2-layer, 32-wide Llama for a few steps, CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fishertune.cli import main as cli_main
from fishertune.errors import FishertuneError
from fishertune.files import CHECKPOINT_RECORD as RUN_CHECKPOINT_RECORD
from fishertune.training.checks import check_supported
from fishertune.training.cli import RUN_RECORD, latest_checkpoint, validate_train_argv
from fishertune.training.guard import TrainingDivergedError, diagnose, divergence_limit
from test_trainer import base_args, trainer_for

PENALTY = {"method": "token-f", "penalty_coef": 0.05, "penalty_warmup_steps": 0}
SAVING = {"save_strategy": "steps", "save_steps": 1}


def record(folder: Path) -> dict:
    return json.loads((folder / RUN_RECORD).read_text())


def digest(folder: Path) -> dict[str, str]:
    """Every file of a folder by content, to show that nothing in it changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


# --------------------------------------------------------------------------------------------
# divergence guard


def test_diagnose_names_the_quantity():
    limit = divergence_limit(1024, None)
    assert limit == pytest.approx(4 * math.log(1024))
    assert divergence_limit(1024, 0) == math.inf and divergence_limit(1024, 50.0) == 50.0
    finite = {"loss": 2.0, "ce_loss": 2.0, "penalty": 1.0}
    assert diagnose(finite, 1.0, ce_limit=limit, tokens=10) == ([], [])
    nan_penalty = {**finite, "penalty": math.nan}
    assert diagnose(nan_penalty, math.inf, ce_limit=limit, tokens=10)[0] == [
        "penalty",
        "grad_norm",
    ]
    high = {"loss": 4e5, "ce_loss": 4e5}
    assert "diverged: ce_loss 4e+05" in diagnose(high, 1.0, ce_limit=limit, tokens=10)[1][0]
    stuck = {"loss": math.log(1024), "ce_loss": math.log(1024)}
    assert "collapsed" in diagnose(stuck, 0.0, ce_limit=limit, tokens=10)[1][0]
    assert diagnose(stuck, 0.0, ce_limit=limit, tokens=0) == ([], [])  # nothing scored
    assert diagnose(stuck, None, ce_limit=limit, tokens=10) == ([], [])  # norm not checked


@pytest.mark.parametrize("grad", ["fd", "exact"])
def test_divergence_stops_the_run_as_failed_and_keeps_the_good_checkpoints(
    chat_file, tmp_path, capsys, grad
):
    out = tmp_path / "run"
    argv = base_args(chat_file, out, learning_rate=1e3, max_steps=6, penalty_grad=grad,
                     **PENALTY, **SAVING)  # fmt: skip
    assert cli_main(["train", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' progress bars
    assert err.startswith("error: step "), err
    assert "non-finite" in err or "diverged" in err or "collapsed" in err
    failed_step = int(err.split()[2].rstrip(":"))
    run = record(out)
    assert run["status"] == "failed" and run["error"] == err.removeprefix("error: ")
    assert not (out / "model.safetensors").exists()  # no final model
    last = latest_checkpoint(out)
    assert last is not None and int(last.name.split("-")[1]) == failed_step - 1
    for checkpoint in out.glob("checkpoint-*"):
        weights = load_file(checkpoint / "model.safetensors")
        assert all(w.isfinite().all() for w in weights.values()), checkpoint


def _poison(trainer, step: int) -> None:
    """Make the loss of optimizer step ``step`` (0-based) NaN, as an overflow would."""
    compute_loss = trainer.compute_loss

    def poisoned(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        return loss * math.nan if trainer.state.global_step == step and model.training else loss

    trainer.compute_loss = poisoned


def test_skip_mode_drops_the_nonfinite_update_and_counts_it(chat_file, tmp_path):
    trainer = trainer_for(chat_file, tmp_path, on_nonfinite="skip", max_steps=3)
    _poison(trainer, step=1)
    snapshots = []
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append([p.detach().clone() for p in model.parameters()])

    trainer.add_callback(Snapshot())
    trainer.train()
    assert trainer.run_totals["skipped_steps"] == 1 and trainer.state.global_step == 3
    for before, after in zip(snapshots[0], snapshots[1], strict=True):
        assert torch.equal(before, after)  # step 2 changed nothing
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2], strict=True))
    assert all(p.isfinite().all() for p in trainer.model.parameters())
    assert [e["skipped_steps"] for e in trainer.state.log_history if "skipped_steps" in e][-1] == 1


def test_stop_mode_raises_before_the_nonfinite_update(chat_file, tmp_path):
    trainer = trainer_for(chat_file, tmp_path, max_steps=3)
    _poison(trainer, step=1)
    with pytest.raises(TrainingDivergedError, match=r"^step 2: non-finite loss, grad_norm;"):
        trainer.train()
    assert all(p.isfinite().all() for p in trainer.model.parameters())


# --------------------------------------------------------------------------------------------
# logged numbers


@pytest.mark.parametrize("grad", ["exact", "fd"])
def test_logged_loss_is_the_objective_under_gradient_accumulation(chat_file, tmp_path, grad):
    """B = 2 x 4 micro-steps: the logged loss (what the optimizer minimizes) equals the logged
    CE plus the penalty term, both weighted by tokens over the whole accumulated batch."""
    trainer = trainer_for(chat_file, tmp_path, per_device_train_batch_size=2,
                          gradient_accumulation_steps=4, max_steps=3, penalty_grad=grad,
                          **PENALTY)  # fmt: skip
    trainer.train()
    logs = [e for e in trainer.state.log_history if "ce_loss" in e]
    assert len(logs) == 3
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["ce_loss"] + entry["penalty_term"], rel=1e-6)
        assert entry["penalty_term"] == pytest.approx(entry["penalty_coef"] * entry["penalty"])
        assert entry["penalty_term"] > 1e-4 * entry["loss"]  # the identity is not vacuous


# --------------------------------------------------------------------------------------------
# overwrite and resume


def test_overwrite_replaces_a_run_only_once_the_new_one_is_safe(chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = base_args(chat_file, out, max_steps=2, **SAVING)
    assert cli_main(["train", *argv]) == 0
    before = digest(out)
    # bad data: refused before anything in output_dir changes
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = base_args(empty, out, max_steps=2)
    assert cli_main(["train", *bad, "--overwrite_output_dir", "true"]) == 2
    assert "empty.jsonl: no conversations" in capsys.readouterr().err
    # a new run that fails before its first checkpoint: the old run comes back
    diverging = base_args(chat_file, out, max_steps=3, learning_rate=1e3, **PENALTY)
    assert cli_main(["train", *diverging, "--overwrite_output_dir", "true"]) == 1
    assert "previous run" in capsys.readouterr().err
    assert digest(out) == before and not siblings(out)
    # a good one replaces it
    assert cli_main(["train", *base_args(chat_file, out, max_steps=3, seed=1),
                     "--overwrite_output_dir", "true"]) == 0  # fmt: skip
    assert record(out)["status"] == "completed" and record(out)["seed"] == 1
    assert not siblings(out) and digest(out) != before


@pytest.mark.slow
def test_sigterm_during_a_replacement_puts_the_old_run_back(chat_file, tmp_path):
    """A scheduler's stop (SIGTERM) before the new run's first checkpoint: the old run is back
    in place, nothing is left aside, and the exit status says terminated."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    assert cli_main(["train", *base_args(chat_file, out, max_steps=1)]) == 0
    before = digest(out)
    argv = [*base_args(chat_file, out, max_steps=100000), "--overwrite_output_dir", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "fishertune.cli", "train", *argv]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 240
    for line in process.stdout:  # training has started once the old run is aside
        if "previous run moved" in line or time.time() > deadline:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, rest[-2000:]
    assert digest(out) == before and not siblings(out)


def test_resume_refuses_other_settings_and_a_completed_run_is_a_no_op(chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = base_args(chat_file, out, max_steps=2, **SAVING)
    assert cli_main(["train", *argv]) == 0
    before = digest(out)
    capsys.readouterr()
    assert cli_main(["train", *argv, "--resume", "true"]) == 0
    assert "already completed (2 steps); nothing to resume" in capsys.readouterr().out
    assert digest(out) == before
    other = tmp_path / "other.jsonl"
    other.write_text(chat_file.read_text().replace("nice", "fine"))
    changes = [
        (base_args(other, out, max_steps=2, **SAVING), "data_sha256="),
        (base_args(chat_file, out, max_steps=2, method="neftune", **SAVING), "method='baseline'"),
        (base_args(chat_file, out, max_steps=2, seed=3, **SAVING), "seed=0 (now 3)"),
    ]
    for changed, named in changes:
        assert cli_main(["train", *changed, "--resume", "true"]) == 2
        err = capsys.readouterr().err
        assert "started with other settings" in err and named in err and err.count("\n") == 1
    assert digest(out) == before


def _killed_after(straight: Path, checkpoint: str, folder: Path) -> Path:
    """``folder`` as a run of ``straight``'s settings killed after writing ``checkpoint``: that
    checkpoint and a run record still saying ``running``."""
    folder.mkdir()
    shutil.copytree(straight / checkpoint, folder / checkpoint)
    run = record(straight)
    run["status"] = "running"
    (folder / RUN_RECORD).write_text(json.dumps(run))
    return folder


def test_resume_names_its_checkpoint_and_reports_the_whole_run(chat_file, tmp_path, caplog):
    common = {**PENALTY, "penalty_warmup_steps": 2, "max_steps": 6, "save_strategy": "steps",
              "save_steps": 3}  # fmt: skip
    straight = tmp_path / "straight"
    assert cli_main(["train", *base_args(chat_file, straight, **common)]) == 0
    interrupted = _killed_after(straight, "checkpoint-3", tmp_path / "interrupted")
    with caplog.at_level(logging.INFO):
        argv = ["train", *base_args(chat_file, interrupted, **common), "--resume", "true"]
        assert cli_main(argv) == 0
    assert f"resuming from {interrupted / 'checkpoint-3'} (step 3)" in caplog.text
    a, b = record(straight)["metrics"], record(interrupted)["metrics"]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
    history = json.loads((straight / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e and "train_loss" not in e]
    assert len(losses) == 6 and a["train_loss"] == pytest.approx(sum(losses) / 6, rel=1e-9)
    resumed = json.loads((interrupted / "trainer_state.json").read_text())["log_history"]
    assert resumed[-1]["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)


# --------------------------------------------------------------------------------------------
# validation without training


def test_validate_train_argv_checks_everything_cheaply(chat_file, tmp_path):
    out = tmp_path / "out"
    validate_train_argv(base_args(chat_file, out))
    assert not out.exists()  # nothing written
    config = tmp_path / "bad.yaml"
    config.write_text("method: baseline\nwarmup_steps: many\n")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("work")
    cases = [
        (["--config", str(config), *base_args(chat_file, out)], "bad.yaml line 2: warmup_steps"),
        (base_args(chat_file, out, max_length=0), "max_length must be >= 1, got 0"),
        (base_args(chat_file, out, method="dropout"), "invalid choice: 'dropout'"),
        (base_args(chat_file, out, penalty_coef=1), "penalty_coef given with method='baseline'"),
        (base_args(blank, out), "blank.jsonl: no conversations"),
        (base_args(chat_file, occupied), "exists and is not empty"),
        (base_args(chat_file, occupied / "keep.txt"), "keep.txt is a file, not a folder"),
    ]
    for argv, message in cases:
        with pytest.raises(FishertuneError, match=message) as info:
            validate_train_argv(argv)
        assert "\n" not in str(info.value)
    # a YAML value the command line overrides is not blamed on the YAML
    with pytest.raises(FishertuneError, match=r"^argument --warmup_steps"):
        validate_train_argv(["--config", str(config), *base_args(chat_file, out),
                             "--warmup_steps", "few"])  # fmt: skip


def test_ddp_does_not_search_for_unused_parameters_by_default(chat_file, tmp_path):
    _, args, _ = validate_train_argv(base_args(chat_file, tmp_path / "o"))
    assert args.ddp_find_unused_parameters is False
    argv = base_args(chat_file, tmp_path / "o", ddp_find_unused_parameters="true")
    assert validate_train_argv(argv)[1].ddp_find_unused_parameters is True


def _check_supported(trainer) -> None:
    check_supported(trainer.args, trainer.accelerator, trainer.model, trainer.is_deepspeed_enabled)


def test_split_fd_backward_is_refused_under_deepspeed(chat_file, tmp_path):
    """Split mode calls backward inside compute_loss, which DeepSpeed's engine would scale by the
    accumulation steps again and may follow with an optimizer step: refused, joint allowed."""
    trainer = trainer_for(chat_file, tmp_path, penalty_grad="fd", penalty_fd_backward="split",
                          **PENALTY)  # fmt: skip
    check_supported(
        trainer.args, trainer.accelerator, trainer.model, trainer.is_deepspeed_enabled
    )  # fine without DeepSpeed
    trainer.is_deepspeed_enabled = True  # what Trainer sets from the accelerate state
    with pytest.raises(FishertuneError, match="penalty_fd_backward=split does not work under"):
        check_supported(
            trainer.args, trainer.accelerator, trainer.model, trainer.is_deepspeed_enabled
        )
    trainer.args.penalty_fd_backward = "joint"
    _check_supported(trainer)


def test_a_library_trainer_marks_checkpoints_and_resumes_its_totals(chat_file, tmp_path):
    """A FisherSFTTrainer built in a script (no CLI) writes the completion record into each
    checkpoint, and train(resume_from_checkpoint=True) continues the whole run's totals."""
    from fishertune.data.chat import load_conversations
    from fishertune.modeling import load_model_and_tokenizer
    from fishertune.training import FisherSFTConfig, FisherSFTTrainer

    def trainer(max_steps: int) -> FisherSFTTrainer:
        model, tokenizer = load_model_and_tokenizer("builtin:tiny-llama")
        args = FisherSFTConfig(output_dir=str(tmp_path / "out"), method="token-f",
                               penalty_coef=0.05, penalty_warmup_steps=0, max_steps=max_steps,
                               max_length=64, per_device_train_batch_size=4, save_strategy="steps",
                               save_steps=2, report_to="none", use_cpu=True, seed=0,
                               disable_tqdm=True)  # fmt: skip
        return FisherSFTTrainer(model=model, args=args, processing_class=tokenizer,
                                train_dataset=load_conversations(str(chat_file)))  # fmt: skip

    first = trainer(2)
    first.train()
    record = json.loads((tmp_path / "out" / "checkpoint-2" / RUN_CHECKPOINT_RECORD).read_text())
    assert record["step"] == 2 and record["steps"] == 2
    assert record["loss_sum"] == pytest.approx(first.run_totals["loss_sum"])
    second = trainer(4)
    second.train(resume_from_checkpoint=True)
    assert second.run_totals["steps"] == 4  # 2 restored from the record, 2 trained now
    assert (tmp_path / "out" / "checkpoint-4" / RUN_CHECKPOINT_RECORD).is_file()


def test_resume_after_an_interrupted_final_save_trains_nothing_more(chat_file, tmp_path, capsys):
    """Stopped after the last step's checkpoint but before the run was marked completed (during
    the final save): the resume trains no step past max_steps and saves the uninterrupted run's
    weights bit for bit; the console's train_loss is the whole run's."""
    common = {**PENALTY, "max_steps": 3, **SAVING}
    straight = tmp_path / "straight"
    assert cli_main(["train", *base_args(chat_file, straight, **common)]) == 0
    interrupted = _killed_after(straight, "checkpoint-3", tmp_path / "interrupted")
    capsys.readouterr()
    argv = ["train", *base_args(chat_file, interrupted, **common), "--resume", "true"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = record(interrupted)
    assert resumed["status"] == "completed" and resumed["global_step"] == 3
    a, b = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole = record(straight)["metrics"]["train_loss"]
    assert resumed["metrics"]["train_loss"] == pytest.approx(whole, rel=1e-12)
    logged = [line for line in out.splitlines() if "'train_loss'" in line]
    assert logged and f"'train_loss': '{whole:.4g}'" in logged[-1], logged


@pytest.mark.parametrize(
    "line, message",
    [
        ("learning_rate: true", "learning_rate must be a number, got true"),
        ("learning_rate: [0.1]", "learning_rate must be a number, got [0.1]"),
        ("learning_rate: null", "learning_rate must be a number, got null"),
        ("learning_rate: {lr: 1}", "learning_rate must be a number, got {'lr': 1}"),
        ("learning_rate: 1e400", "learning_rate must be a finite number, got '1e400'"),
        ("penalty_coef: .nan", "penalty_coef must be a finite number, got nan"),
        ("penalty_warmup_steps: 1.5", "penalty_warmup_steps must be an integer, got 1.5"),
        ("dataset_fraction: .inf", "dataset_fraction must be a finite number, got inf"),
        ("lora_dropout: false", "lora_dropout must be a number, got false"),
    ],
)
def test_yaml_numbers_are_checked_with_their_line(chat_file, tmp_path, line, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"method: token-f\nmax_steps: 2\n{line}\n")
    with pytest.raises(FishertuneError) as info:
        validate_train_argv(["--config", str(config), "--dataset_name", str(chat_file),
                             "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert str(info.value) == f"{config} line 3: {message}"


@pytest.mark.parametrize(
    "option, value",
    [
        ("penalty_coef", "nan"),  # compared false with every bound: it switched the penalty off
        ("penalty_coef", "inf"),
        ("penalty_fd_step", "nan"),
        ("learning_rate", "inf"),
        ("learning_rate", "nan"),
        ("dataset_fraction", "nan"),
        ("lora_alpha", "inf"),
    ],
)
def test_non_finite_numbers_on_the_command_line_are_refused(chat_file, tmp_path, option, value):
    argv = base_args(chat_file, tmp_path / "o", **{**PENALTY, option: value})
    with pytest.raises(FishertuneError) as info:
        validate_train_argv(argv)
    assert option in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_a_library_config_refuses_a_nan_coefficient():
    from fishertune.training import FisherSFTConfig

    with pytest.raises(FishertuneError, match="penalty_coef must be a finite number, got nan"):
        FisherSFTConfig(output_dir="unused", method="token-f", penalty_coef=math.nan)


def test_a_folder_without_checkpoint_is_sent_to_overwrite_both_ways(chat_file, tmp_path):
    """A run stopped before its first checkpoint: neither a plain rerun nor --resume sends the
    user to the other; both name --overwrite_output_dir."""
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_RECORD).write_text(json.dumps({"status": "failed", "settings": None}))
    for extra in ([], ["--resume", "true"]):
        with pytest.raises(FishertuneError) as info:
            validate_train_argv([*base_args(chat_file, out), *extra])
        message = str(info.value)
        assert "--overwrite_output_dir true" in message and "pass --resume" not in message


def test_model_folders_that_are_not_finished_models_are_refused_before_loading(tmp_path):
    """A truncated safetensors file and a run whose record is not `completed` are named in one
    line by the check every loader runs first (evaluate, analyze, train)."""
    from safetensors.torch import save_file

    from fishertune.modeling import check_model_source

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(64, 64)}, folder / "model.safetensors")
    check_model_source(str(folder))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(FishertuneError, match=r"model\.safetensors: not a complete safetensors"):
        check_model_source(str(folder))
    (folder / "model.safetensors").write_bytes(data)
    (folder / RUN_RECORD).write_text(json.dumps({"status": "failed", "error": "disk full"}))
    with pytest.raises(FishertuneError, match=r"run has not completed \(status failed: disk full"):
        check_model_source(str(folder))
    (folder / RUN_RECORD).write_text(json.dumps({"status": "running"}))
    run_folder = tmp_path / "no-weights-yet"
    run_folder.mkdir()
    (run_folder / RUN_RECORD).write_text(json.dumps({"status": "running"}))
    from fishertune.modeling import load_tokenizer

    with pytest.raises(FishertuneError, match="run has not completed") as info:
        load_tokenizer(str(run_folder))  # not "pass a tokenizer name"
    assert "tokenizer" not in str(info.value)


def test_a_run_recorded_before_an_option_existed_resumes(chat_file, tmp_path, caplog):
    """A record without ``penalty_fd_fused_ce`` (written before the option existed) resumes when
    the option is left at its default; set to something else, the change is named and refused."""
    common = {**PENALTY, "penalty_grad": "fd", "max_steps": 4, "save_strategy": "steps",
              "save_steps": 2}  # fmt: skip
    straight = tmp_path / "straight"
    assert cli_main(["train", *base_args(chat_file, straight, **common)]) == 0
    interrupted = _killed_after(straight, "checkpoint-2", tmp_path / "interrupted")
    old = record(interrupted)
    del old["settings"]["penalty_fd_fused_ce"]
    (interrupted / RUN_RECORD).write_text(json.dumps(old))
    fused = [*base_args(chat_file, interrupted, **common, penalty_fd_fused_ce="true")]
    assert cli_main(["train", *fused, "--resume", "true"]) == 2
    argv = ["train", *base_args(chat_file, interrupted, **common), "--resume", "true"]
    assert cli_main(argv) == 0
    assert record(interrupted)["status"] == "completed"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"seed": -1}, "seed must be in [0, 4294967295], got -1"),
        ({"seed": 2**32}, "seed must be in [0, 4294967295], got 4294967296"),
        ({"data_seed": -3}, "data_seed must be in [0, 4294967295], got -3"),
        ({"dataset_subsample_seed": 2**32}, "dataset_subsample_seed must be in [0, 4294967295]"),
        ({"adam_beta1": 1.5}, "adam_beta1 must be in [0, 1), got 1.5"),
        ({"adam_beta2": 1}, "adam_beta2 must be in [0, 1), got 1"),
        ({"adam_epsilon": -0.5}, "adam_epsilon must be >= 0, got -0.5"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
        ({"dataloader_num_workers": -1}, "dataloader_num_workers must be >= 0, got -1"),
        ({"tiny_hidden_size": 30, "tiny_num_heads": 4},
         "tiny_hidden_size 30 must be a multiple of tiny_num_heads 4"),
        ({"divergence_max_ce": -1}, "divergence_max_ce must be >= 0 (0: no check), got -1"),
        ({"save_strategy": "steps", "save_steps": 0},
         "save_steps must be > 0 with save_strategy=steps, got 0"),
    ],
)  # fmt: skip
def test_values_that_would_crash_later_are_refused_before_anything_is_written(
    chat_file, tmp_path, options, message
):
    out = tmp_path / "o"
    with pytest.raises(FishertuneError, match=re.escape(message)) as info:
        validate_train_argv(base_args(chat_file, out, **options))
    assert "\n" not in str(info.value) and not out.exists()
    # the CLI: the same line, status 2, nothing written
    assert cli_main(["train", *base_args(chat_file, out, **options)]) == 2
    assert not out.exists()


@pytest.mark.parametrize(
    "line, message",
    [
        ("max_steps: '5'", "max_steps must be an integer, got the text '5' (remove the quotes)"),
        ("max_steps: 0x10", "max_steps must be a decimal integer, got 0x10"),
        ("max_steps: 010", "max_steps must be a decimal integer, got 010"),
        ("max_steps: 1_0", "max_steps must be a decimal integer, got 1_0"),
        ("learning_rate: 0x10", "learning_rate must be a decimal number, got 0x10"),
    ],
)
def test_yaml_integers_in_other_forms_are_refused(chat_file, tmp_path, line, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"method: token-f\nwarmup_steps: 0\n{line}\n")
    with pytest.raises(FishertuneError) as info:
        validate_train_argv(["--config", str(config), "--dataset_name", str(chat_file),
                             "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert str(info.value) == f"{config} line 3: {message}"


def test_a_library_config_refuses_values_out_of_range():
    from fishertune.training import FisherSFTConfig

    with pytest.raises(FishertuneError, match=r"adam_beta1 must be in \[0, 1\), got 1.5"):
        FisherSFTConfig(output_dir="unused", adam_beta1=1.5, use_cpu=True, report_to="none")
