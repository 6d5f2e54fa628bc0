"""Adapter from the :class:`~gauntlet.chain.Chain` protocol to the ``bittensor`` SDK, 11.x.

``bittensor`` is an optional extra (``pip install 'sparseloco[bittensor]'``) and is imported
only when an adapter is built; importing this module needs nothing. SDK 11 is a rewrite
(``SyncClient`` with typed read namespaces, write "intents"); the 9.x/10.x methods
(``metagraph()``, ``set_weights()``, ``get_commitment()``, …) are gone from it, and an
older SDK lacks the 11.x API, so :func:`load_sdk` checks for the names used here and raises
:class:`~gauntlet.errors.UnsupportedSDKError` naming the installed version and
:data:`SUPPORTED_SDK` otherwise. 10.x is not supported: it is the previous SDK (classic
``Subtensor`` over ``async-substrate-interface``), a second adapter rather than a shim.

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

Reads that fail raise :class:`~gauntlet.errors.ChainError` with the SDK's reason; writes
that the SDK refuses before signing (rate limit, unregistered hotkey, too few weights) or
the chain rejects come back as a failed result (``set_weights``) or a ``ChainError``
(``commit``) carrying the chain's message.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

from gauntlet.chain import MAX_COMMITMENT_BYTES, Metagraph, SetWeightsResult, WeightLimits
from gauntlet.errors import ChainError, UnsupportedSDKError
from gauntlet.weights import U16_MAX

#: the SDK versions this adapter is tested against (the ``bittensor`` extra's range).
SUPPORTED_SDK = "bittensor>=11.3,<12"

#: extra submissions of a ``set_weights`` the transaction pool refused for a transient
#: reason (a nonce race, "priority is too low"), one block apart, as ``bt.set_weights`` does.
SET_WEIGHTS_RETRIES = 2

# The top-level names this adapter uses; their presence is what "11.x API" means here.
_REQUIRED_NAMES = (
    "SyncClient",
    "Subtensor",
    "Wallet",
    "SetWeights",
    "BittensorError",
    "calls",
    "storage",
    "public_view",
)


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
            f"bittensor {version} is not supported: it lacks {', '.join(missing)}; the "
            f"adapter needs {SUPPORTED_SDK} (pip install 'sparseloco[bittensor]')"
        )
    return bt


def commitment_info(data: str) -> dict[str, Any]:
    """The ``CommitmentInfo`` for plaintext ``data``: one ``Raw<n>`` field (n ≤ 128 bytes)."""
    raw = data.encode("utf-8")
    if len(raw) > MAX_COMMITMENT_BYTES:
        raise ChainError(
            f"commitment is {len(raw)} bytes; the chain takes at most {MAX_COMMITMENT_BYTES}"
        )
    # info.fields is a plain list of Data variants: the shape the SDK's readers decode and how
    # it passes its own BoundedVec parameters (10.x's codec wanted the list wrapped, [[...]]).
    return {"fields": [{f"Raw{len(raw)}": raw}]}


def open_wallet(bt: ModuleType, name: str, hotkey: str, path: str | None = None) -> Any:
    """``bt.Wallet(name, hotkey, path)`` with its signing hotkey loaded now, so that a
    missing or unreadable key is a :class:`ChainError` at start-up, not at the first write."""
    key_errors = (OSError, ValueError, importlib.import_module("bittensor.keyfiles").KeyfileError)
    where = path or "the default wallet folder"
    try:
        wallet = bt.Wallet(name, hotkey) if path is None else bt.Wallet(name, hotkey, path)
        wallet.hotkey  # noqa: B018 (loads and caches the keypair)
    except key_errors as exc:
        raise ChainError(
            f"cannot load hotkey {hotkey!r} of bittensor wallet {name!r} in {where}: {exc}; "
            f"create it with `btcli wallet create -w {name} -H {hotkey}` or set "
            "chain.wallet_name / chain.wallet_hotkey / chain.wallet_path"
        ) from None
    return wallet


def open_client(bt: ModuleType, network: str, substrate: Any = None) -> Any:
    """A connected blocking ``bt.Subtensor`` for ``network`` (a name or ``ws(s)://`` URL).

    ``substrate`` replaces the RPC backend with any implementation of the SDK's
    ``bittensor.Substrate`` protocol (its documented test seam); ``network`` then only labels.
    """
    try:
        client = bt.Subtensor(network, substrate=substrate)
    except ValueError as exc:  # an unknown network name
        raise ChainError(f"chain.network: {exc}") from None
    try:
        client.connect()
    except (bt.BittensorError, TimeoutError, ConnectionError) as exc:
        raise ChainError(
            f"cannot reach the bittensor network {network!r} at {client.endpoint}: {exc}; "
            "check chain.network and that the node is running"
        ) from None
    return client


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
        # Transport failures that are not BittensorErrors (a read timing out mid-session).
        self._failures = (self._bt.BittensorError, TimeoutError, ConnectionError)
        try:
            # The public view reads the hotkey's public file and never unlocks a key.
            self._hotkey = str(self._bt.public_view(wallet, "hotkey").ss58_address)
        except (OSError, ValueError) as exc:
            raise ChainError(f"cannot read the wallet's hotkey: {exc}") from None

    @classmethod
    def connect(
        cls,
        netuid: int,
        *,
        network: str = "finney",
        wallet_name: str = "default",
        wallet_hotkey: str = "default",
        wallet_path: str | None = None,
        substrate: Any = None,
        wait_for_finalization: bool = False,
    ) -> BittensorChain:
        """Load the wallet, connect to ``network`` and check the hotkey is registered.

        Every step that can fail on the user's setup (no such wallet or hotkey, node not
        reachable, subnet missing, hotkey not registered) raises :class:`ChainError` with the
        fix. ``substrate``: see :func:`open_client` (tests).
        """
        bt = load_sdk()
        wallet = open_wallet(bt, wallet_name, wallet_hotkey, wallet_path)
        client = open_client(bt, network, substrate)
        chain = cls(client, wallet, netuid, wait_for_finalization=wait_for_finalization)
        chain.check_registered()
        return chain

    @property
    def netuid(self) -> int:
        return self._netuid

    @property
    def hotkey(self) -> str:
        return self._hotkey

    def close(self) -> None:
        """Close the client's connection (and its background event loop)."""
        self._client.close()

    def check_registered(self) -> None:
        """Raise :class:`ChainError` unless the subnet exists and this hotkey has a uid on it."""
        self._require_subnet()
        uids = self._bt.storage.SubtensorModule.Uids
        if self._read("Uids", self._client.query, uids, [self._netuid, self._hotkey]) is None:
            raise ChainError(
                f"hotkey {self._hotkey} is not registered on netuid {self._netuid}; register "
                f"it first (btcli subnets register --netuid {self._netuid})"
            )

    def _read(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one SDK read, turning its errors into :class:`ChainError` with the reason."""
        try:
            return fn(*args, **kwargs)
        except self._failures as exc:
            raise ChainError(f"{what} on netuid {self._netuid} failed: {exc}") from exc

    def _query(self, what: str, item: Any) -> Any:
        """One per-subnet storage item the typed namespaces do not cover."""
        return self._read(what, self._client.query, item, [self._netuid])

    def _require_subnet(self) -> None:
        # Hyperparameters of a missing subnet read as defaults (zeros), not as an error.
        if not self._query("NetworksAdded", self._bt.storage.SubtensorModule.NetworksAdded):
            raise ChainError(f"subnet {self._netuid} does not exist; check chain.netuid")

    def metagraph(self) -> Metagraph:
        # commitments=False: the commitment maps are two more full-map reads we do not need.
        mg = self._read(
            "metagraph", self._client.subnets.metagraph, self._netuid, commitments=False
        )
        if mg is None:
            raise ChainError(f"subnet {self._netuid} does not exist; check chain.netuid")
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
        self._require_subnet()
        hp = self._client.hyperparameters
        max_limit = self._read("max_weight_limit", hp.max_weight_limit, self._netuid)
        version_key = self._bt.storage.SubtensorModule.WeightsVersionKey
        return WeightLimits(
            # The chain stores the cap as a u16 fraction of the normalized total.
            max_weight_limit=int(max_limit) / U16_MAX,
            min_allowed_weights=int(
                self._read("min_allowed_weights", hp.min_allowed_weights, self._netuid)
            ),
            rate_limit=int(self._read("weights_rate_limit", hp.weights_rate_limit, self._netuid)),
            version_key=int(self._query("WeightsVersionKey", version_key) or 0),
        )

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
            lambda: self._client.submit_call(
                call,
                self._wallet,
                signer="hotkey",
                wait_for_inclusion=True,
                wait_for_finalization=self.wait_for_finalization,
            ),
        )
        if not result.success:
            raise ChainError(f"commitment rejected: {result.message}")

    def set_weights(
        self, uids: Sequence[int], values: Sequence[int], version_key: int = 0
    ) -> SetWeightsResult:
        """Submit u16 ``values``; the SDK rescales them so the largest is 65535.

        Values within ``weight_limits()`` keep their ratios; the SDK clips a vector above
        ``max_weight_limit`` (redistributing the excess) instead of refusing it.

        The SDK refuses a rate-limited or unregistered hotkey, too few non-zero weights or
        duplicate uids before signing; that comes back as a failed result with its message,
        as does a rejection by the transaction pool or the runtime. A transient pool
        rejection is resubmitted up to :data:`SET_WEIGHTS_RETRIES` times. On a commit-reveal
        subnet success means *committed*: ``reveal_round`` says when the chain applies it.
        """

        def submit() -> Any:
            intent = self._bt.SetWeights(
                netuid=self._netuid,
                uids=[int(u) for u in uids],
                weights=[float(v) for v in values],
                version_key=int(version_key),
            )
            return self._client.execute(
                intent,
                self._wallet,
                wait_for_inclusion=True,
                wait_for_finalization=self.wait_for_finalization,
                retries=SET_WEIGHTS_RETRIES,
            )

        result = self._write("set_weights", submit)
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

    def _write(self, what: str, submit: Callable[[], Any]) -> _Outcome:
        """Run one SDK write; a refusal before or after signing becomes a failed outcome."""
        try:
            result = submit()
        except self._failures as exc:
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
    """The chain's reason, or the error's code when the rejection carries no text."""
    text = message or (str(error) if error is not None else "")
    if text:
        return text
    code = getattr(error, "code", None)
    label = getattr(code, "name", None) or "no reason given"
    return f"{what} rejected by the chain without a message ({label})"
