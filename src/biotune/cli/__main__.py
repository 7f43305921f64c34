"""``python -m biotune.cli``, the same as ``biotune`` and ``python -m biotune``."""

import sys

from biotune.cli import main

sys.exit(main())
