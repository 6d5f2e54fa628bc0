"""The demo round's miners and what they submit.

Each entry is (hotkey, config fields). The set is chosen so every gate of the funnel has
something to catch: a config over the parameter cap, one that does not build, one that sets a
forbidden field, a near-duplicate of an earlier submission, and a record signed with the
wrong key; the rest are real search moves (depth, width, GQA, RMSNorm, RoPE, MLP ratio).
"""

from __future__ import annotations

from typing import Any

from examples.common.submissions import SubmissionBox, demo_signer, register_miner
from gauntlet import InMemorySubnet

DEMO_SUBMISSIONS: list[tuple[str, dict[str, Any]]] = [
    ("atlas", {"n_layer": 2, "n_embd": 64, "n_head": 4}),
    (
        "borealis",
        {
            "n_layer": 3,
            "n_embd": 96,
            "n_head": 4,
            "n_kv_head": 2,
            "mlp_ratio": 3.0,
            "norm": "rmsnorm",
            "pos": "rope",
        },
    ),
    ("cirrus", {"n_layer": 4, "n_embd": 128, "n_head": 8, "pos": "rope"}),
    ("dune", {"n_layer": 2, "n_embd": 100, "n_head": 8}),
    ("ember", {"n_layer": 2, "n_embd": 64, "n_head": 4, "dropout": 0.1}),
    (
        "fjord",  # borealis again: mlp_ratio 3.004 gives the same 288-wide MLP at width 96
        {
            "n_layer": 3,
            "n_embd": 96,
            "n_head": 4,
            "n_kv_head": 2,
            "mlp_ratio": 3.004,
            "norm": "rmsnorm",
            "pos": "rope",
        },
    ),
    ("gale", {"n_layer": 1, "n_embd": 16, "n_head": 2, "mlp_ratio": 1.0}),
    ("halo", {"n_layer": 2, "n_embd": 64, "n_head": 4, "mlp_ratio": 1.0, "norm": "rmsnorm"}),
    (
        "ion",
        {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_kv_head": 1, "mlp_ratio": 2.0, "pos": "rope"},
    ),
    ("kite", {"n_layer": 6, "n_embd": 32, "n_head": 2, "mlp_ratio": 2.0}),
    ("lumen", {"n_layer": 2, "n_embd": 64, "n_head": 1, "norm": "rmsnorm", "pos": "rope"}),
]

#: submits a valid-looking config under its own hotkey, signed with somebody else's key
FORGER = ("jet", {"n_layer": 2, "n_embd": 96, "n_head": 4})


def submit_demo(box: SubmissionBox, subnet: InMemorySubnet) -> None:
    """Register every demo miner and store its signed submission, one block apart."""
    for hotkey, _ in [*DEMO_SUBMISSIONS, FORGER]:
        register_miner(subnet, hotkey, demo_signer(hotkey))
    for hotkey, body in DEMO_SUBMISSIONS:
        box.submit(hotkey, subnet.advance(), body, demo_signer(hotkey))
    hotkey, body = FORGER
    box.submit(hotkey, subnet.advance(), body, demo_signer("not-" + hotkey))
