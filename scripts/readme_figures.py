"""Regenerate the README's quick figures from the current code and write them in place.

    python scripts/readme_figures.py            # run, rewrite README.md between the markers
    python scripts/readme_figures.py --check    # run, exit 1 if a figure (times aside) moved

Each figure sits in README.md between ``<!-- figure: NAME -->`` and ``<!-- /figure: NAME -->``
and is the output of one command, named in the README next to it:

* ``demo``: ``fishertune demo`` (seed 0, 200 steps per method, ``OMP_NUM_THREADS=1``), its
  table. About 1 minute on an idle 2-core CPU, 8 minutes on a busy one.

The numbers are float32 training runs: another CPU's kernels move their last digits, so compare on
the machine the README names. The time column is the machine's load and is not compared.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIME_COLUMN = "time (s)"


def demo_table() -> str:
    """``fishertune demo``'s table, from this checkout's ``src/``, in a fresh output folder."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-m", "fishertune", "demo", "--output_dir", out],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"fishertune demo failed:\n{proc.stdout}\n{proc.stderr}")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    return "\n".join(rows)


FIGURES = {"demo": demo_table}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- figure: {re.escape(name)} -->\n)(.*?)(\n<!-- /figure: {re.escape(name)} -->)",
        re.DOTALL,
    )


def without_times(table: str) -> list[list[str]]:
    """The table's cells, the time column left out."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    if not rows or TIME_COLUMN not in rows[0]:
        return rows
    column = rows[0].index(TIME_COLUMN)
    return [row[:column] + row[column + 1 :] for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not rewrite")
    parser.add_argument("names", nargs="*", default=list(FIGURES), help="figures to regenerate")
    args = parser.parse_args(argv)
    text = README.read_text()
    moved = []
    for name in args.names:
        match = _block(name).search(text)
        if match is None:
            sys.exit(f"README.md: no '<!-- figure: {name} -->' ... '<!-- /figure: {name} -->'")
        new = FIGURES[name]()
        print(f"{name}:\n{new}")
        if without_times(new) != without_times(match.group(2)):
            moved.append(name)
        text = text[: match.start(2)] + new + text[match.end(2) :]
    if args.check:
        if moved:
            print(f"README figures that moved: {', '.join(moved)}", file=sys.stderr)
        return 1 if moved else 0
    README.write_text(text)
    print(f"README.md: rewrote {', '.join(args.names)}; moved: {', '.join(moved) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
