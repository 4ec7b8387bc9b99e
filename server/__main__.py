"""`python -m server [--host H] [--port N] [--config FILE]`: the same as `anchorserve serve` (see server/cli.py)."""

import sys

from server.cli import serve_main as main

if __name__ == "__main__":
    sys.exit(main())
