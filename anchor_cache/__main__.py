import sys

from anchor_cache.cli import main

sys.exit(main())
