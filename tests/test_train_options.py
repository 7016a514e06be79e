"""`fishertune train`'s options before the training stack loads: help, argument errors, TRL's
habits (--neftune_noise_alpha, --resume_from_checkpoint), the report_to default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fishertune.errors import FishertuneError
from fishertune.files import CHECKPOINT_RECORD
from fishertune.training import options
from fishertune.training.argv import prepare_argv
from fishertune.training.options import check_command_line, load_table

HEAVY = ("torch", "transformers", "trl", "datasets")


def test_shipped_table_is_the_parsers():
    """The shipped table must be remade (python -m fishertune.training.options) whenever an
    option, TRL or transformers changes; until then it is made again in the user's cache."""
    shipped = json.loads(options.SHIPPED.read_text())
    assert shipped == options.build_table(), "run: python -m fishertune.training.options"


def test_help_and_argument_errors_come_without_the_training_stack(tmp_path):
    calls = [
        ["train", "--help"],
        ["train", "--help-all"],
        ["train", "--bogus", "1"],
        ["train", "--learning_rate", "fast"],
        ["train", "--neftune_noise_alpha", "5", "--method", "token-f"],
        ["train", "--resume_from_checkpoint", str(tmp_path / "checkpoint-9")],
    ]
    script = (
        "import sys\nfrom fishertune.cli import main\n"
        f"results = [main(argv) for argv in {calls!r}]\n"
        f"print('RESULTS', results, [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    assert "RESULTS [0, 0, 2, 2, 2, 2] []" in done.stdout
    short, full = done.stdout.split("usage: fishertune train")[1:3]
    # fishertune's own options and --config first, TRL's after, the rest behind --help-all
    assert short.index("--config") < short.index("--method") < short.index("--model_name_or_path")
    assert "--lr_scheduler_type" not in short and "--lr_scheduler_type" in full
    assert "--help-all` lists all" in short
    errors = done.stderr.splitlines()
    assert errors[0].startswith("error: unknown option --bogus")
    assert (
        errors[1] == "error: argument --learning_rate/--learning-rate: invalid float value: 'fast'"
    )
    assert "--method neftune --neftune_alpha 5" in errors[2]
    assert f"--output_dir {tmp_path} --resume true" in errors[3]


def test_command_line_values_are_read_as_argparse_reads_them():
    table = load_table()
    given = check_command_line(
        ["--max_step", "5", "--warmup_steps=-1", "--dataset_streaming",
         "--lora_target_modules", "q", "k", "--learning_rate", "-1e-3", "--use_cpu", "true"],
        table)  # fmt: skip
    assert given == {"max_steps": ["5"], "warmup_steps": ["-1"], "dataset_streaming": [],
                     "lora_target_modules": ["q", "k"], "learning_rate": ["-1e-3"],
                     "use_cpu": ["true"]}  # fmt: skip
    for argv, message in [
        (["--method", "dropout"], "argument --method: invalid choice: 'dropout'"),
        (["--use_cpu", "maybe"], "Truthy value expected: got maybe"),
        (["--max_steps"], "argument --max_steps/--max-steps: expected one argument"),
        (["--max_steps", "ten"], "invalid int value: 'ten'"),
        (["--learning_rat", "1", "--learning_rate_x", "1"], None),
        (["--lerning_rate", "1"], "did you mean --learning_rate"),
        (["stray"], "unexpected argument 'stray'"),
    ]:
        if message is None:  # an unambiguous prefix is taken, a longer unknown name is not
            with pytest.raises(FishertuneError, match="unknown option --learning_rate_x"):
                check_command_line(argv, table)
            continue
        with pytest.raises(FishertuneError, match=message):
            check_command_line(argv, table)


def test_yaml_keys_are_checked_with_their_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("method: baseline\nlearning_rat: 0.1\n")
    with pytest.raises(FishertuneError, match=r"bad\.yaml line 2: unknown option 'learning_rat'"):
        prepare_argv(["--config", str(config)])


def test_neftune_noise_alpha_is_fishertunes_neftune(tmp_path):
    argv, notes = prepare_argv(["--neftune_noise_alpha", "5", "--output_dir", "o",
                                "--report_to", "none"])  # fmt: skip
    assert argv == ["--output_dir", "o", "--report_to", "none", "--method", "neftune",
                    "--neftune_alpha", "5"]  # fmt: skip
    assert notes == ["--neftune_noise_alpha 5 taken as --method neftune --neftune_alpha 5 "
                     "(fishertune's NEFTune; transformers' own is not used)"]  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text("method: logit-f\n")
    with pytest.raises(FishertuneError) as info:
        prepare_argv(["--config", str(config), "--neftune_noise_alpha=5"])
    assert str(info.value) == (
        "--neftune_noise_alpha adds NEFTune noise, and method is logit-f: for NEFTune run "
        f"fishertune train --config {config} --method neftune --neftune_alpha 5"
    )


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / CHECKPOINT_RECORD).write_text("{}")
    return path


def test_resume_from_checkpoint_is_resume_or_the_command_that_resumes(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 2)
    latest = _checkpoint(run, 4)
    _checkpoint(run, 6, complete=False)  # an interrupted save does not count
    base = ["--output_dir", str(run), "--report_to", "none"]
    argv, notes = prepare_argv([*base, "--resume_from_checkpoint", str(latest)])
    assert argv == [*base, "--resume", "true"]
    assert notes == [f"--resume_from_checkpoint {latest} taken as --resume true (checkpoint-4 "
                     f"is the latest complete checkpoint of {run})"]  # fmt: skip
    assert prepare_argv([*base, "--resume_from_checkpoint", "true"])[0] == [
        *base, "--resume", "true"]  # fmt: skip
    with pytest.raises(FishertuneError) as info:
        prepare_argv([*base, "--resume_from_checkpoint", str(run / "checkpoint-2")])
    assert str(info.value) == (
        "--resume_from_checkpoint: fishertune resumes from a run's latest complete checkpoint, "
        f"checkpoint-4 here; to continue that run: fishertune train --report_to none "
        f"--output_dir {run} --resume true"
    )
    # a checkpoint of another folder than output_dir: the command names its folder
    with pytest.raises(FishertuneError, match=f"--output_dir {run} --resume true$"):
        prepare_argv(["--output_dir", str(tmp_path / "new"), "--resume_from_checkpoint",
                      str(latest)])  # fmt: skip


def test_tensorboard_is_the_default_report_unless_report_to_is_set(tmp_path):
    assert prepare_argv(["--output_dir", "o"])[0] == ["--output_dir", "o", "--report_to",
                                                       "tensorboard"]  # fmt: skip
    assert prepare_argv(["--output_dir", "o", "--report_to", "none"])[0][-1] == "none"
    config = tmp_path / "run.yaml"
    config.write_text("report_to: none\n")
    assert "tensorboard" not in prepare_argv(["--config", str(config)])[0]


def test_every_commands_help_and_argument_errors_come_without_torch():
    """Each command's --help and a bad argument answer before torch (or the training stack)
    loads: about a second, not the 10 s an import of torch and transformers costs."""
    calls = [
        ["evaluate", "--help"],
        ["evaluate", "--model", "m"],
        ["analyze", "--help"],
        ["analyze", "--model", "m", "--data", "d", "--batches", "0"],
        ["data", "prepare", "--help"],
        ["compare", "--help"],
        ["experiment", "--help"],
        ["presets"],
    ]
    script = (
        "import sys\nfrom fishertune.cli import main\nresults = []\n"
        f"for argv in {calls!r}:\n"
        "    try:\n        results.append(main(argv))\n"
        "    except SystemExit as stop:\n        results.append(stop.code)\n"
        f"print('RESULTS', results, [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    assert "RESULTS [0, 2, 0, 2, 0, 0, 0, 0] []" in done.stdout, done.stdout[-500:]
