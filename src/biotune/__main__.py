"""``python -m biotune``: the same command line as ``biotune``."""

import sys

from biotune.cli import main

if __name__ == "__main__":
    sys.exit(main())
