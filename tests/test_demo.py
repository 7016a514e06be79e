"""`fishertune demo`: the README's main command, shortened to a few steps."""

from __future__ import annotations

import math

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
