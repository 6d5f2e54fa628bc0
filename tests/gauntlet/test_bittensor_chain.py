"""The bittensor adapter driven through the real, installed SDK (11.x).

No chain is reachable here, so the network layer is replaced at the seam the SDK documents
for this: ``SyncClient(substrate=...)`` takes any implementation of its ``Substrate``
protocol (``bittensor._substrate``), the interface its reads, intents and executor are
written against. :class:`LocalSubstrate` implements it over a dict of decoded storage, so
everything above it is the SDK's own code: the typed namespaces and metagraph decoding, the
``SetWeights`` intent (preflight, u16 normalisation, commit-reveal timelock encryption),
the executor, ``ExtrinsicResult``, and real sr25519 wallets written to a temporary folder.
What this cannot check is SCALE encoding against a runtime; ``test_localnet`` does.
"""

from __future__ import annotations

import os

import pytest

bt = pytest.importorskip("bittensor", minversion="11")

from gauntlet import BittensorChain, Chain, ChainError, UnsupportedSDKError  # noqa: E402
from gauntlet.bittensor_chain import commitment_info, load_sdk  # noqa: E402

NETUID = 3
RAO = 10**9


class LocalSubstrate:
    """``bittensor.Substrate`` over in-memory decoded storage: one subnet, applied writes."""

    def __init__(self, block: int = 1000) -> None:
        self.token_symbols: dict[int, str] = {}
        self.block = block
        self.storage: dict[tuple[str, str, tuple], object] = {}
        self.neurons: list[dict] = []
        self.submitted: list[tuple[str, str, dict, str]] = []
        self.reject: str | None = None

    # Test set-up -----------------------------------------------------------------------

    def set(self, fn: str, params: list, value: object, module: str = "SubtensorModule"):
        self.storage[(module, fn, tuple(params))] = value

    def register(self, hotkey: str, stake_tao: float = 0.0, permit: bool = False) -> int:
        uid = len(self.neurons)
        self.neurons.append({"hotkey": hotkey, "stake": int(stake_tao * RAO), "permit": permit})
        self.set("Uids", [NETUID, hotkey], uid)
        self.set("ValidatorPermit", [NETUID], [n["permit"] for n in self.neurons])
        self.set("LastUpdate", [NETUID], [0] * len(self.neurons))
        return uid

    # The Substrate protocol (what the SDK calls) ---------------------------------------

    def balance(self, rao: int, netuid: int = 0):
        return bt.Balance(int(rao), netuid)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def block_hash(self, block: int | None = None) -> str:
        return f"0x{self.block if block is None else block:064x}"

    async def block_number(self) -> int:
        return self.block

    async def get_block(self, block_number=None, block_hash=None):
        """A produced block's header and its ``Timestamp.set`` inherent (None for one not
        produced yet, as the node answers)."""
        number = self.block if block_number is None else block_number
        if number > self.block:
            return None
        stamp = {"call_module": "Timestamp", "call_function": "set"}
        stamp["call_args"] = [{"name": "now", "value": 1_700_000_000_000 + 12_000 * number}]
        header = {"number": number, "hash": await self.block_hash(number)}
        return {"header": header, "extrinsics": [{"call": stamp}]}

    async def finalized_block_number(self) -> int:
        return self.block

    async def block_time(self) -> float:
        return 12.0

    async def spec_version(self) -> int:
        return 400

    async def query(self, module, storage_function, params=None, block_hash=None):
        return self.storage.get((module, storage_function, tuple(params or [])))

    async def query_map(self, module, storage_function, params=None, block_hash=None):
        prefix = tuple(params or [])
        return [
            (key[-1], value)
            for (mod, fn, key), value in self.storage.items()
            if (mod, fn) == (module, storage_function) and key[:-1] == prefix
        ]

    async def runtime_call(self, api, method, params, block_hash=None):
        if (api, method) != ("SubnetInfoRuntimeApi", "get_metagraph") or params != [NETUID]:
            return None
        n = len(self.neurons)
        return {
            "netuid": NETUID,
            "hotkeys": [x["hotkey"] for x in self.neurons],
            "coldkeys": [f"cold-{x['hotkey']}" for x in self.neurons],
            "validator_permit": [x["permit"] for x in self.neurons],
            "total_stake": [x["stake"] for x in self.neurons],
            "active": [True] * n,
            "block": self.block,
            "tempo": 360,
            "last_step": self.block - 10,
            "blocks_since_last_step": 10,
            "owner_hotkey": self.neurons[0]["hotkey"],
            "owner_coldkey": "owner",
            "network_registered_at": 1,
        }

    async def compose(self, call):
        return call

    async def estimate_fee(self, call, keypair):
        return bt.Balance(0)

    async def submit(self, call, keypair, **_kwargs):
        self.submitted.append((call.module, call.function, call.params, keypair.ss58_address))
        if self.reject is not None:
            return bt.ExtrinsicResult(success=False, message=self.reject)
        self._apply(call, keypair.ss58_address)
        return bt.ExtrinsicResult(success=True, message="Success")

    def _apply(self, call, signer: str) -> None:
        """The state change the runtime makes for the calls the adapter sends."""
        if call.function == "set_commitment":
            fields = [
                {variant: "0x" + raw.hex()}
                for entry in call.params["info"]["fields"]
                for variant, raw in entry.items()
            ]
            record = {"block": self.block, "deposit": 0, "info": {"fields": fields}}
            self.set("CommitmentOf", [call.params["netuid"], signer], record, "Commitments")
        elif call.function in ("set_mechanism_weights", "commit_timelocked_mechanism_weights"):
            last = list(self.storage[("SubtensorModule", "LastUpdate", (NETUID,))])
            last[self.storage[("SubtensorModule", "Uids", (NETUID, signer))]] = self.block
            self.set("LastUpdate", [NETUID], last)


def make_wallet(tmp_path, name: str):
    wallet = bt.Wallet(name=name, hotkey="hot", path=str(tmp_path))
    wallet.create_new_coldkey(use_password=False, suppress=True)
    wallet.create_new_hotkey(suppress=True)
    return wallet


@pytest.fixture
def net(tmp_path):
    """A subnet with two miners and a validator; returns (substrate, chain, wallets)."""
    sub = LocalSubstrate()
    wallets = [make_wallet(tmp_path, f"w{i}") for i in range(3)]
    sub.register(wallets[0].hotkey.ss58_address, 0.0)
    sub.register(wallets[1].hotkey.ss58_address, 2.5)
    sub.register(wallets[2].hotkey.ss58_address, 1000.0, permit=True)
    sub.set("NetworksAdded", [NETUID], True)
    sub.set("MaxWeightsLimit", [NETUID], 52428)  # 0.8
    sub.set("MinAllowedWeights", [NETUID], 2)
    sub.set("WeightsSetRateLimit", [NETUID], 100)
    sub.set("WeightsVersionKey", [NETUID], 7)
    sub.set("CommitRevealWeightsEnabled", [NETUID], False)
    sub.set("SubnetEpochConsensus", [NETUID], "Yuma")
    client = bt.SyncClient("local", substrate=sub)
    yield sub, BittensorChain(client, wallets[2], NETUID), wallets
    client.close()


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
    sub.block += 1
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
    sub.block += 5
    res = chain.set_weights([0, 1], [65535, 30000], version_key=7)
    assert not res.success and "rate limit" in res.message
    assert len(sub.submitted) == 1  # refused before signing
    sub.block += 100
    assert chain.set_weights([0, 1], [65535, 1000]).success  # over max_weight_limit 0.8
    weights = sub.submitted[-1][2]["weights"]
    assert max(weights) / sum(weights) <= 0.8 + 1e-4  # the SDK clipped it, not refused


def test_set_weights_below_min_allowed_is_refused_with_the_reason(net):
    _, chain, _ = net
    res = chain.set_weights([0], [65535])
    assert not res.success and "at least 2" in res.message


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


def test_unregistered_hotkey_and_chain_rejection_come_back_with_messages(net, tmp_path):
    sub, chain, _ = net
    stranger = make_wallet(tmp_path, "stranger")
    other = BittensorChain(chain._client, stranger, NETUID)
    res = other.set_weights([0, 1], [1, 1])
    assert not res.success and "not registered" in res.message
    sub.reject = "Custom error: SettingWeightsTooFast"
    res = chain.set_weights([0, 1], [65535, 30000])
    assert not res.success and res.message == sub.reject
    sub.reject = ""  # a pool rejection can carry no text at all
    res = chain.set_weights([0, 1], [65535, 30000])
    assert not res.success and "without a message" in res.message


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
    sub.reject = "Commitments.TooManyFieldsInCommitmentInfo"
    with pytest.raises(ChainError, match="TooManyFields"):
        chain.commit("short")


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


async def broken_runtime_call(api, method, params, block_hash=None):
    raise bt.ChainError("Runtime panic: metagraph unavailable")


def test_old_sdk_is_refused_with_its_version(monkeypatch):
    monkeypatch.delattr(bt, "SetWeights")
    monkeypatch.setattr(bt, "__version__", "10.0.1")
    with pytest.raises(UnsupportedSDKError, match=r"bittensor 10\.0\.1 .*SetWeights"):
        load_sdk()


LOCALNET = os.environ.get("SPARSELOCO_LOCALNET", "")


@pytest.mark.skipif(not LOCALNET, reason="set SPARSELOCO_LOCALNET=ws://… to a local subtensor")
def test_localnet():
    """Against a real node: see docs/miner.md for starting one and registering the wallet."""
    netuid = int(os.environ.get("SPARSELOCO_LOCALNET_NETUID", "2"))
    wallet = bt.Wallet(
        name=os.environ.get("SPARSELOCO_LOCALNET_WALLET", "default"),
        hotkey=os.environ.get("SPARSELOCO_LOCALNET_HOTKEY", "default"),
    )
    chain = BittensorChain(bt.Subtensor(LOCALNET), wallet, netuid)
    mg = chain.metagraph()
    assert chain.hotkey in mg.hotkeys and chain.block() >= mg.block
    assert chain.block_hash(mg.block).startswith("0x") and len(chain.block_hash(mg.block)) == 66
    chain.weight_limits()
    data = f"sparseloco-localnet-{chain.block()}"
    chain.commit(data)
    assert chain.get_commitment(chain.hotkey) == data
    assert chain.get_all_commitments()[chain.hotkey] == data
    uid = mg.uid_of(chain.hotkey)
    res = chain.set_weights([uid], [65535], version_key=chain.weight_limits().version_key)
    assert res.success, res.message
