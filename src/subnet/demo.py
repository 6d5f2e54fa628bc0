"""A local run from the role configs: N miners and a validator, each its own process.

Every node runs exactly as ``sparseloco miner`` / ``sparseloco validator`` would in its own
terminal (:class:`~subnet.sim.launch.NodeProcesses`), on a fresh local SQLite chain
``<root>/chain.sqlite`` beside the validator's state folder. Miner ``i`` is the miner config
with hotkey ``miner-{i}``, state in ``<state_dir>/../miner-{i}`` and storage prefix
``miner-{i}``. Nodes resume from their checkpoints: the chain opens at the window the saved
state reached, so running the demo again continues the same model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gauntlet import SqliteSubnet
from netcomm import CheckpointStore, LocalStorage
from subnet.base import HISTORY_FILE
from subnet.config import ChainConfig, NodeConfig, NodeConfigError
from subnet.sim.launch import START_BLOCK, NodeProcesses, NodeSpec
from subnet.sim.runner import STARTUP_TIMEOUT_S, read_events
from subnet.storage import open_own_storage


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


def _on_local_chain(cfg: NodeConfig, path: Path) -> NodeConfig:
    chain = ChainConfig(
        kind="local", netuid=cfg.chain.netuid, path=str(path), stake=cfg.chain.stake
    )
    window = dataclasses.replace(cfg.window, start_block=START_BLOCK)
    return cfg.replace(chain=chain, window=window)


def _resume_window(validator: NodeConfig, miners: list[NodeConfig]) -> int:
    """The window the saved states reached (0 without any)."""
    steps = [CheckpointStore(open_own_storage(validator.storage, validator.hotkey), "checkpoints")]
    steps += [CheckpointStore(LocalStorage(Path(m.state_dir)), "checkpoints") for m in miners]
    return max((s.latest_step() or 0 for s in steps), default=0)


def _check(
    miner_template: NodeConfig, validator_cfg: NodeConfig, miners: int, windows: int
) -> None:
    if miner_template.chain.kind == "bittensor" or validator_cfg.chain.kind == "bittensor":
        raise NodeConfigError("the local demo runs on a local chain, not chain.kind = 'bittensor'")
    if miner_template.run != validator_cfg.run:
        raise NodeConfigError("the miner and validator configs must have the same [run] section")
    if miner_template.window != validator_cfg.window:
        raise NodeConfigError("the miner and validator configs must have the same [window] section")
    if miners < 1 or windows < 1:
        raise NodeConfigError("the demo needs at least one miner and one window")


def _window_history(state_dir: str, first: int) -> list[dict[str, Any]]:
    events = read_events(Path(state_dir) / HISTORY_FILE)
    return [e for e in events if e.get("window", -1) >= first]


def run_local_demo(
    miner_template: NodeConfig, validator_cfg: NodeConfig, *, miners: int, windows: int
) -> DemoResult:
    """Run ``miners`` miners and the validator for ``windows`` windows; see the module doc."""
    _check(miner_template, validator_cfg, miners, windows)
    root = Path(validator_cfg.state_dir).parent
    chain_file = root / "chain.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{chain_file}{suffix}").unlink(missing_ok=True)
    crew = [_on_local_chain(c, chain_file) for c in miner_configs(miner_template, miners)]
    validator = _on_local_chain(validator_cfg, chain_file)
    first = _resume_window(validator, crew)
    specs = [NodeSpec(validator.hotkey, "validator", validator)]
    specs += [NodeSpec(c.hotkey, "honest", c) for c in crew]
    chain = SqliteSubnet(
        chain_file, netuid=validator.chain.netuid, block_time_s=validator.window.block_time_s
    )
    try:
        with NodeProcesses(specs, root / "demo", windows, threads=1) as nodes:
            nodes.wait_ready(chain, STARTUP_TIMEOUT_S)
            nodes.open_window(chain, first, validator.window.blocks_per_window)
            nodes.wait_exit(timeout_s=STARTUP_TIMEOUT_S + windows * 60.0)
    finally:
        chain.close()
    history = _window_history(validator.state_dir, first)
    return DemoResult(
        first_window=first,
        last_window=first + windows - 1,
        validator=history,
        miners={c.hotkey: _window_history(c.state_dir, first) for c in crew},
        weights=history[-1]["weights"] if history else {},
    )
