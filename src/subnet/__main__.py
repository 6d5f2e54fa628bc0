"""``python -m subnet``: see :mod:`subnet.roles_cli`."""

import sys

from subnet.roles_cli import main

sys.exit(main())
