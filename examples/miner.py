"""Run a SparseLoCo miner from a TOML config (see docs/miner.md).

    python examples/miner.py --config examples/configs/miner.toml [--windows N] [--local-demo N]

With ``chain.kind = "memory"`` (the example config) this runs the local demo: N miners and the
validator of ``validator.toml`` as threads on one in-memory chain.
"""

import sys

from subnet.roles_cli import main

if __name__ == "__main__":
    sys.exit(main(["miner", *sys.argv[1:]]))
