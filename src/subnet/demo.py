"""A local run: N miners and a validator as threads on one in-memory chain.

The in-memory chain lives inside one process, so this is how miners and a validator meet on
one machine without Bittensor. A :class:`~subnet.clock.BlockTicker` makes blocks
every ``window.block_time_s`` seconds. Miner ``i`` is the miner config with hotkey
``miner-{i}``, state in ``<state_dir>/../miner-{i}`` and storage prefix ``miner-{i}``.
Nodes resume from their checkpoints: the chain starts at the first block of the window the
saved state reached, so running the demo again continues the same model.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gauntlet import InMemorySubnet
from subnet.base import Node
from subnet.chain import open_chain
from subnet.clock import BlockTicker
from subnet.config import NodeConfig, NodeConfigError
from subnet.miner import Miner
from subnet.task import gpt_task
from subnet.validator import Validator

log = logging.getLogger("subnet.demo")


@dataclass
class DemoResult:
    """The windows the demo ran and every node's per-window history."""

    first_window: int
    last_window: int
    validator: list[dict[str, Any]]
    miners: dict[str, list[dict[str, Any]]]
    weights: dict[str, float]


def miner_configs(template: NodeConfig, count: int) -> list[NodeConfig]:
    """``count`` miner configs made from ``template`` (hotkey, state folder, prefix)."""
    out = []
    for i in range(count):
        hotkey = f"miner-{i}"
        storage = dataclasses.replace(template.storage, prefix=hotkey)
        state = str(Path(template.state_dir).parent / hotkey)
        out.append(template.replace(hotkey=hotkey, state_dir=state, storage=storage))
    return out


def run_local_demo(
    miner_template: NodeConfig, validator_cfg: NodeConfig, *, miners: int, windows: int
) -> DemoResult:
    """Run ``miners`` miners and the validator for ``windows`` windows; see the module doc."""
    if miner_template.chain.kind != "memory" or validator_cfg.chain.kind != "memory":
        raise NodeConfigError("the local demo runs on the in-memory chain (chain.kind = 'memory')")
    if miner_template.run != validator_cfg.run:
        raise NodeConfigError("the miner and validator configs must have the same [run] section")
    if miners < 1 or windows < 1:
        raise NodeConfigError("the demo needs at least one miner and one window")
    subnet = InMemorySubnet(netuid=validator_cfg.chain.netuid)
    task = gpt_task(validator_cfg.run)
    validator = Validator(validator_cfg, task, open_chain(validator_cfg, subnet))
    crew = [Miner(c, task, open_chain(c, subnet)) for c in miner_configs(miner_template, miners)]
    nodes: list[Node] = [validator, *crew]
    first = max([validator.next_window or 0, *(m.next_window or 0 for m in crew)])
    last = first + windows - 1
    subnet.block = validator.clock.first_block(first)
    errors: list[str] = []

    def work(node: Validator | Miner) -> None:
        try:
            node.run(until_window=last)
        except Exception as exc:
            log.exception("%s failed", node.hotkey)
            errors.append(f"{node.hotkey}: {exc!r}")
            for other in nodes:
                other.stop.set()

    threads = [threading.Thread(target=work, args=(n,), name=n.hotkey) for n in nodes]
    with BlockTicker(subnet, validator_cfg.window.block_time_s):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError("a node failed: " + "; ".join(errors))
    return DemoResult(
        first_window=first,
        last_window=last,
        validator=validator.history,
        miners={m.hotkey: m.history for m in crew},
        weights=validator.scoreboard.weights(),
    )
