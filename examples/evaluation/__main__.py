"""``python -m examples.evaluation``: mine a history and score agents on it."""

import sys

from examples.evaluation.run import main

sys.exit(main())
