"""Miner and validator roles for real deployments, driven by one TOML config file.

Quick use::

    from subnet import Miner, gpt_task, load_config, open_chain

    cfg = load_config("examples/configs/miner.toml")
    miner = Miner(cfg, gpt_task(cfg.run), open_chain(cfg))
    miner.run()            # follows the chain's windows until miner.stop is set

Modules: :mod:`~subnet.config` (typed config, TOML loading, secrets),
:mod:`~subnet.clock` (windows from blocks), :mod:`~subnet.commitments`
(the ≤128-byte commitment format and ``identity.json``), :mod:`~subnet.directory`
(a peer directory from commitments), :mod:`~subnet.storage`,
:mod:`~subnet.chain`, :mod:`~subnet.task` (model + data),
:mod:`~subnet.protocol` (rules miners and validators share),
:mod:`~subnet.state` (key file, checkpoint pruning), :mod:`~subnet.miner`,
:mod:`~subnet.validator`, :mod:`~subnet.demo` (miners and a validator as
threads on one in-memory chain), :mod:`~subnet.roles_cli`. See ``docs/miner.md``.
"""

from subnet.base import Node
from subnet.chain import open_chain
from subnet.clock import BlockTicker, Stopped, WindowClock
from subnet.commitments import (
    CommitmentError,
    Locator,
    decode_commitment,
    encode_commitment,
)
from subnet.config import (
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
from subnet.directory import ChainDirectory
from subnet.miner import Miner
from subnet.protocol import Protocol
from subnet.task import Task, gpt_task
from subnet.validator import Validator

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
