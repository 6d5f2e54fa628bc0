"""``python -m examples.prism``: run one architecture-search round."""

import sys

from examples.prism.run import main

sys.exit(main())
