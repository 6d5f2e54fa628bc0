"""A miner: trains on its assigned data each window and exchanges SparseLoCo updates.

One window ``w`` (:meth:`Miner.run_window`):

1. refresh the peer directory from chain commitments;
2. publish the proof (proof-of-data digest of its assignment and the model's values at the
   window's sync positions), then run H AdamW steps on the assignment;
3. one SparseLoCo round: publish the compressed update, gather the aggregation set (the set
   the followed validator accepted for ``w``, or every valid update with
   ``aggregate = "all"``), aggregate and step;
4. checkpoint model, AdamW and SparseLoCo state (step ``w + 1``) to ``state_dir``.

:meth:`Miner.run` follows the chain's clock. A miner that falls behind, or restarts after
missing windows, does not train the windows it missed: it *replays* them (applies the
aggregate of each missed window's accepted updates, which are still in the peers' buckets),
so its parameters stay equal to every other miner's, then trains the current window.
A miner with no checkpoint of its own starts from the followed validator's latest model
checkpoint when there is one, else from the run's initial weights.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from gauntlet import Chain
from netcomm import (
    Checkpoint,
    CheckpointStore,
    LocalStorage,
    ModelSpec,
    NetcommError,
    StorageExchange,
    window_updates,
)
from sparseloco.exchange import GatherResult
from sparseloco.optim import RoundReport, SparseLoCo
from sparseloco.payload import Payload
from subnet.base import Node
from subnet.clock import Stopped
from subnet.config import NodeConfig
from subnet.protocol import (
    PROOFS,
    UPDATES,
    Protocol,
    Selection,
    read_selection,
    state_digest,
)
from subnet.state import prune_checkpoints
from subnet.task import Task

log = logging.getLogger("subnet.miner")

#: a window whose aggregation set has not come when window + SKIPPED_AFTER starts was skipped
#: by the validator (it scores w during w + 1, with up to one more window of grace).
SKIPPED_AFTER = 3


class SelectedExchange:
    """The miner's update exchange: gathers only the window's aggregation set."""

    def __init__(self, miner: Miner, inner: StorageExchange) -> None:
        self.miner = miner
        self.inner = inner

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    def publish(self, window: int, payload: Payload) -> int:
        return self.inner.publish(window, payload)

    def gather(self, window: int) -> GatherResult:
        chosen = self.miner.aggregation_set(window, wait=True)
        if chosen is None:
            return self.inner.gather(window)
        others = [p for p in chosen if p != self.peer_id]
        result = self.inner.gather(window, peers=others) if others else GatherResult(window)
        result.self_selected = self.peer_id in chosen
        return result


class Miner(Node):
    """A SparseLoCo miner on any :class:`~subnet.task.Task`.

    Args:
        cfg: the node configuration (``role = "miner"``).
        task: the model and data of the run.
        chain: this hotkey's chain handle (:func:`subnet.chain.open_chain`).
        s3_options: extra :class:`netcomm.S3Config` fields for S3 clients (timeouts, retries).
    """

    role = "miner"

    def __init__(
        self,
        cfg: NodeConfig,
        task: Task,
        chain: Chain,
        *,
        s3_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(cfg, task, chain, s3_options=s3_options)
        self.protocol = Protocol(cfg.run, task)
        self.checkpoints = CheckpointStore(LocalStorage(Path(cfg.state_dir)), "checkpoints")
        self.model = task.make_model()
        spec = ModelSpec.from_named_tensors(dict(self.model.named_parameters()))
        self.exchange = self._channel(UPDATES, spec)
        self.proofs = self._channel(PROOFS, self.protocol.proof_spec)
        self.next_window = self._load_weights()
        self.inner = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.run.inner_lr, weight_decay=0.1
        )
        self.selections: dict[int, Selection] = {}
        self.outer = self._outer_optimizer()
        self._load_optimizers()

    # --- state -----------------------------------------------------------------------------

    def _load_weights(self) -> int | None:
        """Model weights from the own checkpoint, else the validator's; the next window."""
        if self.checkpoints.latest_step() is not None:
            ck = self.checkpoints.load()
            self.model.load_state_dict(ck.model)
            self._resume = ck
            return ck.step
        self._resume = None
        self.directory.refresh()
        validator = self._validator()
        if validator is None:
            return None
        store = CheckpointStore(self.directory.entry(validator).storage, "checkpoints")
        if store.latest_step() is None:
            return None
        ck = store.load()
        self.model.load_state_dict(ck.model)
        log.info("%s: joined from %s's checkpoint of window %d", self.hotkey, validator, ck.step)
        return ck.step

    def _load_optimizers(self) -> None:
        ck = self._resume
        if ck is None:
            return
        assert ck.optimizer is not None
        self.inner.load_state_dict(ck.optimizer["inner"])
        self.outer.load_state_dict(ck.optimizer["outer"])
        self._resume = None
        log.info("%s: resumed from its checkpoint at window %d", self.hotkey, ck.step)

    def save(self, next_window: int) -> None:
        """Checkpoint model, AdamW and SparseLoCo state as step ``next_window``."""
        self.checkpoints.save(
            next_window,
            self.model.state_dict(),
            optimizer={"inner": self.inner.state_dict(), "outer": self.outer.state_dict()},
            meta={"hotkey": self.hotkey, "time": time.time()},
        )
        prune_checkpoints(self.checkpoints, self.cfg.miner.keep_checkpoints)
        self.next_window = next_window

    # --- aggregation set ---------------------------------------------------------------------

    def _validator(self) -> str | None:
        if self.cfg.miner.validator:
            entry = self.directory.entry(self.cfg.miner.validator)
            return self.cfg.miner.validator if entry is not None else None
        return self.directory.top_validator()

    def aggregation_set(self, window: int, *, wait: bool) -> list[str] | None:
        """Hotkeys whose updates are aggregated in ``window``; ``None`` = every valid one.

        With ``aggregate = "validator"`` this is the followed validator's published set,
        waited for up to ``exchange.selection_timeout_s`` when ``wait``; an empty list when
        it does not come (the miner then keeps its parameters and re-syncs afterwards, see
        :meth:`check_sync`).
        """
        if self.cfg.miner.aggregate == "all":
            return None
        if wait:  # the validator scores a window only once it has closed
            self.clock.wait_for(window + 1)
        deadline = time.monotonic() + (self.cfg.exchange.selection_timeout_s if wait else 0)
        while True:
            validator = self._validator()
            if validator is not None:
                chosen = read_selection(self.directory.entry(validator).storage, window)
                if chosen is not None:
                    self.selections[window] = chosen
                    if any(self.directory.entry(p) is None for p in chosen.peers):
                        self.directory.refresh()  # a miner that committed after our refresh
                    return chosen.peers
            # Two windows on, a validator that has not published the set skipped the window.
            if time.monotonic() >= deadline or self.clock.window() >= window + SKIPPED_AFTER:
                log.warning("%s: no aggregation set for window %d", self.hotkey, window)
                return []
            self._wait(self.cfg.exchange.poll_interval_s)
            if validator is None:
                self.directory.refresh()

    # --- staying in sync ---------------------------------------------------------------------

    def check_sync(self, window: int, aggregated: list[str]) -> tuple[str | None, int]:
        """After ``window``'s outer step: ``(None, window + 1)`` when this miner stepped on
        the validator's set and holds the validator's model; otherwise why not and the
        window it continues from after re-syncing (logged).

        Out of sync means: no aggregation set arrived, an update of the set could not be
        used, or the model's :func:`~subnet.protocol.state_digest` differs from the one the
        validator published with the set. The miner then loads the validator's latest model
        checkpoint (step ``window + 1`` or later) instead of training on a different model.
        """
        if self.cfg.miner.aggregate == "all":
            return None, window + 1
        chosen = self.selections.pop(window, None)
        if chosen is None:
            problem = "no aggregation set arrived"
        elif missing := sorted(set(chosen.peers) - set(aggregated)):
            problem = f"could not use the update(s) of {', '.join(missing)}"
        elif state_digest(self.model) != chosen.state:
            problem = "its model differs from the validator's"
        else:
            return None, window + 1
        step = self._resync(window + 1)
        if step is None:
            log.warning(
                "%s: out of sync after window %d (%s); re-sync FAILED", self.hotkey, window, problem
            )
            return f"{problem}; re-sync failed", window + 1
        log.warning(
            "%s: out of sync after window %d (%s); re-synced from the validator's checkpoint "
            "of window %d",
            self.hotkey,
            window,
            problem,
            step,
        )
        return problem, step

    def _resync(self, step: int) -> int | None:
        """Load the followed validator's latest model checkpoint once it is at ``step`` or
        later, restart the outer optimizer from it and return its step; ``None`` when none
        came."""
        loaded = self.validator_checkpoint(step, latest=True)
        if loaded is None:
            return None
        # θ₀ = the loaded θ; the error buffer starts over (the presets have no outer
        # momentum, so nothing else differs from the other miners).
        self.model.load_state_dict(loaded.model)
        self.outer = self._outer_optimizer()
        return loaded.step

    def validator_checkpoint(self, step: int, *, latest: bool) -> Checkpoint | None:
        """The followed validator's model checkpoint ``step`` (or, with ``latest``, its newest
        once that is at least ``step``), waited for up to ``exchange.selection_timeout_s``
        while unpublished, pruned or half-written; ``None`` when it does not come."""
        deadline = time.monotonic() + self.cfg.exchange.selection_timeout_s
        while time.monotonic() < deadline:
            validator = self._validator()
            if validator is not None:
                store = CheckpointStore(self.directory.entry(validator).storage, "checkpoints")
                try:
                    newest = store.latest_step()
                    if newest is not None and newest >= step:
                        return store.load(newest if latest else step)
                except NetcommError as exc:  # pruned or half-written: look again
                    log.info("%s: validator checkpoint not readable yet: %s", self.hotkey, exc)
            self._wait(self.cfg.exchange.poll_interval_s)
            self.directory.refresh()
        return None

    def _outer_optimizer(self) -> SparseLoCo:
        return SparseLoCo(
            self.model.named_parameters(),
            SelectedExchange(self, self.exchange),
            self.protocol.outer,
        )

    # --- windows ------------------------------------------------------------------------------

    def run_window(self, window: int) -> RoundReport:
        """Train, publish and step for ``window`` (see the module docstring)."""
        started = time.monotonic()
        self.directory.refresh()
        ids = self.protocol.assignment(self.hotkey, window)
        digest = self.protocol.digest(self.hotkey, window, ids)
        self.proofs.publish(window, self.protocol.proof(self.model, window, digest))
        self.model.train()
        losses = []
        for batch in self.protocol.batches(ids):
            loss = self.task.loss_fn(self.model, batch)
            loss.backward()
            self.inner.step()
            self.inner.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        self.outer.window = window
        report = self.outer.step()
        out_of_sync, next_window = self.check_sync(window, report.peers)
        self.save(next_window)
        record = {
            "window": window,
            "train_loss": sum(losses) / len(losses),
            "bytes_sent": report.bytes_sent,
            "bytes_received": report.bytes_received,
            "aggregated": report.peers,
            "out_of_sync": out_of_sync,
            "seconds": time.monotonic() - started,
        }
        self.record(record)
        log.info(
            "%s window %d: loss %.4f, sent %d B, aggregated %s",
            self.hotkey,
            window,
            record["train_loss"],
            report.bytes_sent,
            report.peers,
        )
        return report

    def replay(self, window: int, *, wait: bool = False) -> list[str]:
        """Apply ``window``'s aggregate without training (a window this miner missed).

        Returns the hotkeys aggregated. θ ← θ − α·aggregate, the outer step every miner
        took; θ₀ follows θ so the next round's pseudo-gradient starts from here.
        """
        chosen = self.aggregation_set(window, wait=wait)
        try:
            updates = window_updates(self.exchange, window, chosen)
        except NetcommError as exc:  # its own stored update is damaged: the sync check tells
            log.warning("%s: cannot replay window %d: %s", self.hotkey, window, exc)
            updates = {}
        self.outer.apply(updates)  # advances the window even when nothing is aggregated
        # A window without a published set (the validator skipped it) moved nobody.
        out_of_sync, next_window = None, window + 1
        if window in self.selections:
            out_of_sync, next_window = self.check_sync(window, sorted(updates))
        self.save(next_window)
        record = {"window": window, "replayed": True, "aggregated": sorted(updates)}
        if out_of_sync is not None:
            record["out_of_sync"] = out_of_sync
        self.record(record)
        log.info("%s: replayed window %d (%d updates)", self.hotkey, window, len(updates))
        return sorted(updates)

    def catch_up(self, current: int) -> None:
        """Replay every window between the next one to run and ``current`` (exclusive)."""
        start = current if self.next_window is None else self.next_window
        if start < current:
            self.directory.refresh()  # the validator and miners of the missed windows
        for window in range(start, current):
            # Only the window that just closed may still be waiting for its selection.
            self.replay(window, wait=window == current - 1)
        self.next_window = current

    def run(self, until_window: int | None = None) -> None:
        """Announce, then follow the clock until ``until_window`` is done or :attr:`stop` is set."""
        self.announce()
        try:
            while True:
                window = self.clock.wait_for(self.next_window or 0)
                if until_window is not None and window > until_window:
                    self.catch_up(until_window + 1)  # still end at the asked window
                    return
                self.catch_up(window)
                self.run_window(window)
                if until_window is not None and window >= until_window:
                    return
        except Stopped:
            log.info("%s: stopped", self.hotkey)
