"""Regenerate the documentation's quick figures from the current code and write them in place.

    python scripts/readme_figures.py            # run, rewrite each figure between its markers
    python scripts/readme_figures.py --check    # run, exit 1 if a figure (times aside) moved
    python scripts/readme_figures.py --where    # say which file holds each figure, run nothing

Each figure sits between ``<!-- figure: NAME -->`` and ``<!-- /figure: NAME -->`` in exactly one
of README.md and docs/*.md, and is rewritten in that file; it is the output of one command, named
next to it:

* ``demo`` (README.md): ``fishertune demo`` (seed 0, 200 steps per method,
  ``OMP_NUM_THREADS=1``), its table. About 1 minute on an idle 2-core CPU, 8 minutes on a busy one.

The numbers are float32 training runs: another CPU's kernels move their last digits, so compare on
the machine the page names. The time column is the machine's load and is not compared.
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
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
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


def find_block(name: str, pages: tuple[Path, ...] | None = None) -> tuple[Path, re.Match[str]]:
    """The one page (of ``pages``, default README.md and docs/*.md) holding figure ``name``, and
    its block's match in that page's text.

    Exits with one line when no page, or more than one, holds the block.
    """
    pages = PAGES if pages is None else pages
    found = [(page, m) for page in pages if (m := _block(name).search(page.read_text()))]
    if len(found) != 1:
        where = ", ".join(str(page.relative_to(ROOT)) for page, _ in found) or "none of them"
        names = ", ".join(str(page.relative_to(ROOT)) for page in pages)
        sys.exit(
            f"figure {name!r}: '<!-- figure: {name} -->' ... '<!-- /figure: {name} -->' must be "
            f"in exactly one of {names}; found in {where}"
        )
    return found[0]


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
    parser.add_argument("--where", action="store_true", help="list each figure's file, run nothing")
    parser.add_argument("names", nargs="*", default=list(FIGURES), help="figures to regenerate")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in FIGURES]
    if unknown:
        sys.exit(f"unknown figure {', '.join(unknown)} (known: {', '.join(FIGURES)})")
    if args.where:
        for name in args.names:
            print(f"{name}: {find_block(name)[0].relative_to(ROOT)}")
        return 0
    moved = []
    for name in args.names:
        page, match = find_block(name)
        new = FIGURES[name]()
        print(f"{name} ({page.relative_to(ROOT)}):\n{new}")
        if without_times(new) != without_times(match.group(2)):
            moved.append(name)
        if not args.check:
            # read again: an earlier figure may have rewritten this page
            page, match = find_block(name)
            text = page.read_text()
            page.write_text(text[: match.start(2)] + new + text[match.end(2) :])
            print(f"{page.relative_to(ROOT)}: rewrote {name}")
    if args.check:
        if moved:
            print(f"figures that moved: {', '.join(moved)}", file=sys.stderr)
        return 1 if moved else 0
    print(f"moved: {', '.join(moved) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
