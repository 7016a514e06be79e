"""`fishertune demo`: the README's main command, shortened to a few steps."""

from __future__ import annotations

import math

import pytest

from fishertune.cli import main as cli_main
from fishertune.demo import METHOD_ORDER, default_output_dir


def test_demo_trains_the_four_methods_and_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any folder: the presets come with the package
    output_dir = tmp_path / "demo"
    assert cli_main(["demo", "--max_steps", "2", "--output_dir", str(output_dir)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    # quiet: the table and two lines on stdout; on stderr only the progress bars
    others = [line for line in out.splitlines() if line and not line.startswith("|")]
    assert others[0] == f"runs under {output_dir} (per-step logs: METHOD/train.log and tensorboard)"
    assert len(others) == 2 and others[1].startswith("total wall time")
    bars = [line.strip() for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    assert bars and all(line.split(":")[0].strip() in METHOD_ORDER for line in bars), bars
    for method in METHOD_ORDER:
        log = (output_dir / method / "train.log").read_text()
        assert "step 2: {" in log and '"ce_loss"' in log  # the per-step logs went here
        assert list((output_dir / method / "runs").glob("*/events.out.tfevents.*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # nothing in the cwd
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| method | final train CE | val loss")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table[1:]}
    assert list(rows) == ["baseline", "neftune", "token-f", "logit-f"]
    for method, cells in rows.items():
        train_ce, val_loss = float(cells[0]), float(cells[1])
        assert math.isfinite(train_ce) and math.isfinite(val_loss)
        penalty = cells[2].strip()
        # the penalty is logged only by the penalty methods
        assert (penalty == "-") == (method in ("baseline", "neftune"))


def test_demo_never_clears_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli_main(["demo", "--max_steps", "1", "--output_dir", str(tmp_path)]) == 2
    assert "was not made by fishertune demo" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_rerun_replaces_only_the_demo_s_own_method_folders(tmp_path):
    from fishertune.demo import _fresh_run_dir

    _fresh_run_dir(tmp_path / "demo", tmp_path / "demo" / "baseline")  # a new folder: made
    (tmp_path / "demo" / "baseline").mkdir()
    (tmp_path / "demo" / "baseline" / "old.txt").write_text("previous run")
    (tmp_path / "demo" / "neftune").mkdir()
    _fresh_run_dir(tmp_path / "demo", tmp_path / "demo" / "baseline")
    assert not (tmp_path / "demo" / "baseline").exists()
    assert (tmp_path / "demo" / "neftune").is_dir()


def test_demo_runs_go_to_the_user_cache_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_output_dir() == tmp_path / "xdg" / "fishertune" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_output_dir() == tmp_path / "home" / ".cache" / "fishertune" / "demo"


def test_demo_rejects_an_unknown_method(capsys):
    assert cli_main(["demo", "--methods", "baseline,dropout"]) == 2
    assert "unknown methods ['dropout']" in capsys.readouterr().err


def test_demo_validation_loss_counts_response_tokens_only():
    """The demo's validation CE agrees with the offline evaluator's, which scores assistant
    tokens only (a loss over every token of a random model would be far from it)."""
    from fishertune.data import load_conversations, load_tiny_tokenizer, tokenize_dataset
    from fishertune.demo import _validation_scores
    from fishertune.evaluation.offline import validation_loss
    from fishertune.modeling import tiny_llama

    tokenizer = load_tiny_tokenizer()
    rows = load_conversations("builtin:tiny-tasks", split="validation").select(range(24))
    tokenized = tokenize_dataset(rows, tokenizer, 128)
    model = tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, seed=0)
    scores = _validation_scores(model, tokenized, tokenizer.pad_token_id)
    reference = validation_loss(model, tokenized, batch_size=5, pad_id=tokenizer.pad_token_id)
    assert scores["val_loss"] == pytest.approx(reference, rel=1e-4)
    assert scores["val_fisher"] > 0
