"""``python -m fishertune``: the ``fishertune`` command."""

import sys

from fishertune.cli import main

if __name__ == "__main__":
    sys.exit(main())
