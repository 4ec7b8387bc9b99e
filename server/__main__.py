"""`python -m server [--config FILE] [--SETTING VALUE ...]`: the same as `anchorserve serve` (see server/cli.py)."""

import sys

from server.cli import serve_main as main

if __name__ == "__main__":
    sys.exit(main())
