"""``python -m mergers``: the command line."""

import sys

from mergers.cli import main

sys.exit(main())
