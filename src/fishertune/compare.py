"""``fishertune compare``: held-out losses of several ``fishertune train`` runs in one table.

Example::

    fishertune compare runs/baseline-s0 runs/baseline-s1 runs/neftune-s0 runs/neftune-s1 \\
        runs/token-f-s0 runs/token-f-s1 --validation_file val.jsonl --test_file test.jsonl

Each run folder is evaluated on the held-out files by ``fishertune evaluate`` itself (offline
losses, no generation), written beside its model as ``evaluation-KEY.json`` (its output in
``evaluation-KEY.log``); an evaluation already in the folder on the same files (by sha256, whole
files, the same truncation, newer than the model) is reused instead. Printed: one row per run
(method, seed, validation and test loss), then, where runs of a method and of ``baseline`` share
a seed and their training data, the paired differences of test loss against the baseline (mean,
95% t interval, pairs). ``--output`` (default ``./compare``) gets ``compare.json`` (the tables'
numbers) and ``compare.png`` (test loss per run, grouped by method).

Refused in one line, before anything is evaluated: no run folder, a folder that is not a finished
``fishertune train`` run, a held-out file that is a run's training data (``evaluate``'s check).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.files import (
    COMPARE_FILES,
    HELD_OUT_EVALUATION,
    RUN_RECORD,
    read_json_record,
    training_done,
    write_json_atomic,
)

__all__ = ["BASELINE", "build_parser", "main"]

BASELINE = "baseline"
VAL_LOSS, TEST_LOSS = "offline/val_loss", "offline/test_loss"
HINT = "give held-out files the runs were not trained on"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fishertune compare",
        description="Evaluate fishertune train runs on one held-out set (reusing finished "
        "evaluations) and compare them: losses per run, paired differences against baseline.",
    )
    # nargs="*": no run at all is refused in one line by main, not by argparse's usage text
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="fishertune train output folders")
    p.add_argument("--test_file", default=None, help="held-out file for the test loss (required)")
    p.add_argument("--validation_file", default=None, help="held-out file for the validation loss")
    p.add_argument(
        "--output", default="compare", help="folder for compare.json and compare.png (./compare)"
    )
    p.add_argument("--batch_size", type=int, default=8, help="evaluation batch size")
    p.add_argument("--max_length", type=int, default=None, help="truncation length (tokens)")
    p.add_argument("--device", default=None, help="cpu, cuda... (default: cuda if any)")
    return p


@dataclass
class Run:
    """One compared run and its held-out losses."""

    name: str
    folder: str
    method: str
    seed: int | None
    data: str  # the training data's identity: runs pair only on the same data
    validation_loss: float | None
    test_loss: float
    evaluation: str
    reused: bool


def _held_out_file(option: str, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise FishertuneError(f"{option} {value}: no such file")
    return path


def _finished_run(text: str) -> tuple[Path, dict[str, Any]]:
    """The folder and its run record; anything but a finished train run is refused."""
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise FishertuneError(f"{text}: no such folder")
    record = read_json_record(folder / RUN_RECORD)
    if not isinstance(record, dict) or not training_done(folder):
        state = f"its {RUN_RECORD} says {record.get('status')!r}" if isinstance(
            record, dict) else f"no {RUN_RECORD}"  # fmt: skip
        raise FishertuneError(f"{text}: not a finished fishertune train run ({state})")
    return folder, record


def _data_identity(record: dict[str, Any]) -> str:
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    source = settings.get("data_sha256") or settings.get("dataset_name") or "?"
    return f"{source}:{settings.get('dataset_train_split') or 'train'}"


def _reusable(
    path: Path, folder: Path, validation_sha: str | None, test_sha: str, max_length: int
) -> dict[str, float] | None:
    """The losses of the evaluation in ``path`` when it scored these files whole, with this
    truncation, on the model now in ``folder``; else ``None``."""
    record = read_json_record(path)
    if not isinstance(record, dict):
        return None
    metrics, meta = record.get("metrics"), record.get("meta")
    if not isinstance(metrics, dict) or not isinstance(meta, dict):
        return None
    scored = meta.get("scored") if isinstance(meta.get("scored"), dict) else {}
    shas = {split: (scored.get(split) or {}).get("sha256") for split in ("validation", "test")}
    if shas["test"] != test_sha or (validation_sha and shas["validation"] != validation_sha):
        return None
    if meta.get("limit") is not None or meta.get("max_length") != max_length:
        return None
    if not meta.get("model") or Path(meta["model"]).resolve() != folder.resolve():
        return None
    # an evaluation older than the run record scored an earlier model of a retrained folder
    if path.stat().st_mtime < (folder / RUN_RECORD).stat().st_mtime:
        return None
    if not all(isinstance(metrics.get(k), (int, float)) for k in (VAL_LOSS, TEST_LOSS)):
        return None
    return {k: float(metrics[k]) for k in (VAL_LOSS, TEST_LOSS)}


def _evaluate(
    args: argparse.Namespace, folder: Path, validation: Path, test: Path, key: str
) -> tuple[Path, dict[str, float]]:
    """Run ``fishertune evaluate`` on ``folder`` (losses only); its output goes to a log file
    beside the evaluation, so that the terminal shows the comparison."""
    from fishertune.evaluation import cli as evaluate

    output = folder / HELD_OUT_EVALUATION.format(key=key)
    argv = ["--model", str(folder), "--tasks", "offline", "--output", str(output)]
    argv += ["--validation_file", str(validation), "--test_file", str(test)]
    argv += ["--max_new_tokens", "0", "--batch_size", str(args.batch_size)]
    if args.max_length is not None:
        argv += ["--max_length", str(args.max_length)]
    if args.device is not None:
        argv += ["--device", args.device]
    with output.with_suffix(".log").open("w") as log, contextlib.redirect_stdout(log):
        evaluate.main(argv)
    metrics = (read_json_record(output) or {}).get("metrics", {})
    return output, {k: float(metrics[k]) for k in (VAL_LOSS, TEST_LOSS)}


def _paired(runs: list[Run]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each method's paired test-loss differences against the baseline, and notes on runs
    that could not pair."""
    from fishertune.statistics import paired_difference

    by_method: dict[str, dict[tuple[int | None, str], Run]] = {}
    notes: list[str] = []
    ambiguous: set[str] = set()
    for run in runs:
        slot = by_method.setdefault(run.method, {})
        key = (run.seed, run.data)
        if key in slot:
            notes.append(
                f"{run.method}: {slot[key].name} and {run.name} share seed {run.seed} and data: "
                "not paired"
            )
            ambiguous.add(run.method)
        slot[key] = run
    baseline = by_method.get(BASELINE)
    if baseline is None or BASELINE in ambiguous:
        return [], notes
    rows = []
    for method, slot in by_method.items():
        if method == BASELINE or method in ambiguous:
            continue
        keys = [key for key in slot if key in baseline and key[0] is not None]
        if not keys:
            continue
        values = [slot[k].test_loss for k in keys]
        reference = [baseline[k].test_loss for k in keys]
        row: dict[str, Any] = {"method": method, "n": len(keys), "seeds": [k[0] for k in keys]}
        if len(keys) == 1:  # a single pair has a difference but no interval
            row |= {"mean": values[0] - reference[0], "low": None, "high": None}
            row["reading"] = "one pair: no interval"
        else:
            diff = paired_difference(values, reference)
            row |= {"mean": diff.mean, "low": diff.low, "high": diff.high, "p": diff.p_value}
            if not diff.detected:
                row["reading"] = "no detectable difference"
            else:
                row["reading"] = "lower than baseline" if diff.mean < 0 else "higher than baseline"
        rows.append(row)
    return rows, notes


def _format(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _plot(runs: list[Run], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, draws with Agg

    methods = list(dict.fromkeys(run.method for run in runs))
    fig = Figure(figsize=(max(4.0, 1.6 * len(methods) + 1.5), 3.8), layout="constrained")
    ax = fig.subplots()
    for index, method in enumerate(methods):
        members = [run for run in runs if run.method == method]
        spread = [index + (i - (len(members) - 1) / 2) * 0.12 for i in range(len(members))]
        losses = [run.test_loss for run in members]
        ax.scatter(spread, losses, color=f"C{index % 10}", zorder=3)
        for x, run in zip(spread, members, strict=True):
            ax.annotate(f"s{run.seed}", (x, run.test_loss), fontsize="x-small",
                        xytext=(4, 2), textcoords="offset points")  # fmt: skip
        mean = math.fsum(losses) / len(losses)
        ax.hlines(mean, index - 0.3, index + 0.3, color=f"C{index % 10}", alpha=0.6)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("test loss (nats/token)")
    ax.set_title("held-out test loss per run (line: the method's mean)", fontsize="medium")
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=120)


def _checked_runs(
    args: argparse.Namespace, *, with_validation: bool
) -> list[tuple[str, Path, dict[str, Any]]]:
    """``(as given, folder, run record)`` of each run folder on the command line, once every
    one is refused or accepted: a finished run, given once, not trained on the held-out files."""
    from fishertune.evaluation.heldout import training_splits

    found: list[tuple[str, Path, dict[str, Any]]] = []
    seen: dict[Path, str] = {}
    for text in args.runs:
        folder, record = _finished_run(text)
        if folder.resolve() in seen:
            raise FishertuneError(f"{text}: given twice (also as {seen[folder.resolve()]})")
        seen[folder.resolve()] = text
        sources = {"test": ("--test_file", args.test_file)}
        if with_validation:
            sources["validation"] = ("--validation_file", args.validation_file)
        training_splits(sources, folder, allow_training_data=False, hint=HINT)
        found.append((text, folder, record))
    return found


def _print_results(runs: list[Run], paired: list[dict[str, Any]], notes: list[str]) -> None:
    """Print the runs' losses, then the paired differences against the baseline and the notes."""
    header = ["run", "method", "seed", "validation loss", "test loss"]
    rows = [
        [r.name, r.method, str(r.seed), _format(r.validation_loss), _format(r.test_loss)]
        for r in runs
    ]
    print()
    print(_table(header, rows))
    print()
    if paired:
        print("test loss, paired by seed against baseline (method - baseline):")
        print(
            _table(
                ["method", "mean", "95% CI", "pairs", "reading"],
                [
                    [
                        p["method"],
                        f"{p['mean']:+.4f}",
                        "-" if p["low"] is None else f"[{p['low']:+.4f}, {p['high']:+.4f}]",
                        str(p["n"]),
                        p["reading"],
                    ]
                    for p in paired
                ],
            )
        )
    else:
        print("no paired differences: no method shares a seed and its data with a baseline run")
    for note in notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    """Run ``fishertune compare``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not args.runs:
        raise FishertuneError("no run folders given: fishertune compare RUN_DIR ... --test_file F")
    if args.test_file is None:
        raise FishertuneError("--test_file is required: the held-out file the runs are scored on")
    test = _held_out_file("--test_file", args.test_file)
    validation = _held_out_file("--validation_file", args.validation_file)
    for option, value in (("--batch_size", args.batch_size), ("--max_length", args.max_length)):
        if value is not None and value < 1:
            raise FishertuneError(f"{option} must be positive, got {value}")

    from fishertune.evaluation.cli import DEFAULT_MAX_LENGTH
    from fishertune.evaluation.heldout import file_sha256

    # every refusal before the first evaluation: a long comparison does not fail half-way
    found = _checked_runs(args, with_validation=validation is not None)

    # without a validation file, evaluate scores the test file for both (its val loss unused)
    scored_validation = validation or test
    test_sha, validation_sha = file_sha256(test), validation and file_sha256(validation)
    max_length = args.max_length or DEFAULT_MAX_LENGTH
    key = hashlib.sha256(
        f"{file_sha256(scored_validation)} {test_sha} {max_length}".encode()
    ).hexdigest()[:12]
    names = [folder.name for _, folder, _ in found]
    runs: list[Run] = []
    for text, folder, record in found:
        losses, evaluation = None, None
        for path in sorted(folder.glob("evaluation*.json")):
            losses = _reusable(path, folder, validation_sha, test_sha, max_length)
            if losses is not None:
                evaluation = path
                print(f"{text}: reusing {path.name}", flush=True)
                break
        reused = losses is not None
        if losses is None:
            print(f"{text}: evaluating on {args.test_file}", flush=True)
            evaluation, losses = _evaluate(args, folder, scored_validation, test, key)
        seed = record.get("seed")
        runs.append(
            Run(
                name=folder.name if names.count(folder.name) == 1 else text,
                folder=str(folder.resolve()),
                method=str(record.get("method")),
                seed=seed if isinstance(seed, int) else None,
                data=_data_identity(record),
                validation_loss=losses[VAL_LOSS] if validation is not None else None,
                test_loss=losses[TEST_LOSS],
                evaluation=str(evaluation),
                reused=reused,
            )
        )

    paired, notes = _paired(runs)
    _print_results(runs, paired, notes)

    output = Path(args.output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    summary = {
        "held_out": {
            "test_file": str(test),
            "test_sha256": test_sha,
            "validation_file": str(validation) if validation else None,
            "validation_sha256": validation_sha or None,
            "max_length": max_length,
        },
        "runs": [asdict(r) for r in runs],
        "paired": paired,
        "notes": notes,
    }
    json_path, png_path = (output / name for name in COMPARE_FILES)
    write_json_atomic(json_path, summary, allow_nan=False)
    _plot(runs, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0
