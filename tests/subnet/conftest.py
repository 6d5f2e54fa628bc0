"""Shared fixtures: a moto S3 server on loopback and small node configurations."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from sparseloco.models.gpt import GPTConfig
from subnet import (
    ChainConfig,
    DataConfig,
    ExchangeSettings,
    NodeConfig,
    RunConfig,
    StorageConfig,
    ValidatorSettings,
    WindowConfig,
)

RUN = RunConfig(
    seed="node-tests",
    inner_steps=2,
    batch_size=4,
    model=GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32),
    data=DataConfig(corpus_bytes=100_000),
)
WINDOW = WindowConfig(blocks_per_window=10, poll_s=0.01)
# The validator gathers after a window closed: a missing update costs one short deadline.
EXCHANGE = ExchangeSettings(gather_deadline_s=2, poll_interval_s=0.02, selection_timeout_s=30)
# Fast failure on the loopback server instead of the defaults meant for the internet.
S3_OPTIONS = dict(
    connect_timeout_s=2.0, read_timeout_s=5.0, max_attempts=3, backoff_s=0.01, backoff_max_s=0.05
)


def node_config(role: str, hotkey: str, state_dir, storage: StorageConfig) -> NodeConfig:
    return NodeConfig(
        role=role,
        hotkey=hotkey,
        state_dir=str(state_dir),
        run=RUN,
        window=WINDOW,
        storage=storage,
        chain=ChainConfig(stake=1000.0 if role == "validator" else 0.0),
        exchange=EXCHANGE,
        validator=ValidatorSettings(weights_every=2, eval_assigned=8, eval_random=8),
    )


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Nodes run as threads; one torch thread each keeps 2-core machines responsive."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kit() -> SimpleNamespace:
    """Helpers for test modules (importlib mode cannot import conftest directly)."""
    return SimpleNamespace(
        run=RUN, node_config=node_config, s3_options=S3_OPTIONS, exchange=EXCHANGE
    )
