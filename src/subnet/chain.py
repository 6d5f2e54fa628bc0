"""The chain a node talks to, from its ``[chain]`` section."""

from __future__ import annotations

from typing import Any

from gauntlet import BittensorChain, Chain, InMemorySubnet, SqliteSubnet
from subnet.config import NodeConfig


def open_chain(
    cfg: NodeConfig, subnet: InMemorySubnet | None = None, *, substrate: Any = None
) -> Chain:
    """This node's chain handle.

    ``memory``: a handle on ``subnet`` (a fresh one when ``None``; nodes share an in-memory
    chain only inside one process), with the node's hotkey registered at ``chain.stake``,
    which stands in for ``btcli subnet register`` and staking. ``local``: the same on the
    SQLite chain at ``chain.path``, which every process of the run opens, with one block every
    ``window.block_time_s`` seconds since the file was created. ``bittensor``: the network and
    wallet of the config (the ``bittensor`` package is imported here); the wallet's hotkey
    must already be registered on the subnet, else :class:`gauntlet.ChainError` says so.

    ``substrate`` (tests only): a ``bittensor.Substrate`` implementation the SDK uses instead
    of connecting to ``chain.network`` (see :meth:`gauntlet.BittensorChain.connect`).
    """
    if cfg.chain.kind == "bittensor":
        return BittensorChain.connect(
            cfg.chain.netuid,
            network=cfg.chain.network,
            wallet_name=cfg.chain.wallet_name,
            wallet_hotkey=cfg.chain.wallet_hotkey,
            wallet_path=cfg.chain.wallet_path,
            substrate=substrate,
        )
    if cfg.chain.kind == "local":
        local = SqliteSubnet(
            cfg.chain.path, netuid=cfg.chain.netuid, block_time_s=cfg.window.block_time_s
        )
        local.register(cfg.hotkey, stake=cfg.chain.stake)
        return local.connect(cfg.hotkey)
    if subnet is None:
        subnet = InMemorySubnet(netuid=cfg.chain.netuid)
    subnet.register(cfg.hotkey, stake=cfg.chain.stake)
    return subnet.connect(cfg.hotkey)
