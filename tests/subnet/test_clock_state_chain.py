"""Windows from blocks, the block ticker, key files, checkpoint pruning, chain from config."""

from __future__ import annotations

import stat
import threading
import time

import pytest
import torch

from gauntlet import InMemorySubnet
from netcomm import CheckpointStore, LocalStorage
from subnet import (
    BlockTicker,
    NodeConfigError,
    Stopped,
    WindowClock,
    WindowConfig,
    config_from_dict,
)
from subnet.chain import open_chain
from subnet.state import load_or_create_signer, prune_checkpoints


def test_window_arithmetic_and_skipping_ahead():
    subnet = InMemorySubnet(block=95)
    clock = WindowClock(subnet.connect("a"), WindowConfig(blocks_per_window=10, start_block=100))
    assert clock.window() == -1
    subnet.block = 100
    assert (clock.window(), clock.window_of(109), clock.window_of(110)) == (0, 0, 1)
    assert clock.first_block(3) == 130
    subnet.block = 175  # far ahead: waiting for window 2 returns the current window, 7
    assert clock.wait_for(2) == 7


def test_wait_stops_when_asked():
    subnet = InMemorySubnet()
    clock = WindowClock(subnet.connect("a"), WindowConfig(poll_s=0.01))
    threading.Timer(0.05, clock.stop.set).start()
    with pytest.raises(Stopped):
        clock.wait_for(1)


def test_block_ticker_advances_the_subnet():
    subnet = InMemorySubnet()
    with BlockTicker(subnet, 0.01):
        deadline = time.monotonic() + 30  # the loop ends at block 3; this only bounds a stall
        while subnet.block < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    stopped_at = subnet.block
    time.sleep(0.05)
    assert 3 <= stopped_at == subnet.block


def test_signing_key_is_private_and_survives_restarts(tmp_path):
    first = load_or_create_signer(tmp_path / "node")
    mode = stat.S_IMODE((tmp_path / "node" / "ed25519.key").stat().st_mode)
    assert mode == 0o600
    assert load_or_create_signer(tmp_path / "node").public_key == first.public_key
    assert load_or_create_signer(tmp_path / "other").public_key != first.public_key


def test_prune_keeps_the_newest_and_latest(tmp_path):
    store = CheckpointStore(LocalStorage(tmp_path), "ck")
    for step in range(5):
        store.save(step, {"w": torch.full((2,), float(step))})
    assert prune_checkpoints(store, keep=2) == [0, 1, 2]
    assert store.steps() == [3, 4]
    assert store.load().model["w"].tolist() == [4.0, 4.0]
    assert not list((tmp_path / "ck").glob("000000000000/*"))


def test_memory_chain_registers_the_hotkey_with_its_stake():
    cfg = config_from_dict({"role": "validator", "hotkey": "v", "chain": {"stake": 5.0}})
    subnet = InMemorySubnet()
    chain = open_chain(cfg, subnet)
    assert chain.hotkey == "v" and subnet.stakes["v"] == 5.0


def test_bittensor_chain_from_config(bt_seam, tmp_path):
    """Every key of a ``kind = "bittensor"`` section reaches the SDK: the wallet is loaded from
    ``wallet_path`` and the network replaced at the SDK's seam (a real user names a node)."""
    wallet = bt_seam.make_wallet(tmp_path / "wallets", "cold", "hot")
    sub = bt_seam.LocalSubstrate(netuid=3)
    sub.register(wallet.hotkey.ss58_address)
    section = {
        "kind": "bittensor",
        "netuid": 3,
        "network": "test",
        "wallet_name": "cold",
        "wallet_hotkey": "hot",
        "wallet_path": str(tmp_path / "wallets"),
    }
    cfg = config_from_dict({"role": "miner", "chain": section})
    chain = open_chain(cfg, substrate=sub)
    try:
        assert chain.netuid == 3 and chain._client.network == "test"
        assert (chain._wallet.name, chain._wallet.hotkey_str) == ("cold", "hot")
        assert chain.hotkey == wallet.hotkey.ss58_address
    finally:
        chain.close()
    with pytest.raises(NodeConfigError, match=r"chain\.wallet_path must not be empty"):
        config_from_dict({"role": "miner", "chain": {**section, "wallet_path": ""}})
