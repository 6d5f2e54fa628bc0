"""The exchange interface the outer optimizers talk to, and two implementations.

An exchange moves one payload per peer per window. The optimizer calls
``publish(window, payload)`` and then ``gather(window)``, which returns the *other* peers'
payloads with a status per peer. ``netcomm`` provides the object-storage implementation;
this module provides:

* :class:`InProcessHub` / :class:`InProcessExchange`: peers as threads of one process
  (tests, simulations, single-machine runs);
* :class:`DistributedExchange`: peers as ranks of a ``torch.distributed`` process group
  (gloo or NCCL), payloads serialized with :mod:`sparseloco.serialization` (canonical
  safetensors, never pickle) and all-gathered; a rank that fails makes every rank raise.

An exchange whose ``gather`` is a collective over processes that must step together has a
``lockstep`` attribute (a :class:`~sparseloco.lockstep.Lockstep`): the optimizers then end
every phase of a round with an agreement over those ranks, so a rank failing alone makes
every rank raise the same :class:`~sparseloco.errors.RankError` instead of hanging.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from sparseloco.errors import ExchangeError, SparseLoCoError
from sparseloco.lockstep import Lockstep
from sparseloco.payload import Payload, payload_from_tensors, validate_payload
from sparseloco.serialization import dump_safetensors, load_safetensors

Status = Literal["ok", "missing", "late", "invalid", "timeout"]


@dataclass(frozen=True)
class PeerStatus:
    """What happened to one peer's payload in a gather."""

    peer: str
    status: Status
    reason: str = ""
    nbytes: int = 0
    latency_s: float = 0.0
    #: when the storage server stored the object (epoch seconds), if the exchange saw it
    stored_at: float | None = None


@dataclass
class GatherResult:
    """The usable payloads of a window (``status == "ok"``) and every peer's status.

    ``self_selected`` says whether the gathering peer's own update belongs in the aggregate;
    an exchange that aggregates only a selected set of peers (e.g. the validators'
    top-rated) sets it to False when this peer is not among them, so every peer aggregates
    the same set and stays in sync.

    ``contents_validated`` says the exchange has run :func:`~sparseloco.payload.validate_payload`
    on every payload in ``updates`` (each is decodable, its values finite), so the optimizer
    checks only that each fits its model (kind, codec, names, shapes) instead of reading
    every byte a second time; an exchange that leaves it False has its payloads validated
    by the optimizer.
    """

    window: int
    updates: dict[str, Payload] = field(default_factory=dict)
    statuses: dict[str, PeerStatus] = field(default_factory=dict)
    self_selected: bool = True
    contents_validated: bool = False

    @property
    def bytes_received(self) -> int:
        return sum(s.nbytes for s in self.statuses.values())


@runtime_checkable
class Exchange(Protocol):
    """What an outer optimizer needs from the network."""

    @property
    def peer_id(self) -> str:
        """This peer's id (used to order peers and to exclude itself from gather)."""
        ...

    def publish(self, window: int, payload: Payload) -> int:
        """Make ``payload`` available to the other peers for ``window``; returns bytes sent.

        The exchange may keep references to the payload's tensors: do not modify them after.
        """
        ...

    def gather(self, window: int) -> GatherResult:
        """The other peers' payloads for ``window``."""
        ...


class InProcessHub:
    """A mailbox shared by peers running as threads of one process.

    Args:
        peers: the ids ``gather`` waits for. Without it, the hub serves the peers connected
            before the first ``gather``, and connecting another one later raises
            :class:`ExchangeError` (it would silently miss the windows already gathered).
        timeout: seconds ``gather`` waits for every expected peer before marking the rest
            ``"missing"``.
        keep_windows: windows kept in memory; older ones are dropped.
        validate: decode every payload once on publish, so a bad one is reported
            ``"invalid"`` by gather instead of failing inside aggregation.
    """

    def __init__(
        self,
        peers: list[str] | None = None,
        *,
        timeout: float = 60.0,
        keep_windows: int = 4,
        validate: bool = True,
    ) -> None:
        self.timeout = timeout
        self.keep_windows = keep_windows
        self.validate = validate
        self._fixed = None if peers is None else sorted(peers)
        self._peers: list[str] = []
        self._gathered = False
        self._mail: dict[int, dict[str, tuple[Payload | None, str]]] = {}
        self._cond = threading.Condition()

    @property
    def peers(self) -> list[str]:
        with self._cond:
            return list(self._peers)

    def connect(self, peer_id: str) -> InProcessExchange:
        with self._cond:
            if peer_id in self._peers:
                raise ExchangeError(f"peer id {peer_id!r} is already connected")
            if self._fixed is not None and peer_id not in self._fixed:
                raise ExchangeError(f"peer id {peer_id!r} is not one of the hub's peers")
            if self._fixed is None and self._gathered:
                raise ExchangeError(
                    f"peer {peer_id!r} connects after the first gather; connect every peer "
                    "first, or pass InProcessHub(peers=[...]) so gather waits for them"
                )
            self._peers.append(peer_id)
        return InProcessExchange(self, peer_id)

    def observer(self, name: str = "observer") -> InProcessExchange:
        """A read-only handle (a validator) that gathers every peer and publishes nothing."""
        return InProcessExchange(self, name, can_publish=False)

    def _post(self, window: int, peer: str, payload: Payload) -> None:
        error = ""
        if self.validate:
            try:
                validate_payload(payload)
            except SparseLoCoError as exc:
                error = str(exc)
        with self._cond:
            box = self._mail.setdefault(window, {})
            box[peer] = (None, error) if error else (payload, "")
            for old in [w for w in self._mail if w <= window - self.keep_windows]:
                del self._mail[old]
            self._cond.notify_all()

    def _collect(self, window: int, me: str) -> GatherResult:
        start = time.monotonic()
        deadline = start + self.timeout
        with self._cond:
            self._gathered = True
            expected = [p for p in (self._fixed or self._peers) if p != me]
            while True:
                box = self._mail.get(window, {})
                if all(p in box for p in expected):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            box = dict(self._mail.get(window, {}))
        result = GatherResult(window=window, contents_validated=self.validate)
        elapsed = time.monotonic() - start
        for peer in sorted(expected):
            if peer not in box:
                result.statuses[peer] = PeerStatus(peer, "missing", "nothing published")
                continue
            payload, error = box[peer]
            if payload is None:
                result.statuses[peer] = PeerStatus(peer, "invalid", error)
                continue
            result.updates[peer] = payload
            result.statuses[peer] = PeerStatus(peer, "ok", nbytes=payload.nbytes, latency_s=elapsed)
        return result


class InProcessExchange:
    """One peer's handle on an :class:`InProcessHub`."""

    def __init__(self, hub: InProcessHub, peer_id: str, *, can_publish: bool = True) -> None:
        self._hub = hub
        self._peer_id = peer_id
        self._can_publish = can_publish

    @property
    def peer_id(self) -> str:
        return self._peer_id

    def publish(self, window: int, payload: Payload) -> int:
        if not self._can_publish:
            raise ExchangeError(f"{self._peer_id!r} is an observer and cannot publish")
        self._hub._post(window, self._peer_id, payload)
        return payload.nbytes

    def gather(self, window: int) -> GatherResult:
        return self._hub._collect(window, self._peer_id)


class DistributedExchange:
    """Peers are the ranks of a ``torch.distributed`` process group (gloo or NCCL).

    Each payload is serialized as canonical safetensors bytes; one all-gather carries every
    rank's payload length (inside :meth:`~sparseloco.lockstep.Lockstep.agree`), a second the
    padded byte buffers (skipped when no rank sent any); peer ids are ``"rank{r}"``. On an
    NCCL group the collectives run on this rank's current CUDA device
    (``torch.cuda.current_device()``), on gloo in CPU memory. Received bytes go through the
    bounded reader and full validation, so a bad rank's payload is reported ``"invalid"``
    (and the optimizers, whose ranks must aggregate the same peers, then raise on every rank).

    It never leaves a rank waiting for one that gave up: the optimizers end every phase of a
    round with an agreement over :attr:`lockstep` (a rank whose finite check, encoding or
    aggregation fails makes every rank raise the same :class:`~sparseloco.errors.RankError`,
    naming the failed ranks, and none steps), and a payload that cannot be serialized is
    reported in the gather's own agreement. Ranks at different windows raise alike. Every
    rank must call ``step()`` for the same windows (collectives), so use it among
    cooperating processes, not strangers.

    Args:
        group: the process group (default: the world).
    """

    def __init__(self, group: torch.distributed.ProcessGroup | None = None) -> None:
        import torch.distributed as dist

        self.lockstep = Lockstep(group)
        self._dist = dist
        self._group = group
        self._rank = self.lockstep.rank
        self._world = self.lockstep.world
        self.device = self.lockstep.device or torch.device("cpu")
        self._pending: dict[int, bytes] = {}
        self._failed: dict[int, BaseException] = {}

    @property
    def peer_id(self) -> str:
        return f"rank{self._rank}"

    def publish(self, window: int, payload: Payload) -> int:
        """Keep the payload's bytes for ``gather``; a serialization failure is raised there,
        on every rank."""
        try:
            data = dump_safetensors(*payload.to_tensors())
        except Exception as exc:  # the other ranks are about to wait in gather: fail there
            self._failed[window] = exc
            return 0
        self._pending[window] = data
        return len(data)

    def gather(self, window: int) -> GatherResult:
        data = self._pending.pop(window, b"")
        failure = self._failed.pop(window, None)
        lengths = self.lockstep.agree(window, "publish", failure, extra=len(data))
        size = max(lengths)
        bufs = []
        if size:
            buf = torch.zeros(size, dtype=torch.uint8)
            if data:
                buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            buf = buf.to(self.device)
            bufs = [torch.empty_like(buf) for _ in range(self._world)]
            self._dist.all_gather(bufs, buf, group=self._group)
        result = GatherResult(window=window, contents_validated=True)
        for rank, n in enumerate(lengths):
            peer = f"rank{rank}"
            if rank == self._rank:
                continue
            if n == 0:
                result.statuses[peer] = PeerStatus(peer, "missing", "nothing published")
                continue
            try:
                # The received buffer is this rank's own memory: tensors are views of it.
                payload = payload_from_tensors(*load_safetensors(bufs[rank][:n].cpu().numpy()))
                validate_payload(payload)
            except SparseLoCoError as exc:
                result.statuses[peer] = PeerStatus(peer, "invalid", str(exc), n)
                continue
            result.updates[peer] = payload
            result.statuses[peer] = PeerStatus(peer, "ok", nbytes=n)
        return result
