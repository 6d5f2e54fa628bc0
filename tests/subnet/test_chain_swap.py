"""The same miner and validator run on the local SQLite chain and on bittensor, from TOML files
that differ only in ``[chain]``.

The real roles (:class:`subnet.Miner`, :class:`subnet.Validator`) run three windows as threads
of this process. ``local``: every node opens the chain file of its config. ``bittensor``: every
node builds its own client of the real SDK from its config (wallet loaded from
``wallet_path``); the one stand-in is the network, replaced at the SDK's seam by one
``LocalSubstrate`` that the nodes share (``tests/_bittensor_seam.py``). The test registers the
hotkeys there (what ``btcli subnets register`` and staking leave on chain) and produces the
blocks; on the local chain ``open_chain`` registers with ``chain.stake`` and the test advances
the file's block offset. Either way the test moves the chain one window once the miner has
published, so the run is deterministic. With ``SPARSELOCO_LOCALNET`` set, the same test runs
the nodes on a real subtensor node (see :class:`LocalnetRig` and docs/miner.md).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from gauntlet import BittensorChain, SqliteChain, SqliteSubnet
from netcomm import ObjectNotFoundError, update_key
from subnet import (
    Miner,
    NodeConfig,
    StorageConfig,
    Validator,
    decode_commitment,
    gpt_task,
    load_config,
)
from subnet.chain import open_chain
from subnet.config import dump_config

NETUID = 3
WINDOWS = 3
BLOCKS_PER_WINDOW = 10
TIMEOUT_S = 60
LOCALNET = os.environ.get("SPARSELOCO_LOCALNET", "")


def with_chain(text: str, section: str) -> str:
    """``text`` (a node's TOML) with its ``[chain]`` table replaced by ``section``."""
    start = text.index("\n[chain]\n")
    end = text.find("\n[", start + 1)
    return text[:start] + "\n" + section + (text[end:] if end >= 0 else "")


class LocalRig:
    """The SQLite chain file every node opens; the test moves its block offset."""

    kind, chain_type = "local", SqliteChain

    def __init__(self, tmp_path: Path, cfg: NodeConfig) -> None:
        self.path = tmp_path / "chain.sqlite"
        self.subnet = SqliteSubnet(self.path, netuid=NETUID, block_time_s=cfg.window.block_time_s)

    def section(self, role: str, name: str) -> str:
        stake = 1000.0 if role == "validator" else 0.0
        return (
            f'[chain]\nkind = "local"\nnetuid = {NETUID}\npath = "{self.path}"\nstake = {stake}\n'
        )

    def open(self, cfg: NodeConfig):
        return open_chain(cfg)

    def advance(self, blocks: int) -> None:
        self.subnet.advance(blocks)

    def close(self) -> None:
        self.subnet.close()

    def weighted_uids(self, validator: str) -> set[int]:
        hotkeys, _, matrix = self.subnet.weight_matrix()
        return {int(u) for u in matrix[hotkeys.index(validator)].nonzero()[0]}


class BittensorRig:
    """A ``kind = "bittensor"`` node per wallet; one ``LocalSubstrate`` behind every client."""

    kind, chain_type = "bittensor", BittensorChain

    def __init__(self, tmp_path: Path, seam) -> None:
        self.wallets = tmp_path / "wallets"
        self.seam = seam
        self.substrate = seam.LocalSubstrate(NETUID, block=0)
        for item, value in [
            ("MaxWeightsLimit", 65535),
            ("MinAllowedWeights", 1),
            ("WeightsSetRateLimit", BLOCKS_PER_WINDOW),
            ("WeightsVersionKey", 0),
        ]:
            self.substrate.set(item, [NETUID], value)

    def section(self, role: str, name: str) -> str:
        wallet = self.seam.make_wallet(self.wallets, name)
        stake = 1000.0 if role == "validator" else 0.0
        self.substrate.register(wallet.hotkey.ss58_address, stake, permit=role == "validator")
        return (
            f'[chain]\nkind = "bittensor"\nnetuid = {NETUID}\nnetwork = "local"\n'
            f'wallet_name = "{name}"\nwallet_hotkey = "default"\nwallet_path = "{self.wallets}"\n'
        )

    def open(self, cfg: NodeConfig):
        return open_chain(cfg, substrate=self.substrate)

    def advance(self, blocks: int) -> None:
        self.substrate.produce(blocks)

    def close(self) -> None:
        pass  # each node's client is closed with its chain

    def weighted_uids(self, validator: str) -> set[int]:
        uid = self.substrate.storage[("SubtensorModule", "Uids", (NETUID, validator))]
        return {dest for dest, value in self.substrate.weights(uid) if value}


class LocalnetRig:
    """A real subtensor node at ``SPARSELOCO_LOCALNET`` (fast blocks): the validator's and the
    miner's wallets were registered there beforehand (docs/miner.md) and the node makes the
    blocks, so :meth:`advance` only lets time pass."""

    kind, chain_type = "bittensor", BittensorChain

    def __init__(self) -> None:
        env = os.environ
        self.bt = pytest.importorskip("bittensor", minversion="11")
        self.netuid = int(env.get("SPARSELOCO_LOCALNET_NETUID", "2"))
        self.path = env.get("SPARSELOCO_LOCALNET_WALLET_PATH", "~/.bittensor/wallets")
        self.hotkey = env.get("SPARSELOCO_LOCALNET_HOTKEY", "default")
        self.names = {
            "val": env.get("SPARSELOCO_LOCALNET_WALLET", "default"),
            "miner": env.get("SPARSELOCO_LOCALNET_MINER_WALLET", "miner"),
        }
        self.blocks_per_window = int(env.get("SPARSELOCO_LOCALNET_BLOCKS_PER_WINDOW", "20"))
        self.client = self.bt.Subtensor(LOCALNET)

    def window(self, window):
        """Window 0 starts two windows from now (the nodes are built in between)."""
        start = self.client.block + 2 * self.blocks_per_window
        return dataclasses.replace(
            window, start_block=start, blocks_per_window=self.blocks_per_window
        )

    def section(self, role: str, name: str) -> str:
        return (
            f'[chain]\nkind = "bittensor"\nnetuid = {self.netuid}\nnetwork = "{LOCALNET}"\n'
            f'wallet_name = "{self.names[name]}"\nwallet_hotkey = "{self.hotkey}"\n'
            f'wallet_path = "{self.path}"\n'
        )

    def open(self, cfg: NodeConfig):
        return open_chain(cfg)

    def advance(self, blocks: int) -> None:
        pass  # the node makes its own blocks

    def close(self) -> None:
        self.client.close()

    def weighted_uids(self, validator: str) -> set[int] | None:
        """The applied row, or None on a commit-reveal subnet (applied only at the reveal)."""
        st = self.bt.storage.SubtensorModule
        if self.client.query(st.CommitRevealWeightsEnabled, [self.netuid]):
            return None
        uid = self.client.query(st.Uids, [self.netuid, validator])
        return {int(d) for d, v in self.client.query(st.Weights, [self.netuid, uid]) or [] if v}


@pytest.fixture(
    params=[
        "local",
        "bittensor",
        pytest.param(
            "localnet",
            marks=pytest.mark.skipif(not LOCALNET, reason="set SPARSELOCO_LOCALNET=ws://…"),
        ),
    ]
)
def rig(request, tmp_path, kit, one_thread):
    base = kit.node_config("miner", "m", tmp_path, StorageConfig(root=str(tmp_path / "storage")))
    # Blocks move only when the test advances them (on the local chain; bittensor ignores it).
    base = base.replace(window=dataclasses.replace(base.window, block_time_s=3600.0))
    if request.param == "local":
        made = LocalRig(tmp_path, base)
    elif request.param == "bittensor":
        made = BittensorRig(tmp_path, request.getfixturevalue("bt_seam"))
    else:
        made = LocalnetRig()
        base = base.replace(window=made.window(base.window))
    yield made, base
    made.close()


def node_files(rig, base: NodeConfig, tmp_path: Path) -> dict[str, Path]:
    """Each node's TOML file for ``rig``, written as a user would: the local-chain text with
    only its ``[chain]`` section swapped."""
    files = {}
    for role, name in (("validator", "val"), ("miner", "miner")):
        cfg = base.replace(role=role, hotkey=name, state_dir=str(tmp_path / name))
        text = dump_config(cfg)
        files[name] = tmp_path / f"{name}.toml"
        files[name].write_text(with_chain(text, rig.section(role, name)))
        local = tmp_path / f"{name}.local.toml"
        local.write_text(text)
        # The only difference from the local-chain config is the chain section.
        assert load_config(files[name]).replace(chain=cfg.chain) == load_config(local)
    return files


def published(miner: Miner, window: int) -> bool:
    try:
        miner.storage.head(update_key("", window, miner.hotkey))
    except ObjectNotFoundError:
        return False
    return True


def run_nodes(rig, nodes: list, until: int) -> None:
    """Run ``nodes`` as threads through window ``until``, moving the chain one window each
    time the miner has published."""
    errors: list[BaseException] = []

    def work(node) -> None:
        try:
            node.run(until_window=until)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    val, miner = nodes

    def wait(what: str, done) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not done():
            if errors or time.monotonic() > deadline:
                for n in nodes:
                    n.stop.set()
                if errors:
                    raise errors[0]
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.01)

    try:
        for w in range(until + 1):
            wait(f"the miner's update of window {w}", lambda w=w: published(miner, w))
            rig.advance(BLOCKS_PER_WINDOW)
            wait(f"the validator on window {w}", lambda w=w: (val.next_window or 0) > w)
        for t in threads:
            t.join(TIMEOUT_S)
        assert not any(t.is_alive() for t in threads) and not errors
    finally:
        for n in nodes:
            n.stop.set()


def test_the_same_roles_run_when_only_the_chain_section_changes(rig, tmp_path, kit):
    rig, base = rig
    files = node_files(rig, base, tmp_path)
    cfgs = {name: load_config(path) for name, path in files.items()}
    assert {c.chain.kind for c in cfgs.values()} == {rig.kind}
    task = gpt_task(cfgs["val"].run)
    val = Validator(cfgs["val"], task, rig.open(cfgs["val"]))
    miner = Miner(cfgs["miner"], task, rig.open(cfgs["miner"]))
    assert isinstance(val.chain, rig.chain_type) and isinstance(miner.chain, rig.chain_type)
    try:
        run_nodes(rig, [val, miner], until=WINDOWS - 1)
        # The miner trained every window and stepped on exactly the validator's accepted set.
        accepted = {r["window"]: r["accepted"] for r in val.history}
        assert accepted == {w: [miner.hotkey] for w in range(WINDOWS)}
        trained = {r["window"]: r["aggregated"] for r in miner.history}
        assert trained == accepted
        for name, p in miner.model.named_parameters():
            assert torch.equal(p, dict(val.model.named_parameters())[name]), name
        # Commitments point at each node's storage; weights went on chain for the miner.
        for node, role in ((val, "validator"), (miner, "miner")):
            assert decode_commitment(node.chain.get_commitment(node.hotkey)).role == role
        assert [r["weights_set"] for r in val.history] == [None, True, None]
        uids = val.chain.metagraph().hotkey_to_uid()
        assert rig.weighted_uids(val.hotkey) in ({uids[miner.hotkey]}, None)
    finally:
        for node in (val, miner):
            getattr(node.chain, "close", lambda: None)()
