"""``python -m examples.data_fabrication``: run one data-fabrication epoch."""

import sys

from examples.data_fabrication.run import main

sys.exit(main())
