"""What miners and validators share: chain, clock, signing key, own storage, peer directory."""

from __future__ import annotations

import json
import threading
from functools import partial
from pathlib import Path
from typing import Any

from gauntlet import Chain
from netcomm import ModelSpec, Storage, StorageExchange
from subnet.clock import Stopped, WindowClock
from subnet.commitments import (
    IDENTITY_KEY,
    encode_commitment,
    identity_document,
    locator_for,
)
from subnet.config import NodeConfig
from subnet.directory import ChainDirectory
from subnet.protocol import PROOFS
from subnet.state import load_or_create_signer
from subnet.storage import NodeLink, open_own_storage, open_peer_storage, own_prefix
from subnet.task import Task

#: per-node event log in ``state_dir`` (see :meth:`Node.record`).
HISTORY_FILE = "history.jsonl"


class Node:
    """The base of :class:`~subnet.Miner` and :class:`~subnet.Validator`.

    Args:
        cfg: the node configuration.
        task: the model and data of the run.
        chain: this hotkey's chain handle (:func:`subnet.chain.open_chain`).
        s3_options: extra :class:`netcomm.S3Config` fields for S3 clients (timeouts, retries).
    """

    role = "node"

    def __init__(
        self,
        cfg: NodeConfig,
        task: Task,
        chain: Chain,
        *,
        s3_options: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.chain = chain
        self.hotkey = chain.hotkey
        self.signer = load_or_create_signer(cfg.state_dir)
        self.link = NodeLink(cfg.exchange.link)
        self.storage: Storage = open_own_storage(cfg.storage, self.hotkey, s3_options, self.link)
        self.directory = ChainDirectory(
            chain,
            partial(
                open_peer_storage,
                local_root=cfg.storage.root,
                s3_options=s3_options,
                link=self.link,
            ),
        )
        self.clock = WindowClock(chain, cfg.window)
        self.history: list[dict[str, Any]] = []
        self.history_path = Path(cfg.state_dir) / HISTORY_FILE

    @property
    def stop(self) -> threading.Event:
        """Set this event to make :meth:`run` return at the next wait."""
        return self.clock.stop

    def announce(self) -> str:
        """Write ``identity.json`` to the own storage and commit the locator (if it changed)."""
        self.storage.put(IDENTITY_KEY, identity_document(self.hotkey, self.signer.public_key))
        prefix = own_prefix(self.cfg.storage, self.hotkey)
        loc = locator_for(self.cfg.storage, self.role, prefix, self.signer.public_key)
        text = encode_commitment(loc)
        if self.chain.get_commitment(self.hotkey) != text:
            self.chain.commit(text)
        return text

    def _channel(self, prefix: str, spec: ModelSpec) -> StorageExchange:
        """This node's exchange on one channel (``UPDATES`` or ``PROOFS``) of the run's layout;
        subclasses set ``self.protocol`` first."""
        return StorageExchange(
            self.hotkey,
            self.storage,
            self.directory.channel(prefix),
            self.signer,
            spec,
            self.protocol.exchange_config(self.cfg.exchange, proofs=prefix == PROOFS),  # type: ignore[attr-defined]
            prefix=prefix,
        )

    def record(self, entry: dict[str, Any]) -> None:
        """Log one event: window records go to :attr:`history`, every event is appended to
        ``state_dir/history.jsonl`` (one JSON object per line) for whoever watches the node."""
        if "window" in entry:
            self.history.append(entry)
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        with self.history_path.open("a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopped
