"""The demo epoch's miners: each submits one generator script from ``generators/``.

In arrival order: two honest generators (alice, bob), a renamed copy of alice (carol), alice
restructured so the code looks different but prints the same pairs (dave), an independent
generator of the same shape as alice's (erin), one with wrong answers (frank), one that never
ends (grace), one that exhausts memory (heidi) and one with a broken format (ivan).
"""

from __future__ import annotations

from pathlib import Path

from examples.common.submissions import SubmissionBox, demo_signer, register_miner
from gauntlet import InMemorySubnet

GENERATORS = Path(__file__).resolve().parent / "generators"
DEMO_MINERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan")


def submit_demo(box: SubmissionBox, subnet: InMemorySubnet) -> None:
    """Register every demo miner and store its signed generator source, one block apart."""
    for hotkey in DEMO_MINERS:
        signer = demo_signer(hotkey)
        register_miner(subnet, hotkey, signer)
        source = (GENERATORS / f"{hotkey}.py").read_text()
        box.submit(hotkey, subnet.advance(), {"source": source}, signer)
