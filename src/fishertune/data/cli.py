"""``fishertune data prepare SRC --output DIR``: read a dataset once, keep what can be used.

Reads any source the reader knows (:mod:`fishertune.data.readers`: a ``.jsonl`` / ``.json`` /
``.parquet`` file, a folder, a hub dataset; ``messages``, ShareGPT, Alpaca, prompt/completion or
text rows), applies the column and role mappings and the bad-row policy, and writes

* ``DIR/<split>.jsonl``: the kept rows in the canonical form (``messages``, or ``prompt`` and
  ``completion``), which ``fishertune train --dataset_name DIR`` and experiment grids read
  directly (a folder's ``<split>.jsonl``);
* ``DIR/report-<split>.json``: rows read, kept, dropped by reason (with the first example of
  each), the kept rows that lost a leading assistant turn, and with ``--tokenizer`` the token
  length percentiles and the rows that ``--max_length`` (train's default without it) would cut,
  and leave without a scored token; the time taken and peak memory.
  Written before ``<split>.jsonl`` gets its name, so complete rows always have their report; the
  ``train`` split's is also ``DIR/report.json``.

The source itself is never the output (``--overwrite`` with the source's own file is refused).

Records are read and written one at a time (a ``.json`` array as a stream), so memory stays
bounded whatever the file's size. With ``--tokenizer`` each kept row is tokenized as training
would (chat template, assistant mask) to measure lengths; ``--max_length`` with
``--drop_too_long`` then drops the rows longer than that (``too_long``), and rows with no scored
token left at ``--max_length`` are dropped (``no_label_after_truncation``). The written rows stay
text: training tokenizes them again with its own tokenizer and ``max_length``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from fishertune.data.options import DROP_REASONS, DataOptions, add_data_arguments
from fishertune.errors import FishertuneError
from fishertune.files import write_json_atomic

logger = logging.getLogger(__name__)

REPORT = "report.json"  # the train split's report, also where earlier versions wrote every split's
PERCENTILES = (50, 90, 95, 99, 100)
TRAIN_MAX_LENGTH = 1024  # what `fishertune train` truncates to when max_length is not given


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fishertune data prepare",
        description="Read a dataset through the mappings and the bad-row policy; write the kept "
        "rows and a report.",
    )
    add = parser.add_argument
    add("source", help="a .jsonl/.json/.parquet file, a folder, a hub name or builtin:tiny-tasks")
    add("--output", required=True, help="folder to write <split>.jsonl and report-<split>.json to")
    add("--split", default="train", help="split to read (and the name of the file written)")
    add_data_arguments(add)
    add("--tokenizer", default=None, help="tokenize the kept rows to report token lengths")
    add("--chat_template_path", default=None, help="chat template file for --tokenizer")
    add(
        "--max_length",
        type=int,
        default=None,
        help="with --tokenizer: the training max_length; rows that it would leave without a "
        "scored token are dropped (the report counts the rows it would cut at it, or at "
        f"train's default {TRAIN_MAX_LENGTH} without it)",
    )
    add(
        "--drop_too_long",
        action="store_true",
        help="with --tokenizer and --max_length: drop rows longer than max_length (too_long)",
    )
    add("--overwrite", action="store_true", help="replace an existing <split>.jsonl in --output")
    return parser


def _percentiles(lengths: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles: the smallest length with at least p% of rows at or below."""
    ordered = sorted(lengths)
    out = {}
    for p in PERCENTILES:
        rank = max(1, -(-p * len(ordered) // 100))  # ceil(p n / 100)
        out[f"p{p}"] = ordered[rank - 1]
    return out


def _tokenize_file(
    source: Path, target: Path, args: argparse.Namespace, report: dict[str, Any]
) -> None:
    """Tokenize each row of ``source`` as training would; write the kept ones to ``target``.

    Counts the kept rows that training would cut at ``--max_length`` (train's default without
    it) and, without ``--max_length``, those the cut would leave with no scored token (with it
    they are dropped: ``no_label_after_truncation``)."""
    from fishertune.data.chat import tokenize_row
    from fishertune.data.tokenizer import load_chat_tokenizer, set_chat_template_file

    tokenizer = load_chat_tokenizer(args.tokenizer)
    if args.chat_template_path:
        set_chat_template_file(tokenizer, args.chat_template_path)
    lengths: list[int] = []
    dropped = report["dropped"]
    limit = args.max_length or TRAIN_MAX_LENGTH
    cut = cut_unscored = 0  # kept rows longer than limit; of them, none scored within it
    with source.open(encoding="utf-8") as f, target.open("w", encoding="utf-8") as out:
        for line in f:
            row = json.loads(line)
            tokens = tokenize_row(row, tokenizer, args.max_length)
            reason = None
            if args.drop_too_long and tokens["full_length"] > args.max_length:
                reason = "too_long"
            elif not any(tokens["assistant_masks"]):
                reason = "no_label_after_truncation"
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            lengths.append(tokens["full_length"])
            if tokens["full_length"] > limit:
                cut += 1
                cut_unscored += not any(tokens["assistant_masks"][:limit])
            out.write(line)
    report["rows_kept"] = len(lengths)
    report["dropped"] = dict(sorted(dropped.items()))
    if not lengths:
        raise FishertuneError(f"{args.source}: every row was dropped at tokenization")
    report["tokens"] = {
        "tokenizer": args.tokenizer,
        **_percentiles(lengths),
        "max_length": limit,
        "max_length_given": args.max_length is not None,
        "rows_cut": cut,
        "rows_cut_unscored": cut_unscored,
    }


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``data prepare``; returns the report (also written to ``--output``)."""
    from fishertune.data.prepare import write_rows
    from fishertune.data.readers import resolve_source

    if args.drop_too_long and (args.tokenizer is None or args.max_length is None):
        raise FishertuneError("--drop_too_long needs --tokenizer and --max_length")
    if args.max_length is not None and args.max_length < 1:
        raise FishertuneError(f"--max_length must be a positive integer, got {args.max_length}")
    options = DataOptions.from_args(args)
    output = Path(args.output).expanduser()
    target = output / f"{args.split}.jsonl"
    if output.exists() and not output.is_dir():
        raise FishertuneError(f"--output {output}: exists and is not a folder")
    if target.exists():
        # a hub name is not contacted for this: only a local source can be the target
        local = resolve_source(args.source, args.split, contact_hub=False)
        if local is not None and local.path is not None and os.path.samefile(local.path, target):
            raise FishertuneError(
                f"{target} is the source being read: write to another --output (--overwrite "
                "would replace the source with the rows kept)"
            )
        if not args.overwrite:
            raise FishertuneError(f"{target} exists: pass --overwrite to replace it")
    start = time.perf_counter()
    source = resolve_source(args.source, args.split)
    assert source is not None
    output.mkdir(parents=True, exist_ok=True)
    partial = output / f".{args.split}.jsonl.partial"
    try:
        report = write_rows(source, options, partial, progress=True)
        if args.tokenizer is not None:
            tokenized = output / f".{args.split}.jsonl.tokenized"
            _tokenize_file(partial, tokenized, args, report)
            os.replace(tokenized, partial)
        seconds = time.perf_counter() - start
        size = source.path.stat().st_size if source.path is not None else None
        report.update(
            written=str(target),
            report_file=str(output / split_report(args.split)),
            seconds=round(seconds, 2),
            input_bytes=size,
            rows_per_second=round(report["rows_read"] / seconds, 1),
            megabytes_per_second=round(size / seconds / 1e6, 2) if size else None,
            peak_rss_mb=round(_peak_rss_mb(), 1),
            reasons={k: DROP_REASONS[k] for k in report["dropped"]},
        )
        # the report first: rows under their final name always have theirs (a full disk
        # stops before the rows are declared complete)
        write_json_atomic(output / split_report(args.split), report, sort_keys=True)
        if args.split == "train":
            write_json_atomic(output / REPORT, report, sort_keys=True)
        os.replace(partial, target)
    finally:
        for leftover in output.glob(f".{args.split}.jsonl.*"):
            leftover.unlink()
    return report


def split_report(split: str) -> str:
    """The report of one split (``report-<split>.json``): splits prepared into one folder each
    keep their own."""
    return f"report-{split}.json"


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else KiB


def _describe(report: dict[str, Any]) -> str:
    lines = [
        f"{report['source']}: format {report['format']}",
        f"rows read {report['rows_read']}, kept {report['rows_kept']}, dropped "
        f"{sum(report['dropped'].values())}",
    ]
    for reason, count in report["dropped"].items():
        example = report["examples"].get(reason, "").removeprefix(report["source"]).lstrip(": ")
        lines.append(f"  {reason:<26} {count:>7}  e.g. {example}"[:150])
    if report.get("truncated"):
        lines.append("the file is cut off inside its last record: its complete records kept")
    if report.get("leading_assistant_trimmed"):
        n = report["leading_assistant_trimmed"]
        lines.append(
            f"{n} kept rows ({100 * n / report['rows_kept']:.0f}%) lost a leading assistant turn "
            "(FastChat's rule: a conversation starts with the user)"
        )
    lines.extend(f"warning: {warning}" for warning in report.get("warnings", ()))
    if "tokens" in report:
        tokens = report["tokens"]
        lines.append(
            "tokens per row: " + ", ".join(f"{k} {v}" for k, v in tokens.items() if k[0] == "p")
        )
        given = "--max_length" if tokens["max_length_given"] else "train's default max_length"
        line = f"{given} {tokens['max_length']} cuts {tokens['rows_cut']} kept rows"
        if tokens["max_length_given"]:
            # those it would leave without a scored token were dropped above
            dropped = report["dropped"].get("no_label_after_truncation", 0)
            line += f" ({dropped} more lost every scored token: dropped)"
        else:
            line += f", {tokens['rows_cut_unscored']} of them losing every scored token"
        lines.append(line)
    rate = f"{report['rows_per_second']:.0f} rows/s"
    if report.get("megabytes_per_second"):
        rate += f", {report['megabytes_per_second']} MB/s"
    lines.append(f"time {report['seconds']} s ({rate}), peak memory {report['peak_rss_mb']} MB")
    lines.append(f"wrote {report['written']} and {report['report_file']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fishertune data prepare SRC --output DIR [options]\n")
        print("run `fishertune data prepare --help` for the options")
        return 0
    if argv[0] != "prepare":
        raise FishertuneError(f"unknown data command {argv[0]!r} (known: prepare)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv[1:])
    print(_describe(prepare(args)))
    return 0
