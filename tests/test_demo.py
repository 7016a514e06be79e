"""`fishertune demo`: the README's main command, shortened to a few steps."""

from __future__ import annotations

import math

import pytest

from fishertune.cli import main as cli_main


def test_demo_trains_the_four_methods_and_prints_the_table(tmp_path, capsys):
    assert cli_main(["demo", "--max_steps", "2", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
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
