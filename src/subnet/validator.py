"""A validator: gathers each window's updates, scores them, publishes the aggregation set,
follows the global model, checkpoints it and sets weights every K windows.

One window ``w`` (:meth:`Validator.run_window`), run once ``w`` has closed on the chain:

1. refresh the directory; gather every committed miner's update and proof for ``w``;
2. Gauntlet-score the window (:class:`gauntlet.Scorer`: proof of data, copies, evaluation
   on assigned and shared random data, sync, OpenSkill, BMA);
3. publish the aggregation set as ``selection/{w}.json`` in its own storage: the accepted
   updates, or every verified one with ``validator.aggregate = "valid"`` (miners aggregate
   exactly that set, so every miner and the validator take the same outer step);
4. apply the same outer step to its model (θ ← θ − α·aggregate of that set) and
   let the scorer remember the aggregate, so an update that resends it later is a replay;
5. every ``weights_every`` windows, set the scoreboard's weights on chain;
6. checkpoint the model to its storage as step ``w + 1``, with the scoreboard state in the
   checkpoint's metadata (one atomic ``latest`` pointer for both).

The evaluation seed of window ``w`` is the chain's hash of window ``w + 1``'s first block
(the publish deadline): no miner can know the evaluated sets while it can still publish, and
every validator reads the same hash. Peers are iterated in sorted order, so two validators on
the same inputs set the same weights.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from gauntlet import (
    Chain,
    Scoreboard,
    Scorer,
    WeightsError,
    WindowInputs,
    WindowReport,
)
from netcomm import Checkpoint, CheckpointStore, ModelSpec, NetcommError
from sparseloco.optim import SparseLoCo
from subnet.base import Node
from subnet.clock import Stopped
from subnet.config import NodeConfig
from subnet.protocol import (
    PROOFS,
    UPDATES,
    Protocol,
    read_proof,
    state_digest,
    write_selection,
)
from subnet.state import prune_checkpoints
from subnet.task import Task

log = logging.getLogger("subnet.validator")

#: reads of the own checkpoint at start-up before a damaged one ends the node.
RESUME_ATTEMPTS = 5


def _valid(report: WindowReport, peer: str) -> bool:
    outcome = report.outcomes.get(peer)
    return outcome is not None and outcome.status != "invalid"


def peer_rows(report: WindowReport) -> dict[str, dict[str, Any]]:
    """Per peer: status, reason, gains, sync score, score and weight (the window's log)."""
    rows = {}
    for peer, o in sorted(report.outcomes.items()):
        rows[peer] = {
            "status": o.status,
            "reason": o.reason,
            "gain_random": o.evaluation.gain_random if o.evaluation else None,
            "gain_assigned": o.evaluation.gain_assigned if o.evaluation else None,
            "indicator": o.evaluation.indicator if o.evaluation else None,
            "sync": o.sync.score if o.sync else None,
            "score": report.scores.get(peer, 0.0),
            "weight": report.weights.get(peer, 0.0),
        }
    return rows


class Validator(Node):
    """A Gauntlet validator on any :class:`~subnet.task.Task`.

    Args:
        cfg: the node configuration (``role = "validator"``).
        task: the model and data of the run.
        chain: this hotkey's chain handle; it needs a validator permit (stake) to set weights.
        s3_options: extra :class:`netcomm.S3Config` fields for S3 clients (timeouts, retries).
    """

    role = "validator"

    def __init__(
        self,
        cfg: NodeConfig,
        task: Task,
        chain: Chain,
        *,
        s3_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(cfg, task, chain, s3_options=s3_options)
        self.protocol = Protocol(cfg.run, task, cfg.validator)
        self.checkpoints = CheckpointStore(self.storage, "checkpoints")
        self.model = task.make_model()
        scoreboard = Scoreboard(self.protocol.gauntlet)
        self.next_window: int | None = None
        ck = self._own_checkpoint()
        if ck is not None:
            self.model.load_state_dict(ck.model)
            scoreboard.load_state_dict(ck.meta["scoreboard"])
            self.next_window = ck.step
            log.info("%s: resumed from its checkpoint at window %d", self.hotkey, ck.step)
        self.scorer = Scorer(
            self.model,
            task.loss_fn,
            self.protocol.eval_batches,
            seed=self.protocol.seed,
            config=self.protocol.gauntlet,
            scoreboard=scoreboard,
            codec=self.protocol.codec,
            contents_for=task.contents,
            eval_threads=cfg.validator.eval_threads,
        )
        spec = ModelSpec.from_named_tensors(dict(self.model.named_parameters()))
        self.updates = self._channel(UPDATES, spec)
        # follows the miners: applies each window's accepted updates, never publishes
        self.follower = SparseLoCo(self.model.named_parameters(), self.updates, self.protocol.outer)
        self.proofs = self._channel(PROOFS, self.protocol.proof_spec)
        n = cfg.validator.heldout_batches
        self.heldout = task.heldout(n) if task.heldout is not None and n else []

    def _own_checkpoint(self) -> Checkpoint | None:
        """The latest checkpoint in the own storage (``None`` before the first), read again
        up to :data:`RESUME_ATTEMPTS` times when a read comes back damaged: a restart must
        not die of one faulty transfer."""
        attempt = 1
        while True:
            try:
                if self.checkpoints.latest_step() is None:
                    return None
                return self.checkpoints.load()
            except NetcommError as exc:
                if attempt == RESUME_ATTEMPTS:
                    raise
                log.warning("%s: own checkpoint not readable (%s); again", self.hotkey, exc)
                self._wait(self.cfg.exchange.poll_interval_s * attempt)
                attempt += 1

    @property
    def scoreboard(self) -> Scoreboard:
        return self.scorer.scoreboard

    @torch.no_grad()
    def heldout_loss(self) -> float | None:
        """Mean loss of the global model on the held-out batches (``None`` without any)."""
        if not self.heldout:
            return None
        self.model.eval()
        return sum(float(self.task.loss_fn(self.model, b)) for b in self.heldout) / len(
            self.heldout
        )

    def run_window(self, window: int) -> WindowReport:
        """Score ``window``, publish its aggregation set, step, set weights, checkpoint."""
        started = time.monotonic()
        self.directory.refresh()
        self.scoreboard.prune(self.chain.metagraph().hotkeys)  # deregistered hotkeys start over
        peers = self.directory.hotkeys("miner")
        gathered = self.updates.gather(window, peers=peers)
        # A peer without an update fails the window anyway; not waiting for its proof keeps a
        # missing peer from costing a second gather deadline.
        proofs = self.proofs.gather(window, peers=sorted(gathered.updates))
        digests, sync = {}, {}
        for peer, payload in proofs.updates.items():
            try:
                digests[peer], sync[peer] = read_proof(payload)
            except (ValueError, KeyError):
                continue  # a malformed proof counts as no proof
        report = self.scorer.score_window(
            WindowInputs(
                window=window,
                gather=gathered,
                # the hash of window w+1's first block: it does not exist before w's
                # deadline, and every validator reads the same one
                eval_seed=self.chain.block_hash(self.clock.first_block(window + 1)),
                digests=digests,
                sync_values=sync,
                publish_times={
                    p: st.stored_at
                    for p, st in gathered.statuses.items()
                    if st.stored_at is not None and p in gathered.updates
                },
            )
        )
        accepted = report.accepted
        chosen = accepted
        if self.cfg.validator.aggregate == "valid":
            chosen = [p for p in sorted(gathered.updates) if _valid(report, p)]
        selected = {p: gathered.updates[p] for p in chosen}
        # a later update that resends this aggregate is a replay
        self.follower.apply(
            selected, on_aggregate=lambda agg: self.scorer.record_aggregate(window, agg)
        )
        write_selection(self.storage, window, chosen, state_digest(self.model.named_parameters()))
        weights_set = None
        if (window + 1) % self.cfg.validator.weights_every == 0:
            weights_set = self.set_weights()
        self.checkpoints.save(
            window + 1,
            self.model.state_dict(),
            meta={"window": window + 1, "scoreboard": self.scoreboard.state_dict()},
        )
        prune_checkpoints(self.checkpoints, self.cfg.validator.keep_checkpoints)
        self.next_window = window + 1
        record = {
            "window": window,
            "statuses": {p: o.status for p, o in sorted(report.outcomes.items())},
            "peers": peer_rows(report),
            "accepted": accepted,
            "aggregated": chosen,
            "scores": report.scores,
            "weights": report.weights,
            "weights_set": weights_set,
            "heldout_loss": self.heldout_loss(),
            "scoring_seconds": {k: round(v, 4) for k, v in sorted(report.timings.items())},
            "seconds": time.monotonic() - started,
        }
        self.record(record)
        log.info("%s window %d: accepted %s\n%s", self.hotkey, window, accepted, report.table())
        return report

    def set_weights(self) -> bool:
        """Submit the scoreboard's weights; ``False`` when there is nothing to set or the chain
        refused (the reason is logged)."""
        limits = self.chain.weight_limits()
        try:
            cw = self.scoreboard.chain_weights(self.chain.metagraph(), limits)
        except WeightsError as exc:
            log.info("%s: no weights to set yet (%s)", self.hotkey, exc)
            return False
        result = self.chain.set_weights(cw.uids, cw.values, limits.version_key)
        if not result.success:
            log.warning("%s: set_weights refused: %s", self.hotkey, result.message)
        elif result.reveal_round is not None:
            log.info("%s: weights committed, not yet applied: %s", self.hotkey, result.message)
        return result.success

    def run(self, until_window: int | None = None) -> None:
        """Announce, then score each window as it closes, until ``until_window`` is scored or
        :attr:`stop` is set. Behind the clock, it scores the latest closed window and skips
        older ones (nobody aggregates a skipped window, so every model stays equal)."""
        self.announce()
        if self.next_window is None:
            # the window that closed last is still scorable: its updates are published
            self.next_window = max(self.clock.window() - 1, 0)
        self.record(
            {"event": "start", "next_window": self.next_window, "heldout_loss": self.heldout_loss()}
        )
        try:
            while True:
                window = self.clock.wait_for(self.next_window + 1) - 1
                if until_window is not None and window > until_window:
                    return
                if window > self.next_window:
                    log.warning(
                        "%s: skipping windows %d..%d", self.hotkey, self.next_window, window - 1
                    )
                self.run_window(window)
                if until_window is not None and window >= until_window:
                    return
        except Stopped:
            log.info("%s: stopped", self.hotkey)
