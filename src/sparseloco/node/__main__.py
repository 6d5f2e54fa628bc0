"""``python -m sparseloco.node``: see :mod:`sparseloco.node.cli`."""

import sys

from sparseloco.node.cli import main

sys.exit(main())
