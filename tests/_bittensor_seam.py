"""The bittensor SDK with only its network replaced, for the adapter and role tests.

No chain is reachable in tests, so the network layer is replaced at the seam the SDK
documents for this: ``bittensor.SyncClient``/``Subtensor`` take ``substrate=`` any
implementation of the SDK's ``Substrate`` protocol (``bittensor._substrate``), the interface
its reads, intents and executor are written against. :class:`LocalSubstrate` implements it
over a dict of decoded storage, so everything above it is the SDK's own code: the typed
namespaces and metagraph decoding, the ``SetWeights`` intent (preflight, u16 normalisation,
commit-reveal timelock encryption), the executor, ``ExtrinsicResult``, and real sr25519
wallets written to a temporary folder. What this cannot check is SCALE encoding against a
runtime and the runtime's own rules; the optional localnet test does.

Loaded by the ``bt_seam`` fixture of ``tests/conftest.py`` (it needs ``bittensor`` 11).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import bittensor as bt
from bittensor.result import chain_error_from_substrate_request

RAO = 10**9


class LocalSubstrate:
    """``bittensor.Substrate`` over in-memory decoded storage: one subnet, applied writes.

    Thread-safe (nodes running as threads each hold their own SDK client over one instance);
    the test produces blocks with :meth:`produce` and sets storage with :meth:`set`.

    Args:
        netuid: the subnet (created, with commit-reveal off and Yuma consensus).
        block: the current block.
        block_time: seconds per block the SDK reads (commit-reveal rounds, retry waits).
    """

    def __init__(self, netuid: int = 3, block: int = 1000, block_time: float = 12.0) -> None:
        self.netuid = netuid
        self.token_symbols: dict[int, str] = {}
        self.block = block
        self.seconds_per_block = block_time
        self.storage: dict[tuple[str, str, tuple], object] = {}
        self.neurons: list[dict] = []
        self.submitted: list[tuple[str, str, dict, str]] = []
        #: what the next submissions meet: a string is the node's RPC error text of a
        #: transaction-pool rejection; a dict ``{"name", "docs"}`` a runtime dispatch error.
        self.rejections: list[str | dict] = []
        self._lock = threading.RLock()
        self.set("NetworksAdded", [netuid], True)
        self.set("CommitRevealWeightsEnabled", [netuid], False)
        self.set("SubnetEpochConsensus", [netuid], "Yuma")

    # Test set-up -----------------------------------------------------------------------

    def set(self, fn: str, params: list, value: object, module: str = "SubtensorModule"):
        with self._lock:
            self.storage[(module, fn, tuple(params))] = value

    def register(self, hotkey: str, stake_tao: float = 0.0, permit: bool = False) -> int:
        """What ``btcli subnets register`` and staking leave on chain; returns the uid."""
        with self._lock:
            uid = len(self.neurons)
            self.neurons.append({"hotkey": hotkey, "stake": int(stake_tao * RAO), "permit": permit})
            self.set("Uids", [self.netuid, hotkey], uid)
            self.set("ValidatorPermit", [self.netuid], [n["permit"] for n in self.neurons])
            self.set("LastUpdate", [self.netuid], [0] * len(self.neurons))
            return uid

    def produce(self, blocks: int = 1) -> int:
        """Make ``blocks`` more blocks; returns the new head."""
        with self._lock:
            self.block += blocks
            return self.block

    def weights(self, uid: int) -> list[tuple[int, int]]:
        """The ``(uid, u16)`` row ``uid`` set, as the ``Weights`` storage map holds it."""
        with self._lock:
            return list(self.storage.get(("SubtensorModule", "Weights", (self.netuid, uid)), []))

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
        return self.seconds_per_block

    async def spec_version(self) -> int:
        return 400

    async def query(self, module, storage_function, params=None, block_hash=None):
        with self._lock:
            return self.storage.get((module, storage_function, tuple(params or [])))

    async def query_map(self, module, storage_function, params=None, block_hash=None):
        prefix = tuple(params or [])
        with self._lock:
            return [
                (key[-1], value)
                for (mod, fn, key), value in self.storage.items()
                if (mod, fn) == (module, storage_function) and key[:-1] == prefix
            ]

    async def runtime_call(self, api, method, params, block_hash=None):
        if (api, method) != ("SubnetInfoRuntimeApi", "get_metagraph") or params != [self.netuid]:
            return None
        with self._lock:
            neurons = list(self.neurons)
            last_update = list(self.storage[("SubtensorModule", "LastUpdate", (self.netuid,))])
        n = len(neurons)
        return {
            "netuid": self.netuid,
            "hotkeys": [x["hotkey"] for x in neurons],
            "coldkeys": [f"cold-{x['hotkey']}" for x in neurons],
            "validator_permit": [x["permit"] for x in neurons],
            "total_stake": [x["stake"] for x in neurons],
            "last_update": last_update,
            "active": [True] * n,
            "block": self.block,
            "tempo": 360,
            "last_step": self.block - 10,
            "blocks_since_last_step": 10,
            "owner_hotkey": neurons[0]["hotkey"] if neurons else "",
            "owner_coldkey": "owner",
            "network_registered_at": 1,
        }

    async def compose(self, call):
        return call

    async def estimate_fee(self, call, keypair):
        return bt.Balance(0)

    async def submit(self, call, keypair, **_kwargs):
        with self._lock:
            self.submitted.append((call.module, call.function, call.params, keypair.ss58_address))
            if self.rejections:
                return _rejected(self.rejections.pop(0))
            self._apply(call, keypair.ss58_address)
        return bt.ExtrinsicResult(success=True, message="Success")

    def _apply(self, call, signer: str) -> None:
        """The state change the runtime makes for the calls the adapter sends."""
        netuid = call.params["netuid"]
        if call.function == "set_commitment":
            fields = [
                {variant: "0x" + raw.hex()}
                for entry in call.params["info"]["fields"]
                for variant, raw in entry.items()
            ]
            record = {"block": self.block, "deposit": 0, "info": {"fields": fields}}
            self.set("CommitmentOf", [netuid, signer], record, "Commitments")
        elif call.function in ("set_mechanism_weights", "commit_timelocked_mechanism_weights"):
            uid = self.storage[("SubtensorModule", "Uids", (netuid, signer))]
            last = list(self.storage[("SubtensorModule", "LastUpdate", (netuid,))])
            last[uid] = self.block
            self.set("LastUpdate", [netuid], last)
            if call.function == "set_mechanism_weights":
                row = list(zip(call.params["dests"], call.params["weights"], strict=True))
                self.set("Weights", [netuid, uid], row)


def _rejected(rejection: str | dict) -> Any:
    """The ``ExtrinsicResult`` the SDK's RPC backend returns for a pool rejection (it turns
    the node's error text into a named ``ChainError`` with this same function) or a runtime
    dispatch error (message: the error's docs)."""
    if isinstance(rejection, str):
        error = chain_error_from_substrate_request(Exception(rejection))
        return bt.ExtrinsicResult(success=False, message=error.message, error=error)
    text = " ".join(rejection["docs"])
    error = bt.ChainError(text, rejection["name"])
    return bt.ExtrinsicResult(success=False, message=text, error=error)


def make_wallet(path: Path, name: str, hotkey: str = "default") -> Any:
    """A real sr25519 wallet (unencrypted coldkey and hotkey) under ``path``."""
    wallet = bt.Wallet(name=name, hotkey=hotkey, path=str(path))
    wallet.create_new_coldkey(use_password=False, suppress=True)
    wallet.create_new_hotkey(suppress=True)
    return wallet
