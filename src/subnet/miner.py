"""A miner: trains on its assigned data each window and exchanges SparseLoCo updates.

One window ``w`` (:meth:`Miner.run_window`):

1. refresh the peer directory from chain commitments;
2. publish the proof (proof-of-data digest of its assignment and the model's values at the
   window's sync positions), then run H AdamW steps on the assignment;
3. one SparseLoCo round: publish the compressed update, gather the aggregation set (the set
   the followed validator accepted for ``w``, or every valid update with
   ``aggregate = "all"``), aggregate and step;
4. checkpoint model, AdamW and SparseLoCo state (step ``w + 1``) to ``state_dir``.

With ``miner.overlap`` the round of step 3 runs in the background (SparseLoCo's
``overlap=True``): the miner publishes ``w``'s update and trains ``w + 1`` at once, and
applies ``w``'s aggregate one window late (at ``w + 1``'s end, or ``miner.apply_after``
inner steps into it). Its proof then carries the global model Θ (the optimizer's θ₀, what
the validator holds when it scores the window) and is published at the window's end, and
the sync check compares Θ with the validator's digest.

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
from collections.abc import Iterator
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
from sparseloco.errors import BackgroundRoundError
from sparseloco.exchange import GatherResult
from sparseloco.loop import apply_due
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
        chosen = self.miner.aggregation_set(window)
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

    def _load_weights(self) -> int:
        """Model weights from the own checkpoint, else the validator's, else the run's
        initial ones (the global model of window 0: windows since then are replayed); the
        next window."""
        if self.checkpoints.latest_step() is not None:
            ck = self.checkpoints.load()
            self.model.load_state_dict(ck.model)
            self._resume = ck
            return ck.step
        self._resume = None
        self.directory.refresh()
        validator = self._validator()
        if validator is None:
            return 0
        store = CheckpointStore(self.directory.entry(validator).storage, "checkpoints")
        if store.latest_step() is None:
            return 0
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

    def aggregation_set(self, window: int) -> list[str] | None:
        """Hotkeys whose updates are aggregated in ``window``; ``None`` = every valid one.

        With ``aggregate = "validator"`` this is the followed validator's published set,
        waited for up to ``exchange.selection_timeout_s`` after the window closed, or until
        :data:`SKIPPED_AFTER` windows show the validator skipped it; an empty list when it
        does not come (the miner then re-syncs, see :meth:`check_sync`).
        """
        if self.cfg.miner.aggregate == "all":
            return None
        # The validator scores a window once it has closed, so the timeout counts from there.
        # Overlapped rounds wait here on a background thread while the miner trains: they
        # must not tell the chain the node is idle.
        self.clock.wait_for(window + 1, idle=not self.cfg.miner.overlap)
        deadline = time.monotonic() + self.cfg.exchange.selection_timeout_s
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

    def check_sync(
        self, window: int, aggregated: list[str], resume: int | None = None
    ) -> tuple[str | None, int]:
        """After ``window``'s aggregate was applied: ``(None, resume)`` when this miner
        stepped on the validator's set and holds the validator's model; otherwise why not
        and the window it continues from after re-syncing (logged). ``resume``: the next
        window to train (default ``window + 1``; one more with overlapped rounds, where the
        aggregate comes a window late).

        Out of sync means: no aggregation set arrived, an update of the set could not be
        used, or the global model's :func:`~subnet.protocol.state_digest` differs from the
        one the validator published with the set. The miner then loads the validator's
        latest model checkpoint (step ``resume`` or later) instead of training on a
        different model.
        """
        resume = window + 1 if resume is None else resume
        if self.cfg.miner.aggregate == "all":
            return None, resume
        chosen = self.selections.pop(window, None)
        for old in [w for w in list(self.selections) if w < window]:  # a dropped round's set
            del self.selections[old]
        if chosen is None:
            problem = "no aggregation set arrived"
        elif missing := sorted(set(chosen.peers) - set(aggregated)):
            problem = f"could not use the update(s) of {', '.join(missing)}"
        elif state_digest(self._global_model()) != chosen.state:
            problem = "its model differs from the validator's"
        else:
            return None, resume
        step = self._resync(resume)
        if step is None:
            log.warning(
                "%s: out of sync after window %d (%s); re-sync FAILED", self.hotkey, window, problem
            )
            return f"{problem}; re-sync failed", resume
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
        # momentum, so nothing else differs from the other miners). An overlapped round in
        # flight is dropped with the old optimizer: the loaded model already holds it.
        self.model.load_state_dict(loaded.model)
        self.outer = self._outer_optimizer()
        return loaded.step

    def validator_checkpoint(self, step: int, *, latest: bool) -> Checkpoint | None:
        """The followed validator's model checkpoint ``step`` (or, with ``latest``, its newest
        once that is at least ``step``), waited for up to ``exchange.selection_timeout_s``
        while unpublished, pruned or half-written; ``None`` when it does not come."""
        self.wait_for_window(step)  # checkpoint ``step`` comes once window step - 1 is scored
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
            overlap=self.cfg.miner.overlap_config(),
        )

    # --- windows ------------------------------------------------------------------------------

    def run_window(self, window: int) -> RoundReport:
        """Train, publish and step for ``window`` (see the module docstring)."""
        started = time.monotonic()
        self.directory.refresh()
        ids = self.protocol.assignment(self.hotkey, window)
        digest = self.protocol.digest(self.hotkey, window, ids)
        overlap = self.cfg.miner.overlap
        if not overlap:
            self._publish_proof(window, digest)
        losses, applied = self._train(ids)
        self.outer.window = window
        # not defer_message: save() below waits for the message's encode anyway
        report = self.outer.step()
        if overlap:  # Θ now holds the last window's aggregate: what the validator scores on
            self._publish_proof(window, digest)
        applied = applied or report
        out_of_sync, next_window = None, window + 1
        if applied.applied_window is not None:
            out_of_sync, next_window = self.check_sync(
                applied.applied_window, applied.peers, resume=window + 1
            )
        self.save(next_window)
        record: dict[str, Any] = {
            "window": window,
            "train_loss": sum(losses) / len(losses),
            "aggregated": applied.peers,
            "applied_window": applied.applied_window,
            "out_of_sync": out_of_sync,
            "seconds": time.monotonic() - started,
        }
        if applied.applied_window is not None:  # the round of the window applied here
            record["bytes_sent"] = applied.bytes_sent
            record["bytes_received"] = applied.bytes_received
        self.record(record)
        log.info(
            "%s window %d: loss %.4f, applied window %s: sent %d B, aggregated %s",
            self.hotkey,
            window,
            record["train_loss"],
            applied.applied_window,
            applied.bytes_sent,
            applied.peers,
        )
        return report

    def _publish_proof(self, window: int, digest: str) -> None:
        self.proofs.publish(window, self.protocol.proof(self._global_model(), window, digest))

    def _global_model(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The model the validator holds after the same aggregates: the parameters in
        blocking rounds; the optimizer's Θ in overlapped ones, where the parameters also
        carry this miner's own unapplied progress."""
        if self.cfg.miner.overlap:
            return self.outer.global_parameters()
        return self.model.named_parameters()

    def _train(self, ids: list[int]) -> tuple[list[float], RoundReport | None]:
        """The window's inner steps; with ``miner.apply_after``, the report of the previous
        window's aggregate applied that many steps in (or, without ``miner.apply_wait``,
        at the first step from there on at which it had arrived), else ``None``."""
        self.model.train()
        losses, applied = [], None
        tau = self.cfg.miner.apply_after or None
        for step, batch in enumerate(self.protocol.batches(ids)):
            if apply_due(self.outer, step, tau, wait=self.cfg.miner.apply_wait):
                applied = self.outer.finish()
            loss = self.task.loss_fn(self.model, batch)
            loss.backward()
            self.inner.step()
            self.inner.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses, applied

    def replay(self, window: int) -> list[str]:
        """Apply ``window``'s aggregate without training (a window this miner missed).

        Returns the hotkeys aggregated. θ ← θ − α·aggregate, the outer step every miner
        took; θ₀ follows θ so the next round's pseudo-gradient starts from here.
        """
        chosen = self.aggregation_set(window)
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

    def wait_for_window(self, window: int) -> int:
        """Wait for ``window`` on the clock (see :meth:`~subnet.clock.WindowClock.wait_for`);
        with overlapped rounds, first for the upload of the window in flight: a node that
        lets the chain know it is idle must have no work left for the window it waits out."""
        if self.clock.window() < window:
            while not self.outer.wait_published(self.cfg.window.poll_s):
                self._wait(0)  # raises Stopped once the node is asked to stop
        return self.clock.wait_for(window)

    def drain(self) -> None:
        """Overlapped rounds: apply the window still in flight (before replaying the
        windows after it, and at the end of a run, which then ends on the global model);
        sync-checked like any applied window. Nothing to do in blocking rounds."""
        window = self.outer.in_flight
        if window is None:
            return
        self.wait_for_window(window + 1)  # its set exists only once the window has closed
        report = self.outer.finish()
        assert report is not None
        out_of_sync, next_window = self.check_sync(window, report.peers)
        self.save(next_window)
        self.record(
            {
                "event": "drained",
                "applied_window": window,
                "aggregated": report.peers,
                "out_of_sync": out_of_sync,
            }
        )

    def catch_up(self, current: int) -> None:
        """Replay every window between the next one to run and ``current`` (exclusive)."""
        if self.next_window < current:
            self.directory.refresh()  # the validator and miners of the missed windows
            self.drain()  # a re-sync there may move next_window on
        for window in range(self.next_window, current):
            # A set not published yet may still come (a validator behind the clock); one
            # that has not come SKIPPED_AFTER windows on was skipped, and is not waited for.
            self.replay(window)
        self.next_window = current

    def run(self, until_window: int | None = None) -> None:
        """Announce, then follow the clock until ``until_window`` is done or :attr:`stop` is set."""
        self.announce()
        try:
            while True:
                window = self.wait_for_window(self.next_window)
                if until_window is not None and window > until_window:
                    self.catch_up(until_window + 1)  # still end at the asked window
                    self.drain()
                    return
                self.catch_up(window)
                self.run_window(window)
                if until_window is not None and window >= until_window:
                    self.drain()
                    return
        except (Stopped, BackgroundRoundError) as exc:
            # A stop also ends an overlapped round waiting in the background, which the
            # boundary reports as that round's failure.
            if isinstance(exc, BackgroundRoundError) and not isinstance(exc.__cause__, Stopped):
                raise
            log.info("%s: stopped", self.hotkey)
