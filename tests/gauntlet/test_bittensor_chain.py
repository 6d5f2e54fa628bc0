"""The bittensor adapter driven through the real, installed SDK (11.x).

The network layer is replaced at the SDK's own seam (``SyncClient(substrate=...)``, see
``tests/_bittensor_seam.py``): every SDK layer above it runs. ``test_localnet`` runs against a
real node when ``SPARSELOCO_LOCALNET`` is set.
"""

from __future__ import annotations

import os
import re
import socket

import pytest

bt = pytest.importorskip("bittensor", minversion="11")

from gauntlet import BittensorChain, Chain, ChainError, UnsupportedSDKError  # noqa: E402
from gauntlet.bittensor_chain import SUPPORTED_SDK, commitment_info, load_sdk  # noqa: E402

NETUID = 3
RATE_LIMITED = "Invalid Transaction: Custom error: 6"  # the node's text for the pool's refusal


@pytest.fixture
def net(bt_seam, tmp_path):
    """A subnet with two miners and a validator; returns (substrate, chain, wallets)."""
    sub = bt_seam.LocalSubstrate(NETUID)
    wallets = [bt_seam.make_wallet(tmp_path, f"w{i}") for i in range(3)]
    sub.register(wallets[0].hotkey.ss58_address, 0.0)
    sub.register(wallets[1].hotkey.ss58_address, 2.5)
    sub.register(wallets[2].hotkey.ss58_address, 1000.0, permit=True)
    sub.set("MaxWeightsLimit", [NETUID], 52428)  # 0.8
    sub.set("MinAllowedWeights", [NETUID], 2)
    sub.set("WeightsSetRateLimit", [NETUID], 100)
    sub.set("WeightsVersionKey", [NETUID], 7)
    client = bt.SyncClient("local", substrate=sub)
    chain = BittensorChain(client, wallets[2], NETUID)
    yield sub, chain, wallets
    chain.close()


def test_metagraph_and_limits_through_the_sdk(net):
    _, chain, wallets = net
    assert isinstance(chain, Chain) and chain.hotkey == wallets[2].hotkey.ss58_address
    mg = chain.metagraph()
    assert mg.uids == [0, 1, 2] and mg.block == 1000
    assert mg.hotkeys == [w.hotkey.ss58_address for w in wallets]
    assert mg.stakes == [0.0, 2.5, 1000.0]
    assert mg.validator_permit == [False, False, True]
    assert chain.block() == 1000
    lim = chain.weight_limits()
    assert lim.max_weight_limit == pytest.approx(0.8, abs=1e-4)
    assert (lim.min_allowed_weights, lim.rate_limit, lim.version_key) == (2, 100, 7)


def test_block_hash_through_the_sdk(net):
    sub, chain, _ = net
    assert chain.block_hash(990) == f"0x{990:064x}"  # what the node returned, unchanged
    assert chain.block_hash(1000) == f"0x{1000:064x}"
    with pytest.raises(ChainError, match="has not been produced"):
        chain.block_hash(1001)
    sub.produce()
    assert chain.block_hash(1001) == f"0x{1001:064x}"
    with pytest.raises(ChainError, match="does not exist"):
        chain.block_hash(-1)


def test_set_weights_sends_the_u16_values_then_hits_the_rate_limit(net):
    sub, chain, _ = net
    res = chain.set_weights([0, 1], [65535, 30000], version_key=7)
    assert res.success and res.reveal_round is None
    module, function, params, signer = sub.submitted[-1]
    assert (module, function, signer) == ("SubtensorModule", "set_mechanism_weights", chain.hotkey)
    assert params["dests"] == [0, 1] and params["weights"] == [65535, 30000]
    assert (params["netuid"], params["version_key"]) == (NETUID, 7)
    assert sub.weights(2) == [(0, 65535), (1, 30000)]
    sub.produce(5)
    res = chain.set_weights([0, 1], [65535, 30000], version_key=7)
    assert not res.success and "rate limit is 100 blocks" in res.message
    assert len(sub.submitted) == 1  # refused before signing
    sub.produce(100)
    assert chain.set_weights([0, 1], [65535, 1000]).success  # over max_weight_limit 0.8
    weights = sub.submitted[-1][2]["weights"]
    assert max(weights) / sum(weights) <= 0.8 + 1e-4  # the SDK clipped it, not refused


def test_weights_the_sdk_refuses_before_signing_come_back_as_results(net, bt_seam, tmp_path):
    sub, chain, _ = net
    res = chain.set_weights([0], [65535])
    assert not res.success and "at least 2" in res.message  # min_allowed_weights
    res = chain.set_weights([0, 0], [1, 2])
    assert not res.success and "Duplicate UIDs" in res.message
    res = chain.set_weights([0, 1], [0, 0])
    assert not res.success and "All weights are zero" in res.message
    stranger = BittensorChain(chain._client, bt_seam.make_wallet(tmp_path, "stranger"), NETUID)
    res = stranger.set_weights([0, 1], [1, 1])
    assert not res.success and "not registered" in res.message
    assert sub.submitted == []


def test_commit_reveal_subnet_reports_committed_not_applied(net):
    sub, chain, _ = net
    sub.set("CommitRevealWeightsEnabled", [NETUID], True)
    for fn, value in [
        ("Tempo", 360),
        ("RevealPeriodEpochs", 1),
        ("LastEpochBlock", 990),
        ("PendingEpochAt", 0),
        ("SubnetEpochIndex", 2),
        ("BlocksSinceLastStep", 10),
    ]:
        sub.set(fn, [NETUID], value)
    res = chain.set_weights([0, 1], [65535, 30000], version_key=7)
    assert res.success and res.reveal_round is not None and res.reveal_round > 0
    assert "committed" in res.message
    _, function, params, _ = sub.submitted[-1]
    assert function == "commit_timelocked_mechanism_weights"
    assert params["reveal_round"] == res.reveal_round and len(params["commit"]) > 0
    assert sub.weights(2) == []  # nothing applied until the reveal round
    sub.produce(5)
    res = chain.set_weights([0, 1], [65535, 30000], version_key=7)  # commits are rate limited
    assert not res.success and "rate limit" in res.message


def test_rejections_by_the_pool_and_the_runtime_carry_the_chain_message(net):
    sub, chain, _ = net
    # The preflight read LastUpdate, but the pool saw a newer set (e.g. one still in it).
    sub.rejections = [RATE_LIMITED]
    res = chain.set_weights([0, 1], [65535, 30000])
    assert not res.success and "rate limit blocked this extrinsic" in res.message
    sub.rejections = [{"name": "NotEnoughStakeToSetWeights", "docs": ["Not enough stake."]}]
    res = chain.set_weights([0, 1], [65535, 30000])
    assert not res.success and res.message == "Not enough stake."
    sub.rejections = [{"name": None, "docs": []}]  # a rejection with no text at all
    res = chain.set_weights([0, 1], [65535, 30000])
    assert not res.success and "without a message (UNKNOWN)" in res.message
    assert sub.weights(2) == []


def test_a_transient_pool_rejection_is_resubmitted(net):
    sub, chain, _ = net
    sub.seconds_per_block = 0.01  # the executor waits one block between submissions
    sub.rejections = ["Invalid Transaction: Priority is too low"] * 2
    assert chain.set_weights([0, 1], [65535, 30000]).success
    assert len(sub.submitted) == 3 and sub.weights(2) == [(0, 65535), (1, 30000)]


def test_commitment_round_trip_at_the_128_byte_limit(net):
    sub, chain, wallets = net
    data = "x" * 128  # the chain's limit
    chain.commit(data)
    module, function, params, signer = sub.submitted[-1]
    assert (module, function, signer) == ("Commitments", "set_commitment", chain.hotkey)
    assert params["info"] == commitment_info(data) == {"fields": [{"Raw128": data.encode()}]}
    assert chain.get_commitment(chain.hotkey) == data
    assert chain.get_commitment(wallets[0].hotkey.ss58_address) is None
    assert chain.get_all_commitments() == {chain.hotkey: data}
    with pytest.raises(ChainError, match="129 bytes"):
        chain.commit("é" * 64 + "x")
    docs = "The commitment would push the account's byte quota over the cap."
    sub.rejections = [{"name": "SpaceLimitExceeded", "docs": [docs]}]
    with pytest.raises(ChainError, match="commitment rejected: The commitment would push"):
        chain.commit("short")
    assert chain.get_commitment(chain.hotkey) == data


def test_missing_subnet_and_failing_reads_are_chain_errors(net):
    sub, chain, wallets = net
    lost = BittensorChain(chain._client, wallets[2], netuid=99)
    with pytest.raises(ChainError, match="does not exist"):
        lost.metagraph()
    with pytest.raises(ChainError, match="subnet 99 does not exist"):
        lost.weight_limits()
    sub.runtime_call = broken_runtime_call
    with pytest.raises(ChainError, match=r"metagraph on netuid 3 failed: .*Runtime panic"):
        chain.metagraph()
    sub.block_number = timed_out
    with pytest.raises(ChainError, match="block on netuid 3 failed: no response"):
        chain.block()


async def broken_runtime_call(api, method, params, block_hash=None):
    raise bt.ChainError("Runtime panic: metagraph unavailable")


async def timed_out():
    raise TimeoutError("no response")


def test_connect_loads_the_wallet_and_checks_registration(bt_seam, tmp_path):
    sub = bt_seam.LocalSubstrate(NETUID)
    wallet = bt_seam.make_wallet(tmp_path, "val", "hot")
    args = dict(network="local", wallet_name="val", wallet_hotkey="hot", substrate=sub)
    with pytest.raises(ChainError, match=f"not registered on netuid {NETUID}"):
        BittensorChain.connect(NETUID, wallet_path=str(tmp_path), **args)
    sub.register(wallet.hotkey.ss58_address, 10.0, permit=True)
    with pytest.raises(ChainError, match="subnet 4 does not exist"):
        BittensorChain.connect(4, wallet_path=str(tmp_path), **args)
    chain = BittensorChain.connect(NETUID, wallet_path=str(tmp_path), **args)
    try:
        assert chain.hotkey == wallet.hotkey.ss58_address and chain.metagraph().uids == [0]
    finally:
        chain.close()
    with pytest.raises(ChainError, match=r"cannot load hotkey 'hot' of bittensor wallet 'val'"):
        BittensorChain.connect(NETUID, wallet_path=str(tmp_path / "elsewhere"), **args)


def test_connect_names_an_unreachable_or_unknown_network(bt_seam, tmp_path):
    bt_seam.make_wallet(tmp_path, "val")
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ChainError, match=re.escape(f"cannot reach the bittensor network '{url}'")):
        BittensorChain.connect(NETUID, network=url, wallet_name="val", wallet_path=str(tmp_path))
    with pytest.raises(ChainError, match=r"chain\.network: Unknown network 'mainnet'"):
        BittensorChain.connect(
            NETUID, network="mainnet", wallet_name="val", wallet_path=str(tmp_path)
        )


def test_old_sdk_is_refused_with_its_version_and_the_supported_range(monkeypatch):
    monkeypatch.delattr(bt, "SetWeights")
    monkeypatch.setattr(bt, "__version__", "10.5.0")
    with pytest.raises(UnsupportedSDKError, match=r"bittensor 10\.5\.0 .*SetWeights") as info:
        load_sdk()
    assert SUPPORTED_SDK in str(info.value) and SUPPORTED_SDK == "bittensor>=11.3,<12"


LOCALNET = os.environ.get("SPARSELOCO_LOCALNET", "")


@pytest.mark.skipif(not LOCALNET, reason="set SPARSELOCO_LOCALNET=ws://… to a local subtensor")
def test_localnet():
    """Against a real node: see docs/miner.md for starting one and registering the wallet."""
    chain = BittensorChain.connect(
        int(os.environ.get("SPARSELOCO_LOCALNET_NETUID", "2")),
        network=LOCALNET,
        wallet_name=os.environ.get("SPARSELOCO_LOCALNET_WALLET", "default"),
        wallet_hotkey=os.environ.get("SPARSELOCO_LOCALNET_HOTKEY", "default"),
    )
    mg = chain.metagraph()
    assert chain.hotkey in mg.hotkeys and chain.block() >= mg.block
    assert chain.block_hash(mg.block).startswith("0x") and len(chain.block_hash(mg.block)) == 66
    limits = chain.weight_limits()
    data = f"sparseloco-localnet-{chain.block()}"
    chain.commit(data)
    assert chain.get_commitment(chain.hotkey) == data
    assert chain.get_all_commitments()[chain.hotkey] == data
    uid = mg.uid_of(chain.hotkey)
    res = chain.set_weights([uid], [65535], version_key=limits.version_key)
    assert res.success, res.message
