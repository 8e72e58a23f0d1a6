"""``python -m jserve`` = the ``jserve`` command."""

import sys

from jserve.cli import main

sys.exit(main())
