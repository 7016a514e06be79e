"""`fishertune compare` end to end: tiny train runs, evaluated once, compared, reused."""

from __future__ import annotations

import json
from pathlib import Path

from fishertune.cli import main as cli_main
from test_trainer import base_args


def _held_out(path: Path, offset: int) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"tell me about rivers number {i}"},
                {"role": "assistant", "content": f"rivers run far, {i} miles long"},
            ]
        }
        for i in range(offset, offset + 8)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_compare_evaluates_once_pairs_by_seed_and_refuses_in_one_line(chat_file, tmp_path, capsys):
    runs = []
    for method, extra in (("baseline", {}), ("neftune", {"neftune_alpha": 5})):
        for seed in (0, 1):
            out = tmp_path / f"{method}-s{seed}"
            argv = base_args(chat_file, out, method=method, seed=seed, max_steps=2, **extra)
            assert cli_main(["train", *argv]) == 0
            runs.append(str(out))
    validation = _held_out(tmp_path / "val.jsonl", 100)
    test = _held_out(tmp_path / "test.jsonl", 200)
    report = tmp_path / "report"
    argv = ["compare", *runs, "--validation_file", str(validation), "--test_file", str(test)]
    argv += ["--output", str(report)]
    capsys.readouterr()

    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(": evaluating on ") == 4 and "reusing" not in out
    lines = out.splitlines()
    header = lines.index("run          method    seed  validation loss  test loss")
    assert [line.split()[:3] for line in lines[header + 2 : header + 6]] == [
        ["baseline-s0", "baseline", "0"], ["baseline-s1", "baseline", "1"],
        ["neftune-s0", "neftune", "0"], ["neftune-s1", "neftune", "1"]]  # fmt: skip
    assert "paired by seed against baseline" in out
    paired_line = next(line for line in lines if line.startswith("neftune "))
    assert paired_line.split()[-1] in ("difference", "baseline")  # a reading closes the row
    summary = json.loads((report / "compare.json").read_text())
    assert [(r["method"], r["seed"]) for r in summary["runs"]] == [
        ("baseline", 0), ("baseline", 1), ("neftune", 0), ("neftune", 1)]  # fmt: skip
    assert all(r["validation_loss"] > 0 and r["test_loss"] > 0 for r in summary["runs"])
    (pair,) = summary["paired"]
    assert pair["method"] == "neftune" and pair["n"] == 2 and pair["seeds"] == [0, 1]
    assert pair["low"] <= pair["mean"] <= pair["high"]
    assert (report / "compare.png").stat().st_size > 0
    evaluations = sorted(Path(runs[0]).glob("evaluation-*.json"))
    assert len(evaluations) == 1 and evaluations[0].with_suffix(".log").is_file()
    mtimes = {p: p.stat().st_mtime_ns for run in runs for p in Path(run).glob("evaluation*")}

    # a second comparison on the same files reuses every evaluation: nothing new written
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(": reusing evaluation-") == 4 and "evaluating on" not in out
    assert {p: p.stat().st_mtime_ns for run in runs for p in Path(run).glob("evaluation*")} == (
        mtimes
    )
    again = json.loads((report / "compare.json").read_text())["runs"]
    assert all(run["reused"] for run in again) and not any(run["reused"] for run in summary["runs"])
    assert [r["test_loss"] for r in again] == [r["test_loss"] for r in summary["runs"]]

    # the test file alone: the same evaluations serve (their test file matches), no val loss
    assert cli_main(["compare", *runs[:2], "--test_file", str(test), "--output", str(report)]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing") == 2 and "no paired differences" in out

    def refused(*args: str) -> str:
        assert cli_main(["compare", *args]) == 2
        captured = capsys.readouterr()
        assert "\n" not in captured.err.strip()
        return captured.err.strip()

    assert refused("--test_file", str(test)).startswith("error: no run folders given")
    unfinished = tmp_path / "half"
    unfinished.mkdir()
    (unfinished / "fishertune_run.json").write_text('{"status": "running"}')
    assert refused(runs[0], str(unfinished), "--test_file", str(test)) == (
        f"error: {unfinished}: not a finished fishertune train run (its fishertune_run.json "
        "says 'running')"
    )
    message = refused(runs[0], "--test_file", str(chat_file))
    assert message.startswith(f"error: --test_file {chat_file}: the test rows would be rows ")
    assert "trained on" in message and "--allow_training_data" not in message
    assert refused(runs[0], "--test_file", str(tmp_path / "none.jsonl")).endswith("no such file")
    assert sorted(Path(runs[0]).glob("evaluation-*.json")) == evaluations  # nothing evaluated
