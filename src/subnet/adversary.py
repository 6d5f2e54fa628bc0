"""Adversarial miners, for testing validators: the behaviours of ``miner.behaviour``.

An :class:`AdversaryMiner` is a :class:`~subnet.miner.Miner` (same chain, storage, signing
key, proofs and channels) that, each window, loads the global model from the followed
validator's checkpoint (three windows old for ``stale``), publishes a proof for its
assignment and then a bad update instead of its honest SparseLoCo message:

* ``free-rider``: an all-zero update;
* ``noise``: random values with the norm of an honest update;
* ``copier``: ``miner.victim``'s update of the window with its value table scaled by 1.01;
* ``stale``: an honest update computed from a model three windows old;
* ``wrong-data``: an honest update trained on samples that are not its assignment;
* ``poisoner``: −10 × an honest update.

It never steps with the swarm (it reloads the global model every window), so it does not
replay missed windows either.
"""

from __future__ import annotations

import logging
import time

import torch

from gauntlet import draw_ids
from sparseloco.codec import CompressedTensor, CompressedUpdate, ErrorFeedback, encode
from subnet.miner import Miner

log = logging.getLogger("subnet.adversary")

#: how many windows behind the global model a ``stale`` miner trains.
STALE_LAG = 3


class AdversaryMiner(Miner):
    """A miner with ``cfg.miner.behaviour`` other than ``"honest"`` (see the module doc)."""

    @property
    def behaviour(self) -> str:
        return self.cfg.miner.behaviour

    def _global_step(self, window: int) -> int:
        return max(0, window - STALE_LAG) if self.behaviour == "stale" else window

    def _load_global(self, window: int) -> bool:
        """Load the global model as of the start of ``window`` (or of its stale lag);
        ``False`` when the validator's checkpoint of it does not come in time."""
        step = self._global_step(window)
        if step == 0:
            self.model.load_state_dict(self.task.make_model().state_dict())
            return True
        loaded = self.validator_checkpoint(step, latest=False)
        if loaded is None:
            log.warning("%s: no global checkpoint of window %d", self.hotkey, step)
            return False
        self.model.load_state_dict(loaded.model)
        return True

    def _honest_delta(self, ids: list[int]) -> dict[str, torch.Tensor]:
        theta0 = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        inner = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.run.inner_lr)
        self.model.train()
        for batch in self.protocol.batches(ids):
            self.task.loss_fn(self.model, batch).backward()
            inner.step()
            inner.zero_grad(set_to_none=True)
        return {n: theta0[n] - p.detach() for n, p in self.model.named_parameters()}

    def _copy(self, window: int) -> CompressedUpdate | None:
        victim = self.cfg.miner.victim
        # The victim publishes when its training is done: wait for it, not for a gather grace.
        got = self.exchange.gather(
            window, peers=[victim], deadline=self.cfg.exchange.selection_timeout_s
        )
        original = got.updates.get(victim)
        if not isinstance(original, CompressedUpdate):
            log.warning("%s: %s published no update to copy", self.hotkey, victim)
            return None
        tensors = {
            n: CompressedTensor(
                shape=ct.shape,
                indices=ct.indices,
                gaps=ct.gaps,
                codes=ct.codes,
                table=ct.table * 1.01,
                rice_param=ct.rice_param,
            )
            for n, ct in original.tensors.items()
        }
        return CompressedUpdate(codec=original.codec, tensors=tensors)

    def _update(self, window: int, ids: list[int]) -> CompressedUpdate | None:
        ef = ErrorFeedback(self.protocol.codec)
        if self.behaviour == "copier":
            return self._copy(window)
        if self.behaviour == "free-rider":
            return encode({n: torch.zeros_like(p) for n, p in self.model.named_parameters()}, ef)
        if self.behaviour == "wrong-data":
            key = (self.protocol.seed, self.hotkey, window)
            ids = draw_ids("wrong", key, self.task.num_samples, len(ids))
        delta = self._honest_delta(ids)
        if self.behaviour == "noise":
            g = torch.Generator().manual_seed(window)
            noise = {n: torch.randn(d.shape, generator=g) for n, d in delta.items()}
            delta = {n: noise[n] * (d.norm() / noise[n].norm()) for n, d in delta.items()}
        elif self.behaviour == "poisoner":
            delta = {n: -10.0 * d for n, d in delta.items()}
        return encode(delta, ef)

    def run_window(self, window: int) -> None:  # type: ignore[override]
        """Load the global model, publish a proof for the assignment, then the bad update."""
        started = time.monotonic()
        self.directory.refresh()
        self.next_window = window + 1
        if not self._load_global(window):
            return
        ids = self.protocol.assignment(self.hotkey, window)
        digest = self.protocol.digest(self.hotkey, window, ids)
        self.proofs.publish(
            window, self.protocol.proof(self.model.named_parameters(), window, digest)
        )
        update = self._update(window, ids)
        sent = 0 if update is None else self.exchange.publish(window, update)
        self.record({"window": window, "bytes_sent": sent, "seconds": time.monotonic() - started})
        log.info("%s (%s) window %d: sent %d B", self.hotkey, self.behaviour, window, sent)

    def catch_up(self, current: int) -> None:
        self.next_window = current
