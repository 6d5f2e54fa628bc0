"""Adapter from the :class:`~gauntlet.chain.Chain` protocol to the ``bittensor`` SDK, 11.x.

``bittensor`` is an optional extra (``pip install 'sparseloco[bittensor]'``) and is imported
only when an adapter is built; importing this module needs nothing. SDK 11 is a rewrite
(``SyncClient`` with typed read namespaces, write "intents"); the 9.x/10.x methods
(``metagraph()``, ``set_weights()``, ``get_commitment()``, …) are gone from it, and an
older SDK lacks the 11.x API, so :func:`load_sdk` checks for the names used here and raises
:class:`~gauntlet.errors.UnsupportedSDKError` with the installed version otherwise.

What each :class:`Chain` method calls (all on a ``bittensor.SyncClient``/``Subtensor``):

* ``metagraph`` → ``subnets.metagraph(netuid, commitments=False)`` (one runtime-API call);
* ``block`` → ``client.block``;
* ``block_hash`` → ``client.block_info(block).hash`` (the SDK's public per-block read; it
  returns ``None`` for a block the node has not produced or imported);
* ``weight_limits`` → ``hyperparameters.max_weight_limit / min_allowed_weights /
  weights_rate_limit`` and the ``SubtensorModule.WeightsVersionKey`` storage item;
* ``get_commitment`` → ``identity.commitment(netuid, hotkey)`` (one storage read);
* ``get_all_commitments`` → ``subnets.commitments(netuid)``;
* ``commit`` → raw call ``calls.Commitments.set_commitment`` signed by the hotkey (no
  intent wraps it);
* ``set_weights`` → ``execute(SetWeights(...), wallet)``, which picks plain or
  timelocked commit-reveal submission from the subnet's settings.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NamedTuple

from gauntlet.chain import MAX_COMMITMENT_BYTES, Metagraph, SetWeightsResult, WeightLimits
from gauntlet.errors import ChainError, UnsupportedSDKError
from gauntlet.weights import U16_MAX

SUPPORTED_SDK = "bittensor>=11,<12"

# The top-level names this adapter uses; their presence is what "11.x API" means here.
_REQUIRED_NAMES = ("SyncClient", "Subtensor", "Wallet", "SetWeights", "BittensorError", "calls")


def load_sdk() -> ModuleType:
    """Import ``bittensor`` and check it has the 11.x API this adapter calls."""
    try:
        bt = importlib.import_module("bittensor")
    except ImportError as exc:
        raise ChainError(
            f"bittensor is not installed ({exc}); install it with "
            "pip install 'sparseloco[bittensor]'"
        ) from None
    missing = [name for name in _REQUIRED_NAMES if not hasattr(bt, name)]
    calls = getattr(bt, "calls", None)
    if calls is not None and not hasattr(getattr(calls, "Commitments", None), "set_commitment"):
        missing.append("calls.Commitments.set_commitment")
    if missing:
        version = getattr(bt, "__version__", "unknown")
        raise UnsupportedSDKError(
            f"bittensor {version} is not supported: it lacks {', '.join(missing)}; "
            f"the adapter needs the 11.x API ({SUPPORTED_SDK})"
        )
    return bt


def commitment_info(data: str) -> dict[str, Any]:
    """The ``CommitmentInfo`` for plaintext ``data``: one ``Raw<n>`` field (n ≤ 128 bytes)."""
    raw = data.encode("utf-8")
    if len(raw) > MAX_COMMITMENT_BYTES:
        raise ChainError(
            f"commitment is {len(raw)} bytes; the chain takes at most {MAX_COMMITMENT_BYTES}"
        )
    # Same shape the SDK's readers decode: info.fields is a list of Data variants.
    return {"fields": [{f"Raw{len(raw)}": raw}]}


class BittensorChain:
    """The :class:`~gauntlet.chain.Chain` protocol over a ``bittensor`` 11.x client.

    Args:
        client: a ``bittensor.Subtensor`` or ``bittensor.SyncClient`` (blocking mode).
        wallet: a ``bittensor.Wallet`` (or wallet-shaped object) whose hotkey signs
            commitments and weights.
        netuid: the subnet.
        wait_for_finalization: wait for finality on writes (inclusion is always awaited,
            so a result reports what the chain did).
    """

    def __init__(
        self, client: Any, wallet: Any, netuid: int, *, wait_for_finalization: bool = False
    ) -> None:
        self._bt = load_sdk()
        self._client = client
        self._wallet = wallet
        self._netuid = int(netuid)
        self.wait_for_finalization = wait_for_finalization

    @classmethod
    def connect(
        cls,
        netuid: int,
        *,
        network: str = "finney",
        wallet_name: str = "default",
        wallet_hotkey: str = "default",
        **kwargs: Any,
    ) -> BittensorChain:
        """Build a ``Subtensor`` for ``network`` (it connects on first use) and a ``Wallet``."""
        bt = load_sdk()
        wallet = bt.Wallet(name=wallet_name, hotkey=wallet_hotkey)
        return cls(bt.Subtensor(network), wallet, netuid, **kwargs)

    @property
    def netuid(self) -> int:
        return self._netuid

    @property
    def hotkey(self) -> str:
        # The public view reads the hotkey's public file and never unlocks a key.
        return str(self._bt.public_view(self._wallet, "hotkey").ss58_address)

    def _read(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one SDK read, turning its errors into :class:`ChainError` with the reason."""
        try:
            return fn(*args, **kwargs)
        except self._bt.BittensorError as exc:
            raise ChainError(f"{what} on netuid {self._netuid} failed: {exc}") from exc

    def metagraph(self) -> Metagraph:
        # commitments=False: the commitment maps are two more full-map reads we do not need.
        mg = self._read(
            "metagraph", self._client.subnets.metagraph, self._netuid, commitments=False
        )
        if mg is None:
            raise ChainError(f"subnet {self._netuid} does not exist")
        return Metagraph(
            netuid=self._netuid,
            block=int(mg.block),
            uids=[int(n.uid) for n in mg.neurons],
            hotkeys=[str(n.hotkey) for n in mg.neurons],
            # The subnet's own unit (alpha on netuid > 0), as the chain's consensus uses it.
            stakes=[float(n.total_stake.amount) for n in mg.neurons],
            validator_permit=[bool(n.validator_permit) for n in mg.neurons],
        )

    def block(self) -> int:
        return int(self._read("block", lambda: self._client.block))

    def block_hash(self, block: int) -> str:
        if block < 0:
            raise ChainError(f"block {block} does not exist")
        info = self._read("block_info", self._client.block_info, int(block))
        if info is None or not info.hash:
            raise ChainError(
                f"block {block} has not been produced (or the node has not imported it); "
                "its hash does not exist yet"
            )
        return str(info.hash)

    def weight_limits(self) -> WeightLimits:
        storage = self._bt.storage.SubtensorModule
        # Hyperparameters of a missing subnet read as defaults (zeros), not as an error.
        if not self._query("NetworksAdded", storage.NetworksAdded):
            raise ChainError(f"subnet {self._netuid} does not exist")
        hp = self._client.hyperparameters
        max_limit = self._read("max_weight_limit", hp.max_weight_limit, self._netuid)
        return WeightLimits(
            # The chain stores the cap as a u16 fraction of the normalized total.
            max_weight_limit=int(max_limit) / U16_MAX,
            min_allowed_weights=int(
                self._read("min_allowed_weights", hp.min_allowed_weights, self._netuid)
            ),
            rate_limit=int(self._read("weights_rate_limit", hp.weights_rate_limit, self._netuid)),
            version_key=int(self._query("WeightsVersionKey", storage.WeightsVersionKey) or 0),
        )

    def _query(self, what: str, item: Any) -> Any:
        """One per-subnet storage item the typed namespaces do not cover."""
        return self._read(what, self._client.query, item, [self._netuid])

    def get_commitment(self, hotkey: str) -> str | None:
        found = self._read("commitment", self._client.identity.commitment, self._netuid, hotkey)
        # A sealed (timelocked) commitment has no readable data yet.
        return found.data if found is not None and found.data else None

    def get_all_commitments(self) -> dict[str, str]:
        found = self._read("commitments", self._client.subnets.commitments, self._netuid)
        visible = {str(hk): c.value for hk, c in found.items() if c.value}
        return dict(sorted(visible.items()))

    def commit(self, data: str) -> None:
        call = self._bt.calls.Commitments.set_commitment(
            netuid=self._netuid, info=commitment_info(data)
        )
        result = self._write(
            "set_commitment",
            self._client.submit_call,
            call,
            self._wallet,
            signer="hotkey",
            wait_for_inclusion=True,
            wait_for_finalization=self.wait_for_finalization,
        )
        if not result.success:
            raise ChainError(f"commitment rejected: {result.message}")

    def set_weights(
        self, uids: Sequence[int], values: Sequence[int], version_key: int = 0
    ) -> SetWeightsResult:
        """Submit u16 ``values``; the SDK rescales them so the largest is 65535.

        Values within ``weight_limits()`` keep their ratios; the SDK clips a vector above
        ``max_weight_limit`` (redistributing the excess) instead of refusing it.

        The SDK refuses a rate-limited or unregistered hotkey before signing; that comes
        back as a failed result with its message, as does a chain-side rejection.
        """
        intent = self._bt.SetWeights(
            netuid=self._netuid,
            uids=[int(u) for u in uids],
            weights=[float(v) for v in values],
            version_key=int(version_key),
        )
        result = self._write(
            "set_weights",
            self._client.execute,
            intent,
            self._wallet,
            wait_for_inclusion=True,
            wait_for_finalization=self.wait_for_finalization,
        )
        if not result.success:
            return SetWeightsResult(False, result.message)
        reveal_round = result.data.get("reveal_round")
        if reveal_round is None:
            return SetWeightsResult(True, result.message)
        return SetWeightsResult(
            True,
            f"committed (commit-reveal); the chain applies the weights at drand round "
            f"{reveal_round}",
            reveal_round=int(reveal_round),
        )

    def _write(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> _Outcome:
        """Run one SDK write; a refusal before or after signing becomes a failed outcome."""
        try:
            result = fn(*args, **kwargs)
        except self._bt.BittensorError as exc:
            return _Outcome(False, _message(what, exc), {})
        if result.success:
            return _Outcome(True, str(result.message), dict(result.data))
        return _Outcome(False, _message(what, result.error, result.message), {})


class _Outcome(NamedTuple):
    """A write's success, message and extras (the SDK result, minus what we do not use)."""

    success: bool
    message: str
    data: dict[str, Any]


def _message(what: str, error: Any, message: str = "") -> str:
    """The chain's reason; pool rejections (e.g. a rate limit) can arrive with none."""
    text = message or (str(error) if error is not None else "")
    if text:
        return text
    code = getattr(error, "code", None)
    label = getattr(code, "name", None) or "no reason given"
    return f"{what} rejected by the chain without a message ({label})"
