"""``python -m server`` = the ``jserve`` command (serve, bench, generate, ...)."""

import sys

from server.cli import main

sys.exit(main())
