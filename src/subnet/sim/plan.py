"""The node configurations of a simulated run: one per honest peer, adversary and validator.

Every node gets the same ``[run]`` and ``[window]`` sections, its own state folder
``<out>/nodes/<hotkey>`` and storage area, and the run's local chain ``<out>/chain.sqlite``.
"""

from __future__ import annotations

import os
from pathlib import Path

from subnet.adversary import STALE_LAG
from subnet.config import (
    ChainConfig,
    DataConfig,
    ExchangeSettings,
    NodeConfig,
    RunConfig,
    StorageConfig,
    ValidatorSettings,
    WindowConfig,
)
from subnet.sim.config import SimConfig
from subnet.sim.launch import START_BLOCK, NodeSpec

#: the validators' stakes: the first has the most, so every miner follows it.
VALIDATOR_STAKE = 1000.0


def chain_path(cfg: SimConfig) -> Path:
    return cfg.out / "chain.sqlite"


def block_time_s(cfg: SimConfig) -> float:
    return cfg.window_seconds / cfg.blocks_per_window


def run_config(cfg: SimConfig) -> RunConfig:
    """The ``[run]`` section every node shares."""
    return RunConfig(
        seed=f"sparseloco-sim-{cfg.seed}",
        preset=cfg.preset,
        outer_lr=cfg.outer_lr,
        inner_steps=cfg.inner_steps,
        batch_size=cfg.batch_size,
        inner_lr=cfg.inner_lr,
        model=cfg.model,
        data=DataConfig(path=cfg.data or "", corpus_bytes=cfg.corpus_bytes),
    )


def _storage(cfg: SimConfig, hotkey: str) -> StorageConfig:
    if cfg.storage.startswith("s3://"):
        bucket, _, prefix = cfg.storage.removeprefix("s3://").partition("/")
        return StorageConfig(
            kind="s3",
            bucket=bucket,
            endpoint_url=cfg.s3_endpoint or "",
            prefix="/".join(p for p in (prefix.strip("/"), hotkey) if p),
        )
    root = Path(cfg.storage) if cfg.storage else cfg.out / "storage"
    return StorageConfig(kind="local", root=str(root), prefix=hotkey)


def _node(cfg: SimConfig, hotkey: str, role: str, **sections: object) -> NodeConfig:
    bt = block_time_s(cfg)
    return NodeConfig(
        role=role,  # type: ignore[arg-type]
        hotkey=hotkey,
        state_dir=str(cfg.out / "nodes" / hotkey),
        run=run_config(cfg),
        window=WindowConfig(
            blocks_per_window=cfg.blocks_per_window,
            start_block=START_BLOCK,
            block_time_s=bt,
            poll_s=min(0.05, bt / 4),
        ),
        storage=_storage(cfg, hotkey),
        exchange=ExchangeSettings(
            # Updates are due by the window's end, when the validator gathers. A short grace
            # keeps a straggler from delaying the set every miner waits for: a longer one
            # lets lateness cascade from window to window until windows are skipped.
            gather_deadline_s=cfg.window_seconds / 4,
            poll_interval_s=0.02,
            selection_timeout_s=cfg.deadline_s,
            link=cfg.link,
        ),
        **sections,  # type: ignore[arg-type]
    )


def node_specs(cfg: SimConfig) -> list[NodeSpec]:
    """Validators first, then honest peers, then adversaries."""
    path = str(chain_path(cfg))
    validator = ValidatorSettings(
        weights_every=1,
        heldout_batches=cfg.heldout_batches,
        keep_checkpoints=STALE_LAG + 2,  # the stale adversary loads a model 3 windows old
        eval_assigned=cfg.eval_samples,
        eval_random=cfg.eval_samples,
        # the miners wait for the set while it scores: every core can evaluate
        eval_threads=len(os.sched_getaffinity(0)),
        aggregate="accepted" if cfg.aggregate == "top" else "valid",
    )
    specs = [
        NodeSpec(
            v,
            "validator",
            _node(
                cfg,
                v,
                "validator",
                chain=ChainConfig(kind="local", path=path, stake=VALIDATOR_STAKE - i),
                validator=validator,
            ),
        )
        for i, v in enumerate(cfg.validator_ids)
    ]
    miners = [(p, "honest") for p in cfg.honest_ids] + list(cfg.adversary_ids.items())
    for hotkey, kind in miners:
        settings = cfg.miner_settings(kind, cfg.honest_ids[0] if kind == "copier" else "")
        chain = ChainConfig(kind="local", path=path)
        specs.append(
            NodeSpec(hotkey, kind, _node(cfg, hotkey, "miner", chain=chain, miner=settings))
        )
    return specs
