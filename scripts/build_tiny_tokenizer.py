"""Rebuild the shipped tiny tokenizer (``src/fishertune/assets/tiny-tokenizer``).

Trains a byte-level BPE with the ``tokenizers`` library on text from the offline task generator
(``fishertune.data.tasks``, fixed seed), so the output is byte-identical on every run with the same
``tokenizers`` / ``transformers`` versions. Run it after changing the generator (and bump
``TASKS_VERSION``)::

    python scripts/build_tiny_tokenizer.py            # rewrite the shipped files
    python scripts/build_tiny_tokenizer.py --check    # exit 1 if they differ from a fresh build
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from fishertune.data.tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer, tiny_tokenizer_dir

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=tiny_tokenizer_dir(), help="output folder")
    parser.add_argument("--vocab_size", type=int, default=TINY_VOCAB_SIZE)
    parser.add_argument(
        "--check", action="store_true", help="build to a temporary folder and compare with --out"
    )
    args = parser.parse_args(argv)
    if not args.check:
        build_tiny_tokenizer(args.out, vocab_size=args.vocab_size)
        print(f"wrote {', '.join(FILES)} to {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tokenizer(tmp, vocab_size=args.vocab_size)
        differ = [f for f in FILES if not filecmp.cmp(Path(tmp) / f, args.out / f, shallow=False)]
    if differ:
        print(f"differs from a fresh build: {', '.join(differ)}")
        return 1
    print(f"{args.out} matches a fresh build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
