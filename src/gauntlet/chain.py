"""The chain interface the validator needs, and an in-memory chain (default and test double).

:class:`Chain` is what one neuron (one hotkey) sees: a metagraph snapshot, the current
block, a produced block's hash, the weight limits, commitments (read anyone's, write its
own) and ``set_weights``. A block's hash is the public randomness every validator agrees on
and nobody knows before that block exists (the validator's evaluation seed).
:class:`InMemorySubnet` holds a whole subnet's state (registrations, stakes, commitments,
weights, blocks) and enforces the rules the real chain checks on ``set_weights``:
registration, version key, rate limit, unique registered uids, ``min_allowed_weights`` and
``max_weight_limit`` on the normalized u16 values; commitments are limited to 128 bytes.
:meth:`InMemorySubnet.connect` gives one hotkey's :class:`InMemoryChain`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from gauntlet.errors import ChainError
from gauntlet.weights import U16_MAX

MAX_COMMITMENT_BYTES = 128


@dataclass(frozen=True)
class Metagraph:
    """A snapshot of a subnet: parallel lists indexed by position, uids ascending."""

    netuid: int
    block: int
    uids: list[int]
    hotkeys: list[str]
    stakes: list[float]
    validator_permit: list[bool] = field(default_factory=list)

    def uid_of(self, hotkey: str) -> int | None:
        """The uid registered to ``hotkey``, or None."""
        for uid, hk in zip(self.uids, self.hotkeys, strict=True):
            if hk == hotkey:
                return uid
        return None

    def hotkey_to_uid(self) -> dict[str, int]:
        return dict(zip(self.hotkeys, self.uids, strict=True))


@dataclass(frozen=True)
class WeightLimits:
    """The chain's rules for a weight vector.

    Attributes:
        max_weight_limit: cap on one normalized weight, as a fraction in (0, 1].
        min_allowed_weights: minimum number of non-zero weights.
        rate_limit: blocks between two ``set_weights`` of one hotkey.
        version_key: the lowest version key the subnet accepts.
    """

    max_weight_limit: float = 1.0
    min_allowed_weights: int = 0
    rate_limit: int = 0
    version_key: int = 0


@dataclass(frozen=True)
class SetWeightsResult:
    """Whether the chain accepted the weights, and its message.

    ``reveal_round`` is set on commit-reveal subnets: the weights were committed (encrypted)
    and the chain applies them only at that drand round, so success is not yet "applied".
    """

    success: bool
    message: str = ""
    reveal_round: int | None = None


@runtime_checkable
class Chain(Protocol):
    """One neuron's view of the chain."""

    @property
    def netuid(self) -> int: ...

    @property
    def hotkey(self) -> str:
        """The hotkey this handle writes as."""
        ...

    def metagraph(self) -> Metagraph: ...

    def block(self) -> int: ...

    def block_hash(self, block: int) -> str:
        """The hash of ``block`` as a hex string; raises :class:`ChainError` when that block
        has not been produced yet (or is negative)."""
        ...

    def weight_limits(self) -> WeightLimits: ...

    def get_commitment(self, hotkey: str) -> str | None:
        """The latest commitment of ``hotkey`` on this subnet, or None."""
        ...

    def get_all_commitments(self) -> dict[str, str]: ...

    def commit(self, data: str) -> None:
        """Publish this hotkey's commitment; raises :class:`ChainError` if rejected."""
        ...

    def set_weights(
        self, uids: Sequence[int], values: Sequence[int], version_key: int = 0
    ) -> SetWeightsResult: ...


class InMemorySubnet:
    """A subnet held in memory: the shared state behind :class:`InMemoryChain` handles.

    Block hashes are random 32 bytes (``secrets``), drawn the first time a produced block's
    hash is read and kept, so every handle reads the same value and none exists earlier.

    Args:
        netuid: the subnet id.
        limits: the weight rules it enforces.
        block: the starting block.
    """

    def __init__(self, netuid: int = 1, limits: WeightLimits | None = None, block: int = 0):
        self.netuid = netuid
        self.limits = limits or WeightLimits()
        self.block = block
        self.hotkeys: list[str] = []
        self.stakes: dict[str, float] = {}
        self.commitments: dict[str, tuple[int, str]] = {}
        self.weights: dict[str, tuple[int, dict[int, int]]] = {}
        self.hashes: dict[int, str] = {}

    def register(self, hotkey: str, stake: float = 0.0) -> int:
        """Register ``hotkey`` (idempotent) and set its stake; returns its uid."""
        if hotkey not in self.hotkeys:
            self.hotkeys.append(hotkey)
        self.stakes[hotkey] = float(stake)
        return self.hotkeys.index(hotkey)

    def advance(self, blocks: int = 1) -> int:
        self.block += int(blocks)
        return self.block

    def connect(self, hotkey: str) -> InMemoryChain:
        return InMemoryChain(self, hotkey)

    def block_hash(self, block: int) -> str:
        """``0x`` + 64 hex digits of ``block``'s hash (see the class docstring)."""
        check_block_produced(block, self.block)
        return self.hashes.setdefault(int(block), "0x" + secrets.token_hex(32))

    def metagraph(self) -> Metagraph:
        return Metagraph(
            netuid=self.netuid,
            block=self.block,
            uids=list(range(len(self.hotkeys))),
            hotkeys=list(self.hotkeys),
            stakes=[self.stakes[h] for h in self.hotkeys],
            validator_permit=[self.stakes[h] > 0 for h in self.hotkeys],
        )

    def weight_matrix(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(validator hotkeys, stakes, row-normalized weights validators × uids)."""
        rows = {hk: self.weights[hk][1] for hk in self.hotkeys if hk in self.weights}
        return weight_matrix_of(rows, self.stakes, len(self.hotkeys))

    def _set_weights(
        self, hotkey: str, uids: Sequence[int], values: Sequence[int], version_key: int
    ) -> SetWeightsResult:
        last = self.weights.get(hotkey)
        result, nonzero = check_set_weights(
            self.limits,
            stake=self.stakes.get(hotkey) if hotkey in self.hotkeys else None,
            hotkey=hotkey,
            n_uids=len(self.hotkeys),
            block=self.block,
            last_set=None if last is None else last[0],
            uids=uids,
            values=values,
            version_key=version_key,
        )
        if result.success:
            self.weights[hotkey] = (self.block, nonzero)
        return result


def check_set_weights(
    limits: WeightLimits,
    *,
    hotkey: str,
    stake: float | None,
    n_uids: int,
    block: int,
    last_set: int | None,
    uids: Sequence[int],
    values: Sequence[int],
    version_key: int,
) -> tuple[SetWeightsResult, dict[int, int]]:
    """Apply the chain's ``set_weights`` rules; every chain backend shares them.

    Args:
        stake: the hotkey's stake, or ``None`` when it is not registered.
        n_uids: registered uids (they are ``0 .. n_uids - 1``).
        last_set: the block of the hotkey's previous accepted ``set_weights``, if any.

    Returns:
        The verdict and, when accepted, the non-zero ``{uid: value}`` to store.
    """

    def reject(message: str) -> tuple[SetWeightsResult, dict[int, int]]:
        return SetWeightsResult(False, message), {}

    if stake is None:
        return reject(f"hotkey {hotkey} is not registered")
    if stake <= 0:
        return reject("no validator permit (zero stake)")
    if version_key < limits.version_key:
        return reject(f"version_key {version_key} < {limits.version_key}")
    if last_set is not None and block - last_set < limits.rate_limit:
        return reject(f"rate limit: {limits.rate_limit} blocks between sets")
    if len(uids) != len(values):
        return reject("uids and values differ in length")
    if len(set(uids)) != len(uids) or any(not 0 <= u < n_uids for u in uids):
        return reject("uids must be unique registered uids")
    if any(not 0 <= int(v) <= U16_MAX for v in values):
        return reject("values must be u16")
    nonzero = {int(u): int(v) for u, v in zip(uids, values, strict=True) if v}
    if len(nonzero) < min(limits.min_allowed_weights, n_uids):
        return reject(f"{len(nonzero)} weights < min_allowed_weights {limits.min_allowed_weights}")
    total = sum(nonzero.values())
    if len(nonzero) > 1 and total:
        top = max(v * U16_MAX // total for v in nonzero.values())
        if top > int(limits.max_weight_limit * U16_MAX):
            return reject("max_weight_limit exceeded")
    return SetWeightsResult(True, "ok"), nonzero


def check_block_produced(block: int, current: int) -> None:
    """Raise :class:`ChainError` unless ``0 <= block <= current`` (every backend)."""
    if not 0 <= block <= current:
        raise ChainError(
            f"block {block} has not been produced (the chain is at block {current}); its "
            "hash does not exist yet"
        )


def check_commitment(hotkey: str, registered: bool, netuid: int, data: str) -> None:
    """Raise :class:`ChainError` unless ``hotkey`` may commit ``data`` (every backend)."""
    if not registered:
        raise ChainError(f"hotkey {hotkey} is not registered on netuid {netuid}")
    size = len(data.encode("utf-8"))
    if size > MAX_COMMITMENT_BYTES:
        raise ChainError(
            f"commitment is {size} bytes; the chain takes at most {MAX_COMMITMENT_BYTES}"
        )


def weight_matrix_of(
    rows: dict[str, dict[int, int]], stakes: dict[str, float], n_uids: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(validator hotkeys, stakes, row-normalized weights) from each validator's ``{uid: u16}``.

    ``rows`` is in uid order of the validators, which is the row order of the matrix.
    """
    validators = list(rows)
    mat = np.zeros((len(validators), n_uids), dtype=np.float64)
    for row, hk in enumerate(validators):
        for uid, value in rows[hk].items():
            mat[row, uid] = value
        total = mat[row].sum()
        if total > 0:
            mat[row] /= total
    return validators, np.array([stakes[h] for h in validators]), mat


class InMemoryChain:
    """One hotkey's :class:`Chain` handle on an :class:`InMemorySubnet`."""

    def __init__(self, subnet: InMemorySubnet, hotkey: str) -> None:
        self._subnet = subnet
        self._hotkey = hotkey

    @property
    def netuid(self) -> int:
        return self._subnet.netuid

    @property
    def hotkey(self) -> str:
        return self._hotkey

    def metagraph(self) -> Metagraph:
        return self._subnet.metagraph()

    def block(self) -> int:
        return self._subnet.block

    def block_hash(self, block: int) -> str:
        return self._subnet.block_hash(block)

    def weight_limits(self) -> WeightLimits:
        return self._subnet.limits

    def get_commitment(self, hotkey: str) -> str | None:
        entry = self._subnet.commitments.get(hotkey)
        return None if entry is None else entry[1]

    def get_all_commitments(self) -> dict[str, str]:
        return {hk: data for hk, (_, data) in sorted(self._subnet.commitments.items())}

    def commit(self, data: str) -> None:
        check_commitment(self._hotkey, self._hotkey in self._subnet.hotkeys, self.netuid, data)
        self._subnet.commitments[self._hotkey] = (self._subnet.block, data)

    def set_weights(
        self, uids: Sequence[int], values: Sequence[int], version_key: int = 0
    ) -> SetWeightsResult:
        return self._subnet._set_weights(self._hotkey, list(uids), list(values), version_key)
