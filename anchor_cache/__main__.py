"""`python -m anchor_cache eval|classify|reweight|analyze`: the same as `anchorserve eval|…` (see cli.py)."""

import sys

from anchor_cache.cli import main

sys.exit(main())
