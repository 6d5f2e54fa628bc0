"""Ranks that step together: one failing makes every rank raise the same error, never hang.

The ranks of one peer (DDP or FSDP2 under ``torchrun``), or the peers of a
:class:`~sparseloco.exchange.DistributedExchange`, must take every outer round together: a
rank that raises alone (an exception or out of memory while checking, encoding, aggregating
or stepping; a payload that does not decode on one rank) would leave the others waiting in
their next collective until the process group's timeout, or stepping without it.

The optimizers end each phase of a round with :meth:`Lockstep.agree`: one all-gather of
``(window, phase, status, error length, extra)`` per rank. When any rank failed, a second
all-gather shares the errors' text and every rank raises the same
:class:`~sparseloco.errors.RankError` there, naming the failed ranks and their errors, before
anything changes. A phase with collectives inside (FSDP2's per-tensor all-gathers) keeps
joining them after a local failure, so every rank reaches the agreement. What this does not
cover: a failure inside a collective itself (its receive buffer cannot be allocated, a rank's
process dies), which is left to the process group's timeout and error handling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from sparseloco.errors import ExchangeError, RankError

T = TypeVar("T")

#: the phases of a round that end in an agreement (their index travels in it)
PHASES = ("check", "encode", "gather", "commit", "apply", "publish", "join")
_OK, _FAILED, _LACKING = 0, 1, 2
_MAX_TEXT = 2000  # bytes of each failed rank's error shared with the others


class MissingRankData(Exception):
    """This rank lacks data another rank failed to send (that rank reports why)."""


class Lockstep:
    """The ranks of ``group`` (default: the world) that must take every round together.

    On an NCCL group the collectives use this rank's current CUDA device, on gloo the CPU.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise ExchangeError("torch.distributed is not initialized; call init_process_group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    @property
    def ranks(self) -> list[int]:
        """The global ranks of the group, in group order."""
        return dist.get_process_group_ranks(self.group or dist.group.WORLD)

    def agree(
        self, window: int, phase: str, failure: BaseException | None = None, extra: int = 0
    ) -> list[int]:
        """End ``phase`` of ``window`` on every rank: every rank's ``extra``, in rank order.

        One all-gather of ``(window, phase, status, error length, extra)`` per rank. When a
        rank failed (``failure``; :class:`MissingRankData` marks a rank that only lacks
        another's data) or the ranks are at different windows or phases, a second all-gather
        shares the errors' text and every rank raises the same :class:`RankError`, with its
        own ``failure`` as ``__cause__``.
        """
        status = _OK if failure is None else _FAILED
        status = _LACKING if isinstance(failure, MissingRankData) else status
        text = (
            f"{type(failure).__name__}: {failure}".encode()[:_MAX_TEXT]
            if status == _FAILED
            else b""
        )
        row = [window, PHASES.index(phase), status, len(text), extra]
        rows = self._all_gather(torch.tensor(row, dtype=torch.int64)).tolist()
        if all(r[:3] == [window, row[1], _OK] for r in rows):
            return [r[4] for r in rows]
        texts = self._texts(text, max(r[3] for r in rows))
        failed = {r: texts[r] for r, got in enumerate(rows) if got[2] == _FAILED}
        raise RankError(_sentence(window, phase, rows, failed), window, phase, failed) from failure

    def run(
        self,
        window: int,
        phase: str,
        fn: Callable[[], T],
        extra: Callable[[T], int] | None = None,
        what: str = "results",
    ) -> T:
        """``fn()``, then :meth:`agree`: its result when every rank succeeded, else the same
        :class:`RankError` on every rank. A :class:`RankError` from ``fn`` (agreed already)
        is raised as it is. With ``extra``, the ranks must also agree on ``extra(result)``
        (a digest of ``what``, e.g. the peers aggregated), or every rank raises."""
        try:
            result = fn()
        except RankError:
            raise
        except Exception as exc:
            self.agree(window, phase, exc)
            raise  # not reached: agree raises when this rank failed
        values = self.agree(window, phase, extra=extra(result) if extra is not None else 0)
        if len(set(values)) > 1:
            message = f"window {window}, {phase}: the ranks' {what} differ; none steps"
            raise RankError(message, window, phase, {})
        return result

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (equal shapes), stacked in rank order, on the CPU."""
        t = t.to(self.device) if self.device is not None else t
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return torch.stack(out).cpu()

    def _texts(self, mine: bytes, size: int) -> list[str]:
        buf = torch.zeros(max(size, 1), dtype=torch.uint8)
        if mine:
            buf[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
        got = self._all_gather(buf)
        return [bytes(r.numpy().tobytes()).rstrip(b"\0").decode(errors="replace") for r in got]


def digest_int(items: list[str]) -> int:
    """A 56-bit digest of ``items`` (to compare lists across ranks in one integer)."""
    return int.from_bytes(hashlib.sha256("\n".join(items).encode()).digest()[:7], "little")


def _sentence(window: int, phase: str, rows: list[list[int]], failed: dict[int, str]) -> str:
    """Why no rank steps: the same sentence on every rank."""
    places = {(w, p) for w, p, *_ in rows}
    if len(places) > 1:
        where = ", ".join(f"rank {r}: window {w} {PHASES[p]}" for r, (w, p, *_) in enumerate(rows))
        return f"ranks are out of step ({where}); every rank raises, none steps"
    if not failed:
        return f"window {window}, {phase}: a rank lacks data no rank reported; none steps"
    errors = ", ".join(f"rank {r} ({text})" for r, text in failed.items())
    if phase == "commit":
        return (
            f"window {window}: committing failed on {errors}; the ranks' states may now differ: "
            "rejoin them (netcomm.join)"
        )
    return f"window {window}, {phase} failed on {errors}; every rank raises, none steps"


class Attempt:
    """A phase's local work on a rank that must still join the phase's collectives after a
    local failure: :meth:`run` keeps the first failure (and runs nothing after it) instead of
    raising, and :meth:`done` raises it at the end of the phase, before the agreement. With
    ``strict`` (no collectives inside the phase) :meth:`run` raises at once.
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.failure: Exception | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def run(self, fn: Callable[..., T], *args: object) -> T | None:
        """``fn(*args)``, or ``None`` once this rank failed (then or before)."""
        if self.failure is not None:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            if self.strict:
                raise
            self.failure = exc
            return None

    def done(self) -> None:
        """Raise the first failure, if any."""
        if self.failure is not None:
            raise self.failure
