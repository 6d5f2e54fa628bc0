"""Miner and validator roles for real deployments, driven by one TOML config file.

Quick use::

    from sparseloco.node import Miner, gpt_task, load_config, open_chain

    cfg = load_config("examples/configs/miner.toml")
    miner = Miner(cfg, gpt_task(cfg.run), open_chain(cfg))
    miner.run()            # follows the chain's windows until miner.stop is set

Modules: :mod:`~sparseloco.node.config` (typed config, TOML loading, secrets),
:mod:`~sparseloco.node.clock` (windows from blocks), :mod:`~sparseloco.node.commitments`
(the ≤128-byte commitment format and ``identity.json``), :mod:`~sparseloco.node.directory`
(a peer directory from commitments), :mod:`~sparseloco.node.storage`,
:mod:`~sparseloco.node.chain`, :mod:`~sparseloco.node.task` (model + data),
:mod:`~sparseloco.node.protocol` (rules miners and validators share),
:mod:`~sparseloco.node.state` (key file, checkpoint pruning), :mod:`~sparseloco.node.miner`,
:mod:`~sparseloco.node.validator`, :mod:`~sparseloco.node.demo` (miners and a validator as
threads on one in-memory chain), :mod:`~sparseloco.node.cli`. See ``docs/miner.md``.
"""

from sparseloco.node.base import Node
from sparseloco.node.chain import open_chain
from sparseloco.node.clock import BlockTicker, Stopped, WindowClock
from sparseloco.node.commitments import (
    CommitmentError,
    Locator,
    decode_commitment,
    encode_commitment,
)
from sparseloco.node.config import (
    ChainConfig,
    DataConfig,
    ExchangeSettings,
    MinerSettings,
    NodeConfig,
    NodeConfigError,
    RunConfig,
    Secret,
    StorageConfig,
    ValidatorSettings,
    WindowConfig,
    config_from_dict,
    load_config,
)
from sparseloco.node.directory import ChainDirectory
from sparseloco.node.miner import Miner
from sparseloco.node.protocol import Protocol
from sparseloco.node.task import Task, gpt_task
from sparseloco.node.validator import Validator

__all__ = [
    "BlockTicker",
    "ChainConfig",
    "ChainDirectory",
    "CommitmentError",
    "DataConfig",
    "ExchangeSettings",
    "Locator",
    "Miner",
    "MinerSettings",
    "Node",
    "NodeConfig",
    "NodeConfigError",
    "Protocol",
    "RunConfig",
    "Secret",
    "Stopped",
    "StorageConfig",
    "Task",
    "Validator",
    "ValidatorSettings",
    "WindowClock",
    "WindowConfig",
    "config_from_dict",
    "decode_commitment",
    "encode_commitment",
    "gpt_task",
    "load_config",
    "open_chain",
]
