"""Peak memory of the data reader against file size, in every container form.

Writes the same rows (messages format, distinct text so that parquet does not shrink them) in
each form the reader takes: ``.jsonl``, a ``.json`` array, JSON Lines in a file named ``.json``,
``{"data": [rows]}`` in a ``.json`` and ``.parquet``; then reads each through
``fishertune.data.prepare.prepare_rows`` (the path of ``train``, ``data prepare`` and grids) in
its own process and prints one table: file size, peak RSS, and the peak above the imports
(``datasets`` and ``pyarrow`` are imported before that baseline in every form, so the forms
compare alike).

    python benchmarks/reader_memory.py --size_mb 300 [--workdir DIR] [--src OTHER/src]

``--src`` reads with another checkout's ``fishertune`` (a before/after comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMS = ("jsonl", "json_array", "json_lines_named_json", "json_field", "parquet")
FILE_NAMES = {
    "jsonl": "rows.jsonl",
    "json_array": "array.json",
    "json_lines_named_json": "lines.json",
    "json_field": "field.json",
    "parquet": "rows.parquet",
}


def rows(size_mb: float, seed: int = 0) -> Iterator[dict]:
    """Rows of about 1 kB until ``size_mb`` of JSON Lines; hex text: distinct, incompressible
    by parquet's dictionary and snappy coding (a file of repeated rows would shrink to nothing)."""
    rng = random.Random(seed)
    written, i = 0, 0
    while written < size_mb * 1e6:
        question = f"question {i}: " + rng.randbytes(150).hex()
        answer = f"answer {i}: " + rng.randbytes(300).hex()
        row = {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ],
            "id": i,
        }
        written += len(question) + len(answer) + 90
        i += 1
        yield row


def write_forms(folder: Path, size_mb: float, forms: tuple[str, ...]) -> dict[str, Path]:
    """Each form's file in ``folder``, the same rows in each, written as a stream."""
    paths = {form: folder / FILE_NAMES[form] for form in forms}
    opened = {form: paths[form].open("w", encoding="utf-8") for form in forms if form != "parquet"}
    writer, batch = None, []
    if "json_array" in opened:
        opened["json_array"].write("[\n")
    if "json_field" in opened:
        opened["json_field"].write('{"data": [\n')
    first = True
    for row in rows(size_mb):
        line = json.dumps(row)
        for form, f in opened.items():
            if form in ("json_array", "json_field"):
                f.write(line if first else ",\n" + line)
            else:
                f.write(line + "\n")
        first = False
        if "parquet" in forms:
            batch.append(row)
            if len(batch) == 10_000:
                writer = _write_parquet(paths["parquet"], batch, writer)
                batch = []
    if "parquet" in forms:
        writer = _write_parquet(paths["parquet"], batch, writer)
        writer.close()
    if "json_array" in opened:
        opened["json_array"].write("\n]\n")
    if "json_field" in opened:
        opened["json_field"].write("\n]}\n")
    for f in opened.values():
        f.close()
    return paths


def _write_parquet(path: Path, batch: list[dict], writer: Any) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(batch)
    if writer is None:
        writer = pq.ParquetWriter(str(path), table.schema)
    if batch:
        writer.write_table(table)
    return writer


# The reader's process: imports, baseline, one read, the report as one JSON line.
READ = """
import json, resource, sys, time
import datasets, pyarrow  # imported in every form, so the baselines compare
from fishertune.data.prepare import prepare_rows
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
prepared = prepare_rows(sys.argv[1])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": prepared.report["rows_kept"], "seconds": seconds,
                  "base_kb": base, "peak_kb": peak}))
"""


def read_in_child(path: Path, cache: Path, src: str | None) -> dict:
    env = dict(os.environ, FISHERTUNE_CACHE=str(cache), HF_DATASETS_CACHE=str(cache / "hf"))
    env["OMP_NUM_THREADS"] = "1"
    if src:
        env["PYTHONPATH"] = src
    done = subprocess.run(
        [sys.executable, "-c", READ, str(path)], env=env, capture_output=True, text=True
    )
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_mb", type=float, default=300)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed")
    parser.add_argument("--src", default=None, help="read with the fishertune found here")
    parser.add_argument("--forms", default=",".join(FORMS))
    args = parser.parse_args()
    forms = tuple(args.forms.split(","))
    unknown = set(forms) - set(FORMS)
    if unknown:
        parser.error(f"unknown forms {sorted(unknown)} (forms: {', '.join(FORMS)})")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        paths = write_forms(folder, args.size_mb, forms)
        print(
            f"{'form':<24}{'file MB':>9}{'rows':>9}{'time s':>8}{'peak RSS MB':>13}"
            f"{'above imports MB':>18}{'x file':>8}"
        )
        for form in forms:
            size = paths[form].stat().st_size / 1e6
            result = read_in_child(paths[form], folder / f"cache-{form}", args.src)
            if "error" in result:
                print(f"{form:<24}{size:>9.0f}  error: {result['error']}")
                continue
            peak = result["peak_kb"] / 1024 * 1.048576  # KiB -> MB
            above = (result["peak_kb"] - result["base_kb"]) / 1024 * 1.048576
            print(
                f"{form:<24}{size:>9.0f}{result['rows']:>9}{result['seconds']:>8.1f}"
                f"{peak:>13.0f}{above:>18.0f}{above / size:>8.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
