"""Adapter from the :class:`~gauntlet.chain.Chain` protocol to the ``bittensor`` SDK (v9/v10).

``bittensor`` is an optional extra (``pip install 'sparseloco[bittensor]'``) and is imported
only by :meth:`BittensorChain.connect`; importing this module needs nothing. The adapter
only calls SDK methods present in both v9 and v10:

* ``subtensor.metagraph(netuid)`` → ``.uids``, ``.hotkeys``, ``.S`` (stake),
  ``.validator_permit``, ``.block``;
* ``subtensor.get_current_block()``, ``subtensor.get_subnet_hyperparameters(netuid)``;
* ``subtensor.get_commitment(netuid, uid)``, ``subtensor.get_all_commitments(netuid)``;
* ``subtensor.set_commitment(wallet, netuid, data)`` (v10; v9's ``commit`` otherwise);
* ``subtensor.set_weights(wallet=, netuid=, uids=, weights=, version_key=, ...)``.

Write calls return ``(ok, message)`` in v9 and a response object with ``.success`` and
``.message`` in v10; :func:`interpret_response` reads both, and a failure is never ignored.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from gauntlet.chain import MAX_COMMITMENT_BYTES, Metagraph, SetWeightsResult, WeightLimits
from gauntlet.errors import ChainError
from gauntlet.weights import U16_MAX


def interpret_response(response: Any) -> SetWeightsResult:
    """A v10 response (``.success``/``.message``), a v9 ``(ok, msg)`` tuple or a bool."""
    if hasattr(response, "success"):
        return SetWeightsResult(bool(response.success), str(getattr(response, "message", "")))
    if isinstance(response, tuple) and response and isinstance(response[0], bool):
        return SetWeightsResult(response[0], str(response[1]) if len(response) > 1 else "")
    if isinstance(response, bool):
        return SetWeightsResult(response, "")
    if response is None:
        # v9's commit returns None on success and raises on failure
        return SetWeightsResult(True, "")
    raise ChainError(f"unrecognised SDK response {response!r}")


def _as_list(values: Any) -> list[Any]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


class BittensorChain:
    """The :class:`~gauntlet.chain.Chain` protocol over a ``bittensor`` ``Subtensor``.

    Args:
        subtensor: a ``bittensor.Subtensor`` (or any object with the same methods).
        wallet: a ``bittensor.Wallet`` whose hotkey signs commitments and weights.
        netuid: the subnet.
        wait_for_inclusion / wait_for_finalization: passed to ``set_weights``.
    """

    def __init__(
        self,
        subtensor: Any,
        wallet: Any,
        netuid: int,
        *,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = False,
    ) -> None:
        self._subtensor = subtensor
        self._wallet = wallet
        self._netuid = int(netuid)
        self.wait_for_inclusion = wait_for_inclusion
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
        """Import ``bittensor`` and open a ``Subtensor`` and ``Wallet``."""
        try:
            bt = importlib.import_module("bittensor")
        except ImportError as exc:
            raise ChainError(
                f"bittensor is not installed ({exc}); install it with "
                "pip install 'sparseloco[bittensor]'"
            ) from None
        subtensor = bt.Subtensor(network=network)
        wallet = bt.Wallet(name=wallet_name, hotkey=wallet_hotkey)
        return cls(subtensor, wallet, netuid, **kwargs)

    @property
    def netuid(self) -> int:
        return self._netuid

    @property
    def hotkey(self) -> str:
        return str(self._wallet.hotkey.ss58_address)

    def metagraph(self) -> Metagraph:
        mg = self._subtensor.metagraph(self._netuid)
        stakes = getattr(mg, "S", None)
        if stakes is None:
            stakes = mg.stake
        uids = [int(u) for u in _as_list(mg.uids)]
        permit = getattr(mg, "validator_permit", None)
        return Metagraph(
            netuid=self._netuid,
            block=int(np.asarray(mg.block).reshape(-1)[0]),
            uids=uids,
            hotkeys=[str(h) for h in mg.hotkeys],
            stakes=[float(s) for s in _as_list(stakes)],
            validator_permit=[bool(p) for p in _as_list(permit)] if permit is not None else [],
        )

    def block(self) -> int:
        return int(self._subtensor.get_current_block())

    def weight_limits(self) -> WeightLimits:
        hp = self._subtensor.get_subnet_hyperparameters(self._netuid)
        if hp is None:
            raise ChainError(f"subnet {self._netuid} has no hyperparameters (does it exist?)")
        raw = getattr(hp, "max_weights_limit", None)
        if raw is None:
            raw = getattr(hp, "max_weight_limit", U16_MAX)
        limit = float(raw) / U16_MAX if float(raw) > 1.0 else float(raw)
        return WeightLimits(
            max_weight_limit=limit,
            min_allowed_weights=int(getattr(hp, "min_allowed_weights", 0)),
            rate_limit=int(getattr(hp, "weights_rate_limit", 0)),
            version_key=int(getattr(hp, "weights_version", 0)),
        )

    def get_commitment(self, hotkey: str) -> str | None:
        uid = self.metagraph().uid_of(hotkey)
        if uid is None:
            return None
        data = self._subtensor.get_commitment(self._netuid, uid)
        return str(data) if data else None

    def get_all_commitments(self) -> dict[str, str]:
        data = self._subtensor.get_all_commitments(self._netuid) or {}
        return {str(k): str(v) for k, v in sorted(data.items())}

    def commit(self, data: str) -> None:
        size = len(data.encode("utf-8"))
        if size > MAX_COMMITMENT_BYTES:
            raise ChainError(
                f"commitment is {size} bytes; the chain takes at most {MAX_COMMITMENT_BYTES}"
            )
        if hasattr(self._subtensor, "set_commitment"):
            response = self._subtensor.set_commitment(
                wallet=self._wallet, netuid=self._netuid, data=data
            )
        else:
            response = self._subtensor.commit(self._wallet, self._netuid, data)
        result = interpret_response(response)
        if not result.success:
            raise ChainError(f"commitment rejected: {result.message}")

    def set_weights(
        self, uids: Sequence[int], values: Sequence[int], version_key: int = 0
    ) -> SetWeightsResult:
        """Submit u16 ``values``; the SDK rescales them to max 65535, which keeps ratios."""
        response = self._subtensor.set_weights(
            wallet=self._wallet,
            netuid=self._netuid,
            uids=[int(u) for u in uids],
            weights=[float(v) for v in values],
            version_key=int(version_key),
            wait_for_inclusion=self.wait_for_inclusion,
            wait_for_finalization=self.wait_for_finalization,
        )
        return interpret_response(response)
