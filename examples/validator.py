"""Run a Gauntlet validator from a TOML config (see docs/miner.md).

    python examples/validator.py --config examples/configs/validator.toml [--windows N]

With ``chain.kind = "memory"`` (the example config) this runs the local demo: the validator
and N miners of ``miner.toml`` as threads on one in-memory chain.
"""

import sys

from subnet.roles_cli import main

if __name__ == "__main__":
    sys.exit(main(["validator", *sys.argv[1:]]))
