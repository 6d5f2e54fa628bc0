"""A whole swarm on one machine: peers, adversaries and a validator over real storage.

``sparseloco simulate`` (see :func:`subnet.sim.runner.run`) is the main job: N SparseLoCo
peers train a small GPT on byte-level text, exchange compressed updates through netcomm's
storage exchange, and a Gauntlet validator scores them and sets weights on an in-memory chain.
"""

from subnet.sim.config import ADVERSARY_KINDS, SimConfig
from subnet.sim.runner import RunResult, run

__all__ = ["ADVERSARY_KINDS", "RunResult", "SimConfig", "run"]
