"""Joining a run: a new (or restarted) peer gets the current window and state from storage.

:func:`join` loads the latest checkpoint, then replays every window published since: it
gathers that window's updates and calls the outer optimizer's ``apply()`` (the outer step
every peer took, which advances ``window``). The peer then holds the model, θ₀, momentum and
window of the peers that ran from the start, and its next ``step()`` publishes under the
current window.

Checkpoint layout it reads (what a peer writes after each round, as the subnet miner does)::

    store.save(outer.window, model.state_dict(),
               optimizer={"outer": outer.state_dict(), "inner": inner.state_dict()})

A checkpoint with the model only (a validator's) works too: θ₀ ← θ and ``window`` ← its
step, which is exact when the outer optimizer keeps no shared state between rounds (no outer
momentum, no ``outer_optimizer`` state).

A peer of several processes (DDP or FSDP2 under ``torchrun``, through
:class:`~sparseloco.ranks.RankZeroExchange`) joins with the same call on every rank: rank 0
reads, every rank gets the same checkpoint and updates, and each keeps its shard. The
checkpoint holds full tensors (a plain peer's or a validator's); an FSDP2 peer does not save
one of its own yet (its states are DTensors and each error buffer lives on its owner rank).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.optim import Optimizer

from netcomm.checkpoint import (
    Checkpoint,
    CheckpointStore,
    checkpoint_blobs,
    checkpoint_from_blobs,
)
from netcomm.errors import CheckpointError
from netcomm.exchange import StorageExchange
from sparseloco import sharded
from sparseloco.exchange import GatherResult
from sparseloco.optim import OuterOptimizer
from sparseloco.payload import Payload
from sparseloco.ranks import RankZeroExchange

log = logging.getLogger(__name__)


@dataclass
class JoinReport:
    """What :func:`join` did.

    Attributes:
        checkpoint: the step of the checkpoint loaded (``None``: none saved yet, the replay
            started from the optimizer's state as built).
        window: the window to run next (the outer optimizer's ``window``).
        replayed: each replayed window and the peers whose updates it aggregated.
    """

    checkpoint: int | None
    window: int
    replayed: dict[int, list[str]] = field(default_factory=dict)


def join(
    model: torch.nn.Module,
    outer: OuterOptimizer,
    checkpoints: CheckpointStore | None,
    *,
    exchange: StorageExchange | None = None,
    inner: Optimizer | None = None,
    until: int | None = None,
    select: Callable[[int], Sequence[str]] | None = None,
    deadline_s: float = 5.0,
    own_checkpoint: bool = False,
) -> JoinReport:
    """Bring a peer to the run's current window: latest checkpoint, then replay.

    Call it on a freshly built outer optimizer (over ``model``'s parameters) before the
    first ``step()``, between rounds of the other peers.

    A peer of several processes (DDP or FSDP2 under ``torchrun``, its outer optimizer's
    exchange a :class:`~sparseloco.ranks.RankZeroExchange`) calls it on every rank: rank 0
    alone reads the storage (``checkpoints`` and ``exchange`` may be ``None`` elsewhere) and
    hands every rank the checkpoint and each replayed window's updates; each rank keeps its
    shard of the model, inner and outer state (the full checkpoint passes through every
    rank's CPU memory once). A failure on any rank raises the same
    :class:`~sparseloco.errors.RankError` on every rank.

    Args:
        model: the peer's model; gets the checkpoint's ``model`` state.
        outer: its outer optimizer; gets the checkpoint's ``optimizer["outer"]`` state
            (without the state of another peer's own, e.g. SparseLoCo's error-feedback
            buffers, unless ``own_checkpoint``), or θ₀ ← θ and ``window`` ← the step when
            the checkpoint holds the model only.
        checkpoints: where the checkpoints are (this peer's own, or another peer's or a
            validator's); ``None`` or an empty store: replay from ``outer``'s state as built
            (window 0 of a run every peer started from the same model).
        exchange: where the updates are gathered (default: ``outer.exchange``, or the
            exchange a :class:`~sparseloco.ranks.RankZeroExchange` wraps).
        inner: the inner optimizer, given the checkpoint's ``optimizer["inner"]`` if any.
        until: the window to stop before (the current one). Default: the first window for
            which no update (of the selected peers) is found; call it between rounds then,
            as a window still being published would be replayed in part.
        select: the peers whose updates window ``w`` aggregated, ``select(w)`` (e.g. a
            validator's selection); default: every peer that published one.
        deadline_s: how long each replayed window's gather waits for a missing update.
        own_checkpoint: the checkpoint is this peer's own (a restart): also load its
            error-feedback buffers.

    This peer's own published updates (a restart after publishing) are replayed too. Raises
    :class:`~netcomm.errors.CheckpointError` when the checkpoint's outer state is for another
    window than its step, is another peer's with an overlapped round in flight, or the
    checkpoint is past ``until``; the replay's typed errors
    (a payload that does not fit the model) propagate, with the windows before applied.
    """
    ranks = outer.exchange if isinstance(outer.exchange, RankZeroExchange) else None
    if exchange is None and (ranks is None or ranks.leader):
        exchange = ranks.exchange if ranks is not None else outer.exchange  # type: ignore[assignment]
    report = JoinReport(checkpoint=None, window=outer.window)
    ck = _latest(ranks, outer.window, checkpoints, until)
    if ck is not None:
        load = partial(_load, model, outer, inner, ck, own_checkpoint)
        if ranks is None:
            load()
        else:  # a failure on any rank raises on all
            ranks.lockstep.run(outer.window, "join", load)
        report.checkpoint = ck.step
    while until is None or outer.window < until:
        window = outer.window
        updates = _updates(ranks, exchange, window, select, deadline_s)
        if not updates and until is None:
            break
        outer.apply(updates)
        report.replayed[window] = sorted(updates)
    report.window = outer.window
    log.info(
        "joined at window %d (checkpoint %s, replayed %d windows)",
        report.window,
        report.checkpoint,
        len(report.replayed),
    )
    return report


def _latest(
    ranks: RankZeroExchange | None,
    window: int,
    checkpoints: CheckpointStore | None,
    until: int | None,
) -> Checkpoint | None:
    """The latest checkpoint (``None``: none saved); a multi-process peer's rank 0 reads it
    and every rank gets it."""

    def read() -> Checkpoint | None:
        if checkpoints is None or checkpoints.latest_step() is None:
            return None
        ck = checkpoints.load()
        if until is not None and ck.step > until:
            raise CheckpointError(f"the latest checkpoint is of step {ck.step}, past {until}")
        return ck

    if ranks is None:
        return read()

    def blobs() -> list[bytes]:
        ck = read()
        return [] if ck is None else checkpoint_blobs(ck)

    got = ranks.share(window, "join", blobs)
    return checkpoint_from_blobs(got) if got else None


def _updates(
    ranks: RankZeroExchange | None,
    exchange: StorageExchange | None,
    window: int,
    select: Callable[[int], Sequence[str]] | None,
    deadline_s: float,
) -> dict[str, Payload]:
    """The updates ``window`` aggregated (rank 0 reads them for a multi-process peer)."""

    def read() -> dict[str, Payload]:
        chosen = None if select is None else select(window)
        return window_updates(exchange, window, chosen, deadline_s)  # type: ignore[arg-type]

    if ranks is None:
        return read()
    return ranks.share_result(window, "join", lambda: GatherResult(window, read())).updates


def _load(
    model: torch.nn.Module,
    outer: OuterOptimizer,
    inner: Optimizer | None,
    ck: Checkpoint,
    own: bool,
) -> None:
    """The checkpoint's model and optimizer states; the outer optimizer at window ``ck.step``.

    Full tensors are laid out like the FSDP2 (DTensor) parameters and states they replace.
    """
    current = model.state_dict()
    model.load_state_dict({k: sharded.to_layout(v, current.get(k)) for k, v in ck.model.items()})
    optimizers = ck.optimizer or {}
    state = optimizers.get("outer")
    if state is None:
        outer.load_state_dict(_restart_state(outer, ck.step))
    else:
        saved = int(state.get("outer", {}).get("window", -1))
        if saved != ck.step:
            raise CheckpointError(
                f"checkpoint {ck.step} holds an outer optimizer of window {saved}; save it as "
                "step outer.window"
            )
        flight = state.get("outer", {}).get("in_flight")
        if flight is not None and not own:
            raise CheckpointError(
                f"checkpoint {ck.step} holds another peer's round of window "
                f"{flight.get('window')} in flight, which is not this peer's to publish; join "
                "from a checkpoint saved with nothing in flight (after outer.finish()) or from "
                "a model-only one"
            )
        outer.load_state_dict(state if own else _shared_state(outer, state))
    if inner is not None and "inner" in optimizers:
        inner.load_state_dict(_laid_out(inner, optimizers["inner"]))


def _laid_out(optimizer: Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A ``torch.optim`` state dict of full tensors, each laid out like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept = {
        i: {k: sharded.to_layout(v, params[i]) for k, v in s.items()}
        for i, s in state["state"].items()
    }
    return {**state, "state": kept}


def _restart_state(outer: OuterOptimizer, window: int) -> dict[str, Any]:
    """``outer``'s state_dict with θ₀ = the current parameters and ``window`` (and, when
    overlapping, the next window's start s = θ₀ too)."""
    sd = outer.state_dict()
    params = [p for _, p, _ in outer.named_params()]  # state_dict numbers them in this order
    keys = ("theta0", "start") if outer.overlap else ("theta0",)
    sd["state"] = {i: {k: p.detach().clone() for k in keys} for i, p in enumerate(params)}
    sd["outer"]["window"] = window
    return sd


def _shared_state(outer: OuterOptimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the optimizer's peer-local entries (another peer's residuals)."""
    local = set(outer.peer_local_state)
    kept = {
        pid: {k: v for k, v in s.items() if k not in local} for pid, s in state["state"].items()
    }
    return {**state, "state": kept}


def window_updates(
    exchange: StorageExchange,
    window: int,
    chosen: Sequence[str] | None,
    deadline_s: float | None = None,
) -> dict[str, Payload]:
    """The updates ``window`` aggregated, to replay it: the ``chosen`` peers' (every valid
    one when ``None``), this peer's own read back from its storage among them.

    Raises :class:`~netcomm.errors.EnvelopeError` when this peer's own stored update no
    longer verifies (leaving it out would silently step on a different set).
    """
    me = exchange.peer_id
    others = None if chosen is None else [p for p in chosen if p != me]
    updates: dict[str, Payload] = {}
    if others is None or others:
        updates.update(exchange.gather(window, peers=others, deadline=deadline_s).updates)
    if chosen is None or me in chosen:
        own = exchange.published(window)
        if own is not None:
            updates[me] = own
    return updates
