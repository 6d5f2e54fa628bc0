"""One peer made of several processes (DDP or FSDP2 inside a peer under ``torchrun``).

A peer that trains with DDP runs one outer optimizer per rank. DDP keeps the parameters of
all ranks bit-identical, so every rank computes the same pseudo-gradient and the same
payload (FSDP2's ranks build it together: :mod:`sparseloco.sharded`); only one of them may
publish it, and all of them must aggregate the same payloads.
:class:`RankZeroExchange` wraps the peer's exchange for that:

* ``publish``: rank 0 of the group publishes through the wrapped exchange; the other ranks
  publish nothing (0 bytes sent).
* ``gather``: rank 0 gathers, then broadcasts to the group what it got — a JSON header
  (statuses, the selection flag, the peers in order) and each payload as the canonical
  safetensors bytes of the wire format (never pickle). Every rank returns an equal
  :class:`GatherResult` and so takes the same outer step.
* failures: an exception in rank 0's publish is held and an exception in its gather is
  caught; either is broadcast in place of the payloads, and every rank raises the same
  :class:`~sparseloco.errors.RankError` from that one broadcast, so no rank waits in a
  collective for a rank that gave up.
* :meth:`RankZeroExchange.share` does the same for anything rank 0 alone reads (``netcomm.join``
  hands every rank the checkpoint and the replayed windows' updates through it).

Every rank must call ``publish`` and ``gather`` for the same windows, as with DDP itself.

The ranks agree after every phase of a round through :class:`~sparseloco.lockstep.Lockstep`.
A rank's script ends with :func:`leave_rank`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import NoReturn

import torch
import torch.distributed as dist

from sparseloco.errors import ExchangeError, RankError
from sparseloco.exchange import Exchange, GatherResult, PeerStatus
from sparseloco.lockstep import Lockstep
from sparseloco.payload import Payload, payload_from_tensors
from sparseloco.serialization import dump_safetensors, load_safetensors


class RankZeroExchange:
    """The exchange of a peer whose outer optimizer runs on every rank of ``group``.

    Args:
        exchange: the peer's exchange, used on rank 0 only (other ranks may pass ``None``).
        group: the peer's process group (default: the world). On an NCCL group the
            broadcasts use this rank's current CUDA device.
    """

    def __init__(self, exchange: Exchange | None, group: dist.ProcessGroup | None = None) -> None:
        self.lockstep = Lockstep(group)
        self._group = group
        self._leader = self.lockstep.rank == 0
        self._exchange = exchange if self._leader and isinstance(exchange, Exchange) else None
        self._src = dist.get_global_rank(group, 0) if group is not None else 0
        self._held: dict[int, str] = {}
        own_id = self._exchange.peer_id.encode() if self._exchange is not None else None
        self._peer_id = self._broadcast(own_id).decode()
        if not self._peer_id:  # on every rank, not on rank 0 alone
            raise ExchangeError("rank 0 of the group needs the peer's exchange, got none")

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def leader(self) -> bool:
        """Whether this is rank 0 of the group (the one that publishes and gathers)."""
        return self._leader

    @property
    def exchange(self) -> Exchange | None:
        """The peer's exchange on rank 0; ``None`` on the other ranks."""
        return self._exchange

    def publish(self, window: int, payload: Payload) -> int:
        """Rank 0 publishes; a failure is raised on every rank by the next :meth:`gather`."""
        if not self._leader:
            return 0
        try:
            return self._exchange.publish(window, payload)  # type: ignore[union-attr]
        except Exception as exc:  # held: the other ranks are about to wait in gather
            self._held[window] = f"publish failed: {type(exc).__name__}: {exc}"
            return 0

    def gather(self, window: int) -> GatherResult:
        """Rank 0's gather, the same on every rank; or the same :class:`RankError` raised on
        every rank."""
        return self.share_result(window, "gather", lambda: self._leader_gather(window))

    def share_result(
        self, window: int, phase: str, make: Callable[[], GatherResult]
    ) -> GatherResult:
        """``make()`` run on rank 0 (a gather, or a window's updates read back from storage),
        the same :class:`GatherResult` on every rank: a JSON header (statuses, the selection
        flag, the peers in order), then each payload's canonical safetensors bytes."""

        def blobs() -> list[bytes]:
            got = make()
            peers = sorted(got.updates)
            header = {
                "self_selected": got.self_selected,
                "updates": peers,
                "statuses": [
                    [s.peer, s.status, s.reason, s.nbytes, s.latency_s]
                    for s in got.statuses.values()
                ],
            }
            payloads = [dump_safetensors(*got.updates[p].to_tensors()) for p in peers]
            return [json.dumps(header).encode(), *payloads]

        head, *payloads = self.share(window, phase, blobs)
        header = json.loads(head)
        result = GatherResult(window=window, self_selected=header["self_selected"])
        for peer, blob in zip(header["updates"], payloads, strict=True):
            result.updates[peer] = payload_from_tensors(*load_safetensors(bytearray(blob)))
        for peer, status, reason, nbytes, latency in header["statuses"]:
            result.statuses[peer] = PeerStatus(peer, status, reason, nbytes, latency)
        return result

    def share(self, window: int, phase: str, make: Callable[[], list[bytes]]) -> list[bytes]:
        """``make()`` run on rank 0, its byte strings on every rank (broadcasts); when it
        raises, every rank raises the same :class:`RankError` from the same broadcast."""
        error, blobs = "", []
        if self._leader:
            try:
                blobs = make()
            except Exception as exc:  # broadcast, then raised on every rank alike
                error = f"{type(exc).__name__}: {exc}"
        head = json.dumps({"count": len(blobs), "error": error}).encode() if self._leader else None
        header = json.loads(self._broadcast(head))
        if header["error"]:
            message = f"window {window}: rank 0 of peer {self._peer_id}: {header['error']}"
            raise RankError(message, window, phase, {0: header["error"]})
        return [self._broadcast(blobs[i] if self._leader else None) for i in range(header["count"])]

    def _leader_gather(self, window: int) -> GatherResult:
        if window in self._held:
            raise ExchangeError(self._held.pop(window))
        return self._exchange.gather(window)  # type: ignore[union-attr]

    def _broadcast(self, data: bytes | None) -> bytes:
        return broadcast_bytes(data, self._src, self._group, self.lockstep.device)


def broadcast_bytes(
    data: bytes | None,
    src: int,
    group: dist.ProcessGroup | None,
    device: torch.device | None,
) -> bytes:
    """``data`` from global rank ``src`` to every rank of ``group`` (broadcasts of the length,
    then of the bytes; through ``device`` memory when given, as NCCL needs)."""
    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    n = n.to(device) if device is not None else n
    dist.broadcast(n, src=src, group=group)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8)
    if data is not None and len(data):
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if device is not None:
        buf = buf.to(device)
    dist.broadcast(buf, src=src, group=group)
    return buf.cpu().numpy().tobytes()


def leave_rank(code: int = 0) -> NoReturn:
    """End a ``torchrun`` rank whose work is done: flush stdout and stderr, then exit without
    finalizing the interpreter.

    gloo's worker threads drop a finished collective's tensors a moment after its caller has
    seen it complete; one that does so while the interpreter finalizes cannot take the GIL
    and aborts the rank ("terminate called without an active exception", seen with torch
    2.13 after a closing barrier and ``destroy_process_group``: 1 run in 15 of
    ``examples/torchrun_miner.py`` on 2 loaded cores, 1 in 5 of a test's joining worker).
    Call it as the last statement of a rank's script, after its files are closed: ``atexit``
    handlers do not run.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
