"""Running an outer optimizer from the inner optimizer's step hooks (torchft's pattern).

The training loop does not change: :class:`OuterLoop` registers a post-step hook on the
inner optimizer that runs ``outer.step()`` every H counted inner steps (or, for
:class:`~sparseloco.optim.DataParallel`, a pre-step hook that averages gradients first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from sparseloco.errors import ConfigError
from sparseloco.optim import OuterOptimizer, RoundReport


def skipped_by_grad_scaler(optimizer: Optimizer) -> bool:
    """Whether the ``optimizer.step()`` call running now was told by ``torch.amp.GradScaler``
    to skip (``optimizer.found_inf`` nonzero: set only while the scaler steps a fused or
    capturable optimizer, which then skips its update inside ``step()``)."""
    found_inf = getattr(optimizer, "found_inf", None)
    return found_inf is not None and bool(found_inf)


def apply_due(outer: OuterOptimizer, step: int, apply_after: int | None, *, wait: bool) -> bool:
    """Whether an overlapped ``outer`` applies its in-flight aggregate (``outer.finish()``)
    after inner step ``step`` of a window (counted from 1): at ``apply_after`` (waiting there
    for it when ``wait``), or without ``wait`` at the first step from there on at which its
    round has arrived (:meth:`~sparseloco.optim.OuterOptimizer.round_ready`)."""
    if apply_after is None or outer.in_flight is None:
        return False
    if wait:
        return step == apply_after
    return step >= apply_after and outer.round_ready()


class OuterLoop:
    """Run an outer optimizer from the inner optimizer's hooks; the training loop is unchanged.

    Example::

        outer = SparseLoCo(model.named_parameters(), exchange)
        with OuterLoop(inner_opt, outer, on_round=print):
            for batch in data:
                loss = model(batch).loss
                loss.backward()
                inner_opt.step()      # every H-th call also runs outer.step()
                inner_opt.zero_grad()

    Args:
        inner: the user's inner optimizer (e.g. AdamW).
        outer: a :class:`SparseLoCo`, :class:`DiLoCo` or :class:`DataParallel`.
        sync_every: inner steps per outer round; defaults to ``outer.inner_steps``.
        on_round: called with each :class:`RoundReport`.
        apply_after: with an overlapped outer optimizer, the inner steps of the next window
            after which the in-flight aggregate is applied (``outer.finish()``, Streaming
            DiLoCo's overlap of τ steps); ``None`` (default) or ``sync_every``: at the next
            boundary. The communication then has τ inner steps to finish in.
        wait: with ``apply_after``: ``True`` (default) waits for the aggregate at step τ;
            ``False`` applies it at the first inner step from τ on at which it has arrived
            (:meth:`~sparseloco.optim.OuterOptimizer.round_ready`), else at the boundary, so
            training never waits before the boundary. Every peer's global model stays the
            same, but the step it is applied at, and so each run's trajectory, then depends
            on timing.
        defer_message: with an overlapped outer optimizer whose start rule has v > 0:
            ``False`` (default) has the boundary encode the message and add its step to
            the start; ``True`` leaves the encode to the background round and adds the step
            after the window's first inner step, so the boundary costs what it does with
            v = 0, but that step runs from the start without it. ``benchmarks/utilisation.py``
            measures both (README, "Communication and utilisation"): on its small CPU model
            at 8 × 64 tokens per inner step, where the encode is about 3 % of a round's
            compute, ``True`` lifts utilisation from 0.95 to 0.98 and ends about 1 % higher
            in loss; at 32 × 64 tokens (the encode about 1 %) ``False`` reaches 0.985 and
            the two end within the seeds' spread of each other.

    Inner steps that ``torch.amp.GradScaler`` skips are not counted. The scaler does not call
    ``step()`` of an ordinary optimizer at all when it found Inf/NaN (so no hook runs); a
    fused or capturable optimizer is called with ``optimizer.found_inf`` set and skips inside,
    which the post-step hook reads. :class:`DataParallel` under a GradScaler cannot run from
    these hooks (see its docstring); its hook raises if it sees ``found_inf``.

    With an overlapped outer optimizer (``overlap=True``), ``sync_every`` > 1 and
    ``defer_message=True`` the loop steps it with ``defer_message=True``: the boundary
    leaves encoding this peer's message to the background round, and the start's
    own-message step (v > 0) is added by ``outer.apply_message()``, which the hook calls
    after every inner step of a window (it does something once: after the first, or the
    first after a restart).

    With an overlapped outer optimizer (``overlap=True``) leaving the block without an
    exception calls ``outer.finish()``, which applies the last in-flight aggregate (its
    report goes to ``on_round`` and :attr:`reports` too), so that after the block every
    peer holds the same global model. With ``apply_after=τ`` the reports of the
    ``finish()`` calls τ steps into each window are recorded the same way.
    """

    def __init__(
        self,
        inner: Optimizer,
        outer: OuterOptimizer,
        *,
        sync_every: int | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        apply_after: int | None = None,
        wait: bool = True,
        defer_message: bool = False,
    ) -> None:
        self.inner = inner
        self.outer = outer
        self.sync_every = outer.inner_steps if sync_every is None else sync_every
        if self.sync_every < 1:
            raise ConfigError(f"sync_every must be >= 1, got {self.sync_every}")
        if outer.hook == "pre" and self.sync_every != 1:
            raise ConfigError(f"{type(outer).__name__} averages gradients every step: sync_every=1")
        if apply_after is not None and not outer.overlap:
            raise ConfigError("apply_after needs an overlapped outer optimizer (overlap=True)")
        if apply_after is not None and not 1 <= apply_after <= self.sync_every:
            raise ConfigError(
                f"apply_after must lie in [1, sync_every={self.sync_every}], got {apply_after}"
            )
        if not wait and apply_after is None:
            raise ConfigError("wait=False says how apply_after applies: give apply_after too")
        self.apply_after = None if apply_after == self.sync_every else apply_after
        # the start's own-message step, left to the background, lands after the window's
        # first inner step (a window of one step has none between its boundaries)
        self._defer_message = defer_message and outer.overlap and self.sync_every > 1
        self.wait = wait
        self.on_round = on_round
        self.inner_step_count = 0
        self.reports: list[RoundReport] = []
        self._handle: Any = None

    def _run_outer(self) -> None:
        self._record(self.outer.step(defer_message=self._defer_message))

    def _record(self, report: RoundReport) -> None:
        self.reports.append(report)
        if self.on_round is not None:
            self.on_round(report)

    def _pre(self, optimizer: Optimizer, *_: Any) -> None:
        if hasattr(optimizer, "found_inf"):
            raise ConfigError(
                "DataParallel under torch.amp.GradScaler: the scaler has already checked the "
                "local gradients; call outer.step() between backward and scaler.step(inner) "
                "with DataParallel(nonfinite='propagate') instead of using OuterLoop"
            )
        self._run_outer()

    def _post(self, optimizer: Optimizer, *_: Any) -> None:
        if skipped_by_grad_scaler(optimizer):
            return
        self.inner_step_count += 1
        phase = self.inner_step_count % self.sync_every
        if phase == 0:
            self._run_outer()
            return
        self.outer.apply_message()
        if self._apply_now(phase):
            report = self.outer.finish()
            if report is not None:
                self._record(report)

    def _apply_now(self, phase: int) -> bool:
        return apply_due(self.outer, phase, self.apply_after, wait=self.wait)

    def __enter__(self) -> OuterLoop:
        if self._handle is not None:
            raise ConfigError("OuterLoop is already active")
        if self.outer.hook == "pre":
            self._handle = self.inner.register_step_pre_hook(self._pre)
        else:
            self._handle = self.inner.register_step_post_hook(self._post)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._handle.remove()
        self._handle = None
        if exc_type is None and getattr(self.outer, "overlap", False):
            report = self.outer.finish()
            if report is not None:
                self._record(report)

    def state_dict(self) -> dict[str, Any]:
        return {"inner_step_count": self.inner_step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner_step_count = int(state["inner_step_count"])
