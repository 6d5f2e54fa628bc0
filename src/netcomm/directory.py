"""Where each peer's updates live and which key signs them.

A :class:`PeerDirectory` maps peer ids to :class:`PeerRecord` entries. :class:`StaticDirectory`
is an in-memory map (tests, clusters with a config file). A chain-backed directory (peers
publish their bucket and read credentials as a Bittensor commitment, looked up with
``chain.get_commitment(hotkey)``) implements the same two methods and builds each record's
:class:`~netcomm.storage.Storage` from the commitment.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from netcomm.errors import NetcommConfigError
from netcomm.signing import ED25519
from netcomm.storage import Storage, join_key, validate_key


@dataclass(frozen=True)
class PeerRecord:
    """One peer's entry.

    Attributes:
        peer_id: the peer's id (a key segment: letters, digits, ``.``, ``_``, ``-``).
        storage: the storage its updates are read from (read access is enough).
        public_key: the raw public key its envelopes must verify against.
        scheme: the signature scheme of ``public_key``.
        prefix: key prefix of its objects inside ``storage`` (``""`` for a bucket of its own).
    """

    peer_id: str
    storage: Storage = field(repr=False)
    public_key: bytes = field(repr=False)
    scheme: str = ED25519
    prefix: str = ""

    def __post_init__(self) -> None:
        check_peer_id(self.peer_id)
        if self.prefix:
            validate_key(self.prefix)


@runtime_checkable
class PeerDirectory(Protocol):
    """The set of known peers and their records."""

    def peers(self) -> list[str]:
        """Every known peer id, sorted."""
        ...

    def lookup(self, peer_id: str) -> PeerRecord | None:
        """The record of ``peer_id``, or ``None`` if unknown."""
        ...


class StaticDirectory:
    """A directory held in memory; thread-safe for reads while nobody adds or removes."""

    def __init__(self, records: Iterable[PeerRecord] = ()) -> None:
        self._records: dict[str, PeerRecord] = {}
        for record in records:
            self.add(record)

    def add(self, record: PeerRecord) -> None:
        """Add or replace a peer's record."""
        self._records[record.peer_id] = record

    def remove(self, peer_id: str) -> None:
        self._records.pop(peer_id, None)

    def peers(self) -> list[str]:
        return sorted(self._records)

    def lookup(self, peer_id: str) -> PeerRecord | None:
        return self._records.get(peer_id)


def check_peer_id(peer_id: str) -> None:
    """A peer id is one key segment; raise :class:`NetcommConfigError` or the key error if not."""
    if "/" in peer_id:
        raise NetcommConfigError(f"peer id {peer_id!r} must not contain '/'")
    validate_key(peer_id)


def update_key(prefix: str, window: int, peer_id: str) -> str:
    """The key of ``peer_id``'s update for ``window``.

    It is ``{prefix}/updates/{window:012d}/{peer_id}.nce``; zero-padded windows keep a listing
    in window order.
    """
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be a non-negative integer, got {window!r}")
    return validate_key(join_key(prefix, "updates", f"{window:012d}", f"{peer_id}.nce"))
