"""A :class:`netcomm.PeerDirectory` built from chain commitments.

:meth:`ChainDirectory.refresh` reads every registered hotkey's commitment, decodes it,
opens read access to the node's storage and checks its ``identity.json`` (public key hash
and hotkey). Unchanged commitments are not read again. Malformed commitments and unreadable
identities leave that hotkey out and are listed in :attr:`ChainDirectory.problems` (a bad
commitment can never stop a node). :meth:`ChainDirectory.channel` gives the per-channel
directory a :class:`netcomm.StorageExchange` needs (updates, proofs).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from gauntlet import Chain
from netcomm import NetcommError, PeerRecord, Storage
from subnet.commitments import (
    IDENTITY_KEY,
    CommitmentError,
    Locator,
    decode_commitment,
    verify_identity,
)


@dataclass(frozen=True)
class PeerEntry:
    """One committed node: its locator, read storage and verified public key."""

    hotkey: str
    commitment: str
    locator: Locator
    storage: Storage
    public_key: bytes
    stake: float


class ChainDirectory:
    """Peers discovered from commitments on ``chain``.

    Args:
        chain: the chain to read commitments and the metagraph from.
        open_storage: builds read access from a locator
            (:func:`subnet.storage.open_peer_storage` with this node's settings).
    """

    def __init__(self, chain: Chain, open_storage: Callable[[Locator], Storage]) -> None:
        self.chain = chain
        self.open_storage = open_storage
        self.problems: dict[str, str] = {}
        self._entries: dict[str, PeerEntry] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Re-read commitments; only registered hotkeys with a valid commitment stay."""
        metagraph = self.chain.metagraph()
        stakes = dict(zip(metagraph.hotkeys, metagraph.stakes, strict=True))
        commitments = self.chain.get_all_commitments()
        entries: dict[str, PeerEntry] = {}
        problems: dict[str, str] = {}
        for hotkey, text in sorted(commitments.items()):
            if hotkey not in stakes:
                continue
            old = self._entries.get(hotkey)
            if old is not None and old.commitment == text:
                entries[hotkey] = PeerEntry(
                    hotkey, text, old.locator, old.storage, old.public_key, stakes[hotkey]
                )
                continue
            try:
                entries[hotkey] = self._load(hotkey, text, stakes[hotkey])
            except (CommitmentError, NetcommError) as exc:
                problems[hotkey] = str(exc)
        with self._lock:
            self._entries = entries
            self.problems = problems

    def _load(self, hotkey: str, text: str, stake: float) -> PeerEntry:
        loc = decode_commitment(text)
        storage = self.open_storage(loc)
        public_key = verify_identity(storage.get(IDENTITY_KEY), hotkey, loc.key_digest)
        return PeerEntry(hotkey, text, loc, storage, public_key, stake)

    def entry(self, hotkey: str) -> PeerEntry | None:
        """The verified entry of ``hotkey`` as of the last refresh."""
        with self._lock:
            return self._entries.get(hotkey)

    def hotkeys(self, role: str) -> list[str]:
        """Committed hotkeys of ``role`` (``"miner"``/``"validator"``), sorted."""
        with self._lock:
            return sorted(h for h, e in self._entries.items() if e.locator.role == role)

    def top_validator(self) -> str | None:
        """The committed validator with the most stake (ties: the smaller hotkey)."""
        with self._lock:
            validators = [e for e in self._entries.values() if e.locator.role == "validator"]
        if not validators:
            return None
        return min(validators, key=lambda e: (-e.stake, e.hotkey)).hotkey

    def channel(self, prefix: str = "") -> ChannelDirectory:
        """The miners' records for one exchange channel (objects under ``prefix``)."""
        return ChannelDirectory(self, prefix)


class ChannelDirectory:
    """A :class:`netcomm.PeerDirectory` over the miners of a :class:`ChainDirectory`."""

    def __init__(self, parent: ChainDirectory, prefix: str) -> None:
        self.parent = parent
        self.prefix = prefix

    def peers(self) -> list[str]:
        return self.parent.hotkeys("miner")

    def lookup(self, peer_id: str) -> PeerRecord | None:
        entry = self.parent.entry(peer_id)
        if entry is None or entry.locator.role != "miner":
            return None
        return PeerRecord(peer_id, entry.storage, entry.public_key, prefix=self.prefix)
