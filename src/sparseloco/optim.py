"""Outer optimizers in ``torch.optim`` style: SparseLoCo and the DiLoCo / data-parallel baselines.

The user keeps their model, inner optimizer and loop. Every H inner steps, one call to
``outer.step()`` runs a whole round and returns a :class:`RoundReport`:

    Δ = θ₀ − θ                               pseudo-gradient
    e ← β·e + Δ;  m = C(e);  e ← e − D(m)    error feedback + compression (SparseLoCo)
    publish m; gather the others' messages
    g = aggregate(D(m₁), …, D(m_R))          peers sorted by id: same result on every peer
    θ ← θ₀ − α·g   (optionally with momentum / Nesterov);  θ₀ ← θ

:class:`~sparseloco.loop.OuterLoop` hooks the inner optimizer's ``step`` so the loop does
not change at all (the pattern of torchft's ``DiLoCo`` context manager).

State per parameter (bytes per parameter of a model stored in ``dtype_bytes`` bytes):

* SparseLoCo: θ₀ snapshot (``dtype_bytes``) + error buffer (4, or 2 with
  ``error_dtype="bfloat16"``) + momentum buffer (4, only when momentum > 0). With
  ``offload=True`` θ₀ and the error buffer live in CPU memory (pinned when CUDA is present)
  and the accelerator holds none of them between rounds.
* DiLoCo: θ₀ (``dtype_bytes``) + Nesterov momentum (4).
* DataParallel: nothing.

During a round (released when it ends): every tensor's float32 aggregate (4 bytes per
parameter, in CPU memory with ``offload=True``), the payloads, and one tensor's scratch copy
of its error buffer. Blocking rounds are atomic: everything that can fail runs before the
commit (error buffers, θ, θ₀, momentum, window), so a failed ``step()`` changes nothing.
Overlapped boundaries are atomic in θ, θ₀, s, momentum and window; their background round
commits the error buffers once its message exists and before its upload, and a retry after
a failure finishes exactly what is left (the same message, each buffer committed once).

Overlapped rounds (``overlap=True``, SparseLoCo and DiLoCo): ``step()`` keeps window k's
progress Δ_k, encodes its message m_k with error feedback when the start rule needs it
(v > 0; else the background round does), applies window k−1's aggregate g_{k−1}
(published, gathered, checked and aggregated on a background thread while window k's inner
steps ran) and returns, while window k's round runs in the background in turn; the
boundary itself does that encode and elementwise work only. With Θ the global model
(``θ₀``), s the point window k's inner steps started from (state ``"start"``) and Θ₀ the
initial model (s₀ = Θ₀), the boundary after window k's inner steps is::

    Δ_k = s_k − θ                            this window's own progress, encoded to m_k
    Θ_k = OuterStep(Θ_{k−1}, g_{k−1})        window k−1's aggregate, one round late (k ≥ 1)
    θ ← s_{k+1} = Θ_k + a·(Θ_k − Θ_{k−1}) − v·α·D(m_k) − w·Δ_k    a prediction of Θ_{k+1}

Window k+1 starts from a prediction of the global model it would start from in blocking
rounds, Θ_{k+1} = OuterStep(Θ_k, g_k), whose g_k is still being gathered: the global model's
last step repeated a times (for the others' part of g_k), v times the step this peer's own
message would make alone (D(m_k): its decoded values, α the outer learning rate) and w
times its dense fresh progress (for its own part); a, v and w are
:class:`~sparseloco.config.OverlapConfig`'s. SparseLoCo's ``overlap=True`` takes a = 0.75,
v = 0.75, w = 0.5. a = 0, v = 0, w = 1 (θ ← Θ_k − Δ_k: the global model plus the own
progress alone) is the rule of earlier versions and DiLoCo's default (its Nesterov step
already runs ahead); with SparseLoCo's sparse updates it ends several per cent above
blocking rounds' loss (``benchmarks/utilisation.py``). The next boundary applies g_k,
publishes m_{k+1} (from Δ_{k+1} = s_{k+1} − θ) and starts window k+2 the same way,
θ ← Θ_{k+1} + a·(Θ_{k+1} − Θ_k) − v·α·D(m_{k+1}) − w·Δ_{k+1}. At the first boundary the
last step is zero: θ ← Θ₀ − v·α·D(m₀) − w·Δ₀.
``finish()`` applies the last aggregate and keeps only the unpublished progress:
Θ ← OuterStep(Θ, g), θ ← Θ + (θ − s), s ← Θ.

``step(defer_message=True)`` (what ``OuterLoop(..., defer_message=True)`` does when windows
have more than one inner step) moves the encode off the boundary: window k+1 starts from
Θ_k + a·(Θ_k − Θ_{k−1}) − w·Δ_k, the background round encodes m_k and computes
v·α·D(m_k), and :meth:`~OuterOptimizer.apply_message`, called after the window's first
inner step, subtracts it from θ and s alike (Δ_{k+1} = s_{k+1} − θ stays the inner steps'
progress alone). Only that first inner step runs from the start without the message's step,
which is the same as the boundary's (m_k is the same message); from that step on the
trajectory is another one. A ``finish()`` before the call drops the step (g_k replaces the
prediction).

Called τ inner steps into window k+1 (``OuterLoop(apply_after=τ)``), ``finish()`` gives
Streaming DiLoCo's overlap of τ steps, with the local progress kept instead of mixed:
Θ_{k+1} = OuterStep(Θ_k, g_k), θ ← Θ_{k+1} + (θ − s_{k+1}), s_{k+1} ← Θ_{k+1}, so the
local model is again the global one plus the current window's progress only, and the next
boundary (nothing in flight) publishes Δ_{k+1} = Θ_{k+1} − θ and starts window k+2 from the
same prediction, Θ_{k+1} + a·(Θ_{k+1} − Θ_k) − v·α·D(m_{k+1}) − w·Δ_{k+1}, the step
Θ_k → Θ_{k+1} kept from the ``finish()`` until then (state ``"last_step"``). The
communication must then fit in τ inner steps (``benchmarks/utilisation.py`` measures the
loss of each way).

What is identical: every peer applies the same aggregate sequence g₀, g₁, … to the same Θ₀
with the same outer step, so Θ (``θ₀``), the momentum buffers, the outer optimizer's state
and the window are bit-identical across peers after every boundary (and every
``finish()``), and θ is too after a ``finish()`` right after a boundary (the end of
training: ``OuterLoop`` does it when its block ends); a follower applying g₀, g₁, … with
:meth:`~OuterOptimizer.apply` holds the same Θ. Between boundaries θ differs by each peer's
own progress, as inside a blocking window. Error feedback acts only on the own Δ sequence
and the messages sent (e ← β·e + Δ_k, e ← e − D(m_k) at window k's boundary), so the delay
does not change it.

Extra state: s (``dtype_bytes`` per parameter), this peer's in-flight payload, the in-flight
window's aggregate from the end of its gather to the next boundary (4 bytes per parameter,
CPU with ``offload``), and Δ_k in float32 from the boundary until its round has committed
the error buffers (4 bytes per parameter, CPU with ``offload``); while a boundary steps,
the float32 start (4 bytes per parameter, holding v·α·D(m_k) until then; deferred, that
step waits in float32 from the background round's encode to :meth:`apply_message`, CPU
with ``offload``) and with a > 0 a float32 copy of Θ_{k−1} beside θ₀ (4 more), which
after a ``finish()`` or ``apply()`` stays as the step taken until the next boundary. The error
buffers belong to the round's thread until it has committed them: ``state_dict()`` waits
for that.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from sparseloco import sharded
from sparseloco.aggregate import iter_aggregate, iter_aggregate_dense
from sparseloco.chunking import ChunkLayout
from sparseloco.codec import (
    CompressedTensor,
    CompressedUpdate,
    commit_tensor,
    decode_tensor,
    encode_tensor,
)
from sparseloco.config import OuterConfig, OverlapConfig, preset
from sparseloco.errors import (
    BackgroundRoundError,
    ConfigError,
    NonFiniteError,
    SparseLoCoError,
    UpdateError,
)
from sparseloco.exchange import DistributedExchange, Exchange, GatherResult, PeerStatus
from sparseloco.kernels import BackendChoice, resolve_backend
from sparseloco.lockstep import Attempt, Lockstep, MissingRankData, digest_int
from sparseloco.names import canonical_name
from sparseloco.payload import (
    DenseUpdate,
    Payload,
    payload_from_tensors,
    validate_payload,
    wire_dtype,
)
from sparseloco.ranks import RankZeroExchange


@dataclass
class RoundReport:
    """What one outer round did, for logs and dashboards.

    ``timings`` holds seconds per phase (check, encode, publish, gather, aggregate_step).
    ``statuses`` maps every other peer to ``ok``/``missing``/``late``/``invalid``/``timeout``
    and ``peers`` lists the ids whose updates were aggregated (this peer included).

    ``window`` is the window this round encoded and ``applied_window`` the one whose
    aggregate it applied: the same window in blocking rounds. In overlapped rounds it is
    the window before (``None`` at the first boundary; ``finish()`` reports the last window
    as both), and ``bytes_sent``, ``bytes_received``, ``statuses``, ``peers``,
    ``pseudo_grad_norm``, ``update_norm`` and the timings
    ``encode``/``publish``/``gather``/``aggregate`` are that applied window's background
    round (``encode``: encoding its message unless the boundary did, and committing the
    error buffers; deferred, also computing the start's message step); ``check`` (finite
    check and keeping Δ), ``encode_message`` (this window's message, encoded at the
    boundary when the start rule needs it: v > 0, unless deferred), ``wait`` (blocked on
    the background round) and ``step`` (outer step and start) are this boundary's;
    ``message_wait`` and ``message`` are waiting for, then adding, the deferred step of
    the applied window's message (:meth:`OuterOptimizer.apply_message`), during the window
    this boundary ends (``message_encode``: making it there, when its round had not).
    """

    window: int
    peer_id: str
    method: str
    backend: str
    backend_reason: str
    bytes_sent: int
    bytes_received: int
    peers: list[str]
    statuses: dict[str, PeerStatus]
    pseudo_grad_norm: float
    update_norm: float
    timings: dict[str, float] = field(default_factory=dict)
    applied_window: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["statuses"] = {p: s.status for p, s in self.statuses.items()}
        return out


NamedParam = tuple[str, torch.Tensor, dict[str, Any]]


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    """‖(t₁, t₂, …)‖₂ over all entries, accumulated in float64."""
    return sum(_sq_norm(t) for t in tensors) ** 0.5


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start


@dataclass
class _Round:
    """An overlapped round done in the background: published, gathered, checked against
    this model and aggregated (every tensor's g on its parameter's device)."""

    window: int
    peers: list[str]
    statuses: dict[str, PeerStatus]
    bytes_sent: int
    bytes_received: int
    aggregates: dict[str, torch.Tensor]
    pseudo_grad_norm: float
    update_norm: float
    timings: dict[str, float]


class _PhaseFailed(Exception):
    """Raised from the background round, naming its phase; the cause is the failure."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        super().__init__(phase)


@dataclass
class _InFlight:
    """The window whose round an overlapped optimizer started and has not applied yet.

    It starts with its own progress ``deltas`` (Δ in float32, by name) and the ``own``
    payload when the boundary encoded it (the start rule needs it: v > 0), else none. The
    round encodes ``own`` if it is missing (``norm``: ‖Δ‖), then commits the error buffers
    tensor by tensor, naming each in ``committed``, and drops ``deltas`` once all are: a
    retry after a failure encodes nothing twice and commits only the rest. ``encoded`` is
    set when that part ends (also by failing), ``published`` when the publish does.
    ``future`` is its background round (``None`` after ``load_state_dict``, or once its
    failure was raised: the next boundary then runs it in the foreground).

    ``deferred``: the boundary left the start's own-message term for
    :meth:`OuterOptimizer.apply_message`; the round then also computes it
    (``message_steps``: v·α·D(m) by name, each dropped once applied; ``message_scales``:
    v·α by name as the boundary read α) and sets ``message_ready`` before it commits the
    error buffers (also by failing). A restored flight makes the step in
    :meth:`OuterOptimizer.apply_message`, for the names in ``message_left`` (``None``:
    all) only: an interrupted apply saved the rest.
    ``message_times``: that call's timings, for the next report.
    """

    window: int
    own: Payload | None
    future: Future[_Round] | None
    deltas: dict[str, torch.Tensor] | None = None
    norm: float = 0.0
    committed: set[str] = field(default_factory=set)
    encoded: threading.Event = field(default_factory=threading.Event)
    published: threading.Event = field(default_factory=threading.Event)
    deferred: bool = False
    message_scales: dict[str, float] = field(default_factory=dict)
    message_steps: dict[str, torch.Tensor] | None = None
    message_left: set[str] | None = None
    message_ready: threading.Event = field(default_factory=threading.Event)
    message_times: dict[str, float] = field(default_factory=dict)


class OuterOptimizer(Optimizer):
    """Common machinery of the outer optimizers (names, θ₀ snapshots, reports, state).

    ``params`` may be ``model.named_parameters()`` (names, without wrapper prefixes, are then
    used on the wire and in errors; see :mod:`sparseloco.names`) or plain tensors / param
    groups (named ``"{group}.{index}"``). Every peer must build its optimizer from the same
    model definition so names and shapes agree; compiled, DDP- or FSDP-wrapped and plain
    peers of one model agree.

    ``outer_optimizer`` replaces the built-in outer step (SGD with the groups' ``lr``,
    ``momentum`` and ``nesterov``) by any ``torch.optim`` optimizer over the same parameters,
    given as an instance or as a callable that builds one from the list of parameters. Each
    round it sees θ = θ₀ and ``.grad`` = the aggregate g (cast to the parameter's dtype; the
    users' ``.grad`` are put back after), takes its step, and θ₀ ← θ. The groups' ``lr``,
    ``momentum`` and ``nesterov`` are then unused.

    ``overlap=True`` overlaps each round's communication with the next window's inner steps
    (see the module docstring for the update rule): ``step()`` keeps Δ, applies the previous
    window's aggregate and returns while this window's publish, gather and aggregation run
    on a background thread; :meth:`finish` applies the last one. It needs an exchange whose
    ``publish`` and ``gather`` may run on another thread beside training (not
    :class:`~sparseloco.exchange.DistributedExchange` or
    :class:`~sparseloco.ranks.RankZeroExchange`, whose collectives would interleave with the
    training's) and unsharded parameters.
    """

    method = "outer"
    #: state keys that belong to this peer alone (not the same on every peer, unlike θ₀ and
    #: momentum): a peer joining from another peer's checkpoint leaves them out.
    peer_local_state: tuple[str, ...] = ()
    #: state keys kept whole (global layout) by an FSDP2 parameter's owner rank alone
    owner_state: tuple[str, ...] = ()
    #: the start rule ``overlap=True`` means
    default_overlap = OverlapConfig()
    #: state keys that live only between two calls (a loaded state without them drops them)
    transient_state: tuple[str, ...] = ("last_step",)
    #: whether :class:`~sparseloco.loop.OuterLoop` runs ``step`` after every H inner steps
    #: ("post") or before every inner step ("pre", gradient averaging).
    hook = "post"

    def __init__(
        self,
        params: Iterable[Any],
        exchange: Exchange,
        defaults: dict[str, Any],
        *,
        inner_steps: int,
        offload: bool = False,
        outer_optimizer: Optimizer | Callable[[list[torch.Tensor]], Optimizer] | None = None,
        overlap: bool | OverlapConfig = False,
    ) -> None:
        if not isinstance(exchange, Exchange):
            raise ConfigError(
                f"exchange must provide peer_id, publish and gather; got {type(exchange).__name__}"
            )
        if overlap and self.hook == "pre":
            raise ConfigError(f"{type(self).__name__} has no round to overlap: overlap=False")
        collective = isinstance(exchange, DistributedExchange | RankZeroExchange)
        if overlap and (collective or getattr(exchange, "lockstep", None) is not None):
            raise ConfigError(
                f"overlap=True runs gather on a background thread; {type(exchange).__name__}'s "
                "gather is a collective that would interleave with the training's: use "
                "overlap=False or an object-storage / in-process exchange"
            )
        self.exchange = exchange
        self.inner_steps = inner_steps
        self.offload = offload
        self.overlap = overlap is not False
        #: where the window after a one-round-late boundary starts (overlapped rounds)
        self.overlap_config = _overlap_config(overlap, self.default_overlap)
        self._inflight: _InFlight | None = None
        self.window = 0
        self.last_report: RoundReport | None = None
        self._names: dict[torch.Tensor, str] = {}
        self.outer_optimizer: Optimizer | None = None
        super().__init__(params, defaults)  # names and initial state: add_param_group
        self.outer_optimizer = self._build_outer(outer_optimizer)

    def _build_outer(
        self, spec: Optimizer | Callable[[list[torch.Tensor]], Optimizer] | None
    ) -> Optimizer | None:
        """The torch.optim optimizer of the outer step (None: the built-in SGD)."""
        if spec is None:
            return None
        mine = [p for _, p, _ in self.named_params()]
        outer = spec if isinstance(spec, Optimizer) else spec(mine)
        if not isinstance(outer, Optimizer):
            raise ConfigError(
                f"outer_optimizer must be a torch.optim.Optimizer or build one, got "
                f"{type(outer).__name__}"
            )
        theirs = [p for g in outer.param_groups for p in g["params"]]
        if {id(p) for p in theirs} != {id(p) for p in mine} or len(theirs) != len(mine):
            raise ConfigError(
                "outer_optimizer must hold exactly the parameters of this outer optimizer"
            )
        return outer

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, plus names and initial state (θ₀).

        A parameter is named by its ``(name, tensor)`` pair, the group's ``"param_names"``,
        or else ``"{group index}.{position}"``, always through
        :func:`~sparseloco.names.canonical_name` (wrapper prefixes such as ``_orig_mod.`` or
        DDP's ``module.`` do not change a parameter's wire identity). The names are kept in
        the group's ``"param_names"`` (so ``state_dict()`` records them). With an
        ``outer_optimizer`` the new parameters are added to it too, with the group's options
        it knows.
        """
        group = dict(param_group)
        items = group["params"]
        items = [items] if isinstance(items, torch.Tensor) else list(items)
        tensors = [it[1] if isinstance(it, tuple) else it for it in items]
        names = self._group_names(group.pop("param_names", None), items)
        taken = set(self._names.values())
        for name in names:
            if name in taken:
                raise ConfigError(f"parameter name {name!r} appears twice")
            taken.add(name)
        group["params"], group["param_names"] = tensors, names
        super().add_param_group(group)
        for name, p in zip(names, tensors, strict=True):
            self._names[p] = name
            with torch.no_grad():
                self._init_state(name, p)
        if self.outer_optimizer is not None:
            known = {k: v for k, v in group.items() if k in self.outer_optimizer.defaults}
            self.outer_optimizer.add_param_group({**known, "params": tensors})

    def _group_names(self, given: list[str] | None, items: list[Any]) -> list[str]:
        pairs = [it[0] for it in items if isinstance(it, tuple)]
        if pairs and (given is not None or len(pairs) != len(items)):
            raise ConfigError(
                "name either every parameter of a group, by (name, tensor) pairs or by "
                "'param_names', or none of them"
            )
        gi = len(self.param_groups)
        names = pairs or given or [f"{gi}.{pi}" for pi in range(len(items))]
        if len(names) != len(items):
            raise ConfigError(f"{len(names)} param_names for {len(items)} parameters")
        return [canonical_name(str(n)) for n in names]

    def named_params(self) -> Iterator[NamedParam]:
        """(name, parameter, group) in a fixed order."""
        for group in self.param_groups:
            for p in group["params"]:
                yield self._names[p], p, group

    def global_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, Θ) per parameter, in :meth:`named_params` order: the global model, which
        every peer that applied the same aggregates holds bit for bit (θ₀).

        In blocking rounds Θ equals the parameters right after ``step()`` or ``apply()``;
        with ``overlap=True`` the parameters also carry this peer's own unapplied progress
        and the start rule's look-ahead (:class:`~sparseloco.config.OverlapConfig`), so Θ
        is what peers compare. Offloaded state stays on
        the CPU. Do not modify the tensors.
        """
        for name, p, _ in self.named_params():
            yield name, self.state[p]["theta0"]

    def _init_state(self, name: str, p: torch.Tensor) -> None:
        if self.offload and sharded.is_sharded(p):
            raise ConfigError(f"{name}: offload=True is not supported for FSDP2 (DTensor) params")
        if self.overlap and sharded.is_sharded(p):
            raise ConfigError(f"{name}: overlap=True is not supported for FSDP2 (DTensor) params")
        self.state[p]["theta0"] = self._store(p.detach().clone())
        if self.overlap:
            self.state[p]["start"] = self._store(p.detach().clone())

    def _origin(self, p: torch.Tensor) -> torch.Tensor:
        """Where this window's inner steps started: θ₀, or s when overlapping."""
        return self.state[p]["start" if self.overlap else "theta0"]

    @property
    def in_flight(self) -> int | None:
        """The window published and not yet applied (overlapped rounds), else ``None``."""
        return None if self._inflight is None else self._inflight.window

    def round_ready(self) -> bool:
        """Overlapped rounds: whether a window is in flight and its background round has
        ended, so :meth:`finish` would apply it (or raise its failure) without waiting."""
        flight = self._inflight
        return flight is not None and flight.future is not None and flight.future.done()

    def wait_published(self, timeout: float | None = None) -> bool:
        """Overlapped rounds: block until the window in flight has been published (or its
        background round failed trying); ``True`` unless ``timeout`` seconds passed first.
        A peer that waits for the next window calls it first: its work on this one is
        done only when the upload is."""
        flight = self._inflight
        if flight is None or flight.future is None:
            return True
        return flight.published.wait(timeout)

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        """Where long-lived state lives: with the parameter, or pinned CPU when offloading."""
        if not self.offload:
            return t
        t = t.to("cpu")
        return t.pin_memory() if torch.cuda.is_available() else t

    def _round_params(self) -> list[NamedParam]:
        """The parameters a round works on (all of them; gradient averaging skips no-grads)."""
        return list(self.named_params())

    def _check_inputs(self, params: list[NamedParam]) -> None:
        """Raise :class:`NonFiniteError` naming the first parameter holding NaN/Inf."""
        _check_all_finite([(name, p) for name, p, _ in params])

    def _backend(self, device: torch.device) -> BackendChoice:
        return BackendChoice("torch", "dense baseline")

    def _encode(
        self, params: list[NamedParam], deltas: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[Payload, float]:
        """This round's payload and the norm of what it was made from; changes no state.
        ``deltas``: this peer's progress by name (an overlapped round encodes the Δ taken at
        its boundary), else computed from the parameters now."""
        raise NotImplementedError

    def _aggregate_tensor(
        self, name: str, updates: dict[str, Payload], device: torch.device
    ) -> torch.Tensor:
        """The float32 aggregate of tensor ``name`` over the selected payloads, on ``device``."""
        raise NotImplementedError

    def _commit_own(
        self,
        params: list[NamedParam],
        own: Payload,
        deltas: Mapping[str, torch.Tensor] | None = None,
        committed: set[str] | None = None,
    ) -> None:
        """Update the state that depends on what this peer sent (SparseLoCo's error buffers);
        with ``committed``, skip the tensors named there and name each one done."""
        del params, own, deltas, committed

    def _apply(self, p: torch.Tensor, group: dict[str, Any], agg: torch.Tensor) -> None:
        self._outer_update(p, group, agg)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, defer_message: bool = False
    ) -> RoundReport:
        """One round: check, encode, publish, gather, aggregate, then commit; returns the report.

        ``defer_message`` (overlapped rounds whose start rule has v > 0; ignored otherwise):
        the boundary neither encodes the message nor adds the own message's step to the
        start; the background round encodes and computes it, and :meth:`apply_message`
        adds it during the window (:class:`~sparseloco.loop.OuterLoop` calls it after every
        inner step, so it lands after the first). The caller must call it before the next
        ``step()``, which otherwise raises.

        With an exchange whose ranks step together (``exchange.lockstep``:
        :class:`~sparseloco.ranks.RankZeroExchange`,
        :class:`~sparseloco.exchange.DistributedExchange`), each phase (check, encode,
        publish-gather-aggregate, commit) ends in an agreement: a failure on any one rank
        makes every rank raise the same :class:`~sparseloco.errors.RankError` there
        (:mod:`sparseloco.lockstep`). Committing is in-place arithmetic after everything
        else; should it fail on a rank (out of memory), every rank raises and says so.

        Atomic: every step that can fail (the finite check, encoding, the exchange, the
        payloads' contents, the aggregate of every tensor and its memory) runs before any
        parameter, θ₀, error buffer, momentum buffer or :attr:`window` changes. A ``step()``
        that raises leaves all of them bit-identical, and calling it again republishes the
        same bytes for the same window.
        """
        if closure is not None:
            raise ConfigError("outer optimizers take no closure")
        if self.overlap:
            return self._step_overlapped(defer_message)
        timer = _Timer()
        window = self.window
        params = self._round_params()
        choice = self._backend(params[0][1].device)
        lock = self._lockstep(params)
        with timer("check"):
            _agreed(lock, window, "check", lambda: self._check_inputs(params))
        with timer("encode"):
            own, source_norm = _agreed(lock, window, "encode", lambda: self._encode(params))
        done = _agreed(
            lock,
            window,
            "gather",
            lambda: self._exchange_round(window, own, params, timer, "aggregate_step"),
            extra=lambda r: digest_int(r.peers),
            what="peers aggregated (a payload usable on some ranks only)",
        )
        with timer("aggregate_step"):
            _agreed(lock, window, "commit", lambda: self._commit(params, own, done.aggregates))
        report = RoundReport(
            window=window,
            peer_id=self.exchange.peer_id,
            method=self.method,
            backend=choice.name,
            backend_reason=choice.reason,
            bytes_sent=done.bytes_sent,
            bytes_received=done.bytes_received,
            peers=done.peers,
            statuses=done.statuses,
            pseudo_grad_norm=source_norm,
            update_norm=done.update_norm,
            timings=timer.times,
            applied_window=window,
        )
        self.last_report = report
        return report

    def _commit(
        self, params: list[NamedParam], own: Payload, aggregates: dict[str, torch.Tensor]
    ) -> None:
        """Error feedback of what was sent, the outer step, the window: the round's changes."""
        self._commit_own(params, own)
        self._take_step(params, aggregates)

    def _lockstep(self, params: list[NamedParam]) -> Lockstep | None:
        """The ranks this optimizer must step with: its exchange's (a collective one), or
        none. FSDP2 parameters need :class:`~sparseloco.ranks.RankZeroExchange` over the
        ranks of their device mesh."""
        lock = getattr(self.exchange, "lockstep", None)
        mesh = sharded.mesh_group(params)
        if mesh is None:
            return lock
        if not isinstance(self.exchange, RankZeroExchange) or sorted(lock.ranks) != sorted(
            dist.get_process_group_ranks(mesh)
        ):
            raise ConfigError(
                "FSDP2 (DTensor) parameters: the ranks of the mesh are one peer; wrap its "
                "exchange in RankZeroExchange over the same ranks"
            )
        return lock

    def _step_overlapped(self, defer_message: bool) -> RoundReport:
        """An overlapped boundary: apply window k−1, start window k's round behind.

        Atomic like a blocking round: the finite check, waiting for window k−1's background
        round (its failure raises :class:`BackgroundRoundError`) and, with v > 0, encoding
        window k's message run before θ, θ₀, s, the momentum buffers, the error buffers, the
        window or the in-flight round change; window k−1's round, once collected, is kept
        done, so a failure after it does not run it again. The boundary keeps Δ_k, encodes
        its message if the start rule needs it (v > 0) and leaves the rest of window k's round
        to a background thread: encoding (v = 0) and committing the error buffers, publish,
        gather, payload checks and aggregate; a retry after a failed one does what is left of
        it in the foreground (publishing the same bytes). With ``defer_message`` the message
        is encoded by that round too, and its step added by :meth:`apply_message`.
        """
        timer = _Timer()
        window = self.window
        params = self._round_params()
        choice = self._backend(params[0][1].device)
        previous = self._inflight
        if previous is not None and previous.deferred:
            raise ConfigError(
                f"window {window}'s start still lacks its own message's step: call "
                "apply_message() during the window (OuterLoop does), or step() without "
                "defer_message from the next window on"
            )
        with timer("check"):
            self._check_inputs(params)
            deltas = {n: self._store(self._own_delta(p)) for n, p, _ in params}  # Δ_k
        done = None
        if previous is not None:
            with timer("wait"):
                done = self._collect(previous, params)
            timer.times |= previous.message_times
        own, norm = None, 0.0
        needs_message = bool(self.overlap_config.message_weight)
        if needs_message and not defer_message:  # the start needs m_k: encode it here
            with timer("encode_message"):  # after the collect: it reads k−1's error buffers
                own, norm = self._encode(params, deltas)
        with timer("step"):
            self._predicted_start(params, deltas, own, None if done is None else done.aggregates)
            for _, p, _ in params:  # s_{k+1} ← θ
                self.state[p]["start"].copy_(p)
        self._inflight = _InFlight(window, own, None, deltas, norm)  # no thread: done later
        if needs_message and defer_message:  # α as of this boundary, whenever it is used
            self._inflight.deferred = True
            self._inflight.message_scales = {n: self._message_scale(g) for n, _, g in params}
        self.window = window + 1
        self._inflight.future = self._launch(self._inflight, params)
        report = self._overlapped_report(window, choice, done, timer)
        self.last_report = report
        return report

    @torch.no_grad()
    def finish(self) -> RoundReport | None:
        """Apply the in-flight window's aggregate (overlapped rounds); ``None`` if none.

        Θ ← OuterStep(Θ, g), θ ← Θ + (θ − s), s ← Θ: the published progress is replaced by
        the aggregate and only inner steps taken since the last ``step()`` stay local, so
        right after a boundary every peer's θ becomes the same global model. Call it after
        the last round (:class:`~sparseloco.loop.OuterLoop` does when its block ends) or to
        drain before :meth:`apply`. Atomic; a failed background round raises
        :class:`BackgroundRoundError` and the next call does it again in the foreground.
        """
        if self._inflight is None:
            return None
        timer = _Timer()
        params = self._round_params()
        choice = self._backend(params[0][1].device)
        with timer("wait"):
            done = self._collect(self._inflight, params)
        self._inflight.deferred = False  # a step not yet added is dropped: g_k replaces it
        timer.times |= self._inflight.message_times
        with timer("step"):
            self._keep_local_progress(params, done.aggregates)
        self._inflight = None
        report = self._overlapped_report(done.window, choice, done, timer)
        self.last_report = report
        return report

    @torch.no_grad()
    def apply_message(self) -> bool:
        """Add the own message's step that a ``step(defer_message=True)`` left out of the
        start: θ ← θ − v·α·D(m_k) and s ← s − v·α·D(m_k), so the window's progress
        Δ = s − θ is unchanged. Waits for the background round to have encoded m_k
        (timings ``message_wait`` and ``message`` go to the next boundary's report).
        Returns whether it added a step (``False``: none is pending). Where the background
        round did not make the step (it failed first, or the window was restored from a
        checkpoint), it is made here, the message encoded first if it is not yet; a
        failure then raises with the step still pending (call it again), and the round's
        own failure is raised by the next boundary. Call it during the window, after an
        inner step, at a point fixed by the loop (the trajectory depends on it); a
        :meth:`finish` before it drops the step (the aggregate replaces the prediction).
        Atomic per tensor: a retry after a failure adds only the tensors not yet done.
        In a bfloat16 model θ and s are each rounded once more at the message's
        coordinates, so Δ there moves by up to a unit in the last place, as an inner
        step's rounding does.
        """
        flight = self._inflight
        if flight is None or not flight.deferred:
            return False
        params = self._round_params()
        timer = _Timer()
        if flight.future is not None:
            with timer("message_wait"):
                flight.message_ready.wait()  # set also when the round failed before it
        if flight.message_steps is None:  # the round failed first, or was restored
            with timer("message_encode"):
                if flight.own is None:  # its thread is past the encode: message_ready
                    flight.own, flight.norm = self._encode(params, flight.deltas)
                flight.message_steps = self._message_steps(
                    params, flight.own, flight.message_scales, flight.message_left
                )
        steps = flight.message_steps
        with timer("message"):
            for name, p, _ in params:
                if name in steps:
                    start = self.state[p]["start"]  # on the CPU with offload
                    on_p, on_start = steps[name].to(p.device), steps[name].to(start.device)
                    p.sub_(on_p)
                    start.sub_(on_start)
                    del steps[name]
        flight.deferred, flight.message_steps = False, None
        flight.message_times = timer.times
        return True

    def _message_steps(
        self,
        params: list[NamedParam],
        own: Payload,
        scales: Mapping[str, float],
        names: set[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """v·α·D(m) of every tensor (of ``names`` only, if given), by name (CPU with
        ``offload``); ``scales``: v·α by name, as the boundary read α."""
        return {
            n: self._store(self._message_step(n, p, own, scales[n]))
            for n, p, _ in params
            if names is None or n in names
        }

    def _overlapped_report(
        self, window: int, choice: BackendChoice, done: _Round | None, timer: _Timer
    ) -> RoundReport:
        """This boundary's timings, the applied window's round for the rest."""
        return RoundReport(
            window=window,
            peer_id=self.exchange.peer_id,
            method=self.method,
            backend=choice.name,
            backend_reason=choice.reason,
            bytes_sent=0 if done is None else done.bytes_sent,
            bytes_received=0 if done is None else done.bytes_received,
            peers=[] if done is None else done.peers,
            statuses={} if done is None else done.statuses,
            pseudo_grad_norm=0.0 if done is None else done.pseudo_grad_norm,
            update_norm=0.0 if done is None else done.update_norm,
            timings=timer.times | ({} if done is None else done.timings),
            applied_window=None if done is None else done.window,
        )

    def _predicted_start(
        self,
        params: list[NamedParam],
        deltas: dict[str, torch.Tensor],
        own: Payload | None,
        aggregates: dict[str, torch.Tensor] | None,
    ) -> None:
        """θ ← Θ_k + a·(Θ_k − Θ_{k−1}) − v·α·D(m_k) − w·Δ_k
        (:class:`~sparseloco.config.OverlapConfig`; m_k = ``own``, ``None`` when v = 0 or
        the message's step is deferred: the term is then left out).

        With ``aggregates`` (g_{k−1}, one round late) this boundary takes the step
        Θ_k = OuterStep(Θ_{k−1}, g_{k−1}); without, Θ_k is θ₀ as it is (= s_k) and its last
        step is the one a :meth:`finish` or :meth:`apply` since the last boundary took
        (state ``"last_step"``), if any.
        """
        assert self.overlap_config is not None
        a, w = self.overlap_config.extrapolation, self.overlap_config.own_weight
        if aggregates is not None:
            starts = {}  # −v·α·D(m_k) (v > 0), else uninitialised: each start is built in it
            for name, p, group in params:
                starts[name] = (
                    torch.empty_like(p, dtype=torch.float32)
                    if own is None
                    else self._message_step(name, p, own, self._message_scale(group)).neg_()
                )
            last = self._outer_step_taken(params, aggregates)
            for name, p, _ in params:
                theta0 = self.state[p]["theta0"]
                start = starts.pop(name)
                if own is None:
                    start.copy_(theta0)
                else:
                    start.add_(theta0.to(p.device, non_blocking=self.offload))
                if last:
                    start.add_(last[name].to(p.device), alpha=a)
                p.copy_(start.sub_(deltas[name].to(p.device), alpha=w))
                self.state[p].pop("last_step", None)
            return
        # θ = s_k − Δ_k = Θ_k − Δ_k: only the changes to it, all computed before any is made
        changes = {}
        for name, p, group in params:
            last_step = self.state[p].get("last_step")
            change = None
            if last_step is not None and a:
                change = last_step.to(p.device, torch.float32, copy=True).mul_(a)
            if w != 1.0:
                kept = deltas[name].to(p.device, torch.float32, copy=True).mul_(1.0 - w)
                change = kept if change is None else change.add_(kept)
            if own is not None:
                message = self._message_step(name, p, own, self._message_scale(group))
                change = message.neg_() if change is None else change.sub_(message)
            changes[name] = change
        for name, p, _ in params:
            if changes[name] is not None:
                p.add_(changes[name])
            self.state[p].pop("last_step", None)

    def _message_step(self, name: str, p: torch.Tensor, own: Payload, scale: float) -> torch.Tensor:
        """v·α·D(m_k) in float32 on ``p``'s device: the outer step this peer's own message
        would make alone (its aggregate with no other peer), times v (``scale``: v·α)."""
        alone = self._decoded_own(name, own, p.device)
        return alone.to(torch.float32, copy=True).mul_(scale)

    def _message_scale(self, group: dict[str, Any]) -> float:
        """v·α for a parameter of ``group``."""
        assert self.overlap_config is not None
        return float(self.overlap_config.message_weight * group["lr"])

    def _decoded_own(self, name: str, own: Payload, device: torch.device) -> torch.Tensor:
        """D(m) of tensor ``name``: the aggregate of this peer's payload alone."""
        return self._aggregate_tensor(name, {self.exchange.peer_id: own}, device)

    def _outer_step_taken(
        self, params: list[NamedParam], aggregates: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """The outer step Θ ← OuterStep(Θ, g); returns Θ_new − Θ_old in float32 where the
        start rule extrapolates it (a > 0), else ``None``."""
        assert self.overlap_config is not None
        if not self.overlap_config.extrapolation:
            self._outer_step(params, aggregates)
            return None
        steps = {n: self.state[p]["theta0"].to(torch.float32, copy=True) for n, p, _ in params}
        self._outer_step(params, aggregates)
        for name, p, _ in params:  # Θ_old → Θ_new − Θ_old, in place
            torch.sub(self.state[p]["theta0"], steps[name], out=steps[name])
        return steps

    def _keep_local_progress(
        self, params: list[NamedParam], aggregates: dict[str, torch.Tensor]
    ) -> None:
        """Θ ← OuterStep(Θ, g); θ ← Θ + (θ − s); s ← Θ (overlapped rounds); the step is kept
        for the next boundary's start (state ``"last_step"``) where that extrapolates it."""
        local = {n: self._store(-self._own_delta(p)) for n, p, _ in params}  # θ − s
        last = self._outer_step_taken(params, aggregates)
        for name, p, _ in params:
            theta0 = self.state[p]["theta0"]
            p.copy_(theta0.to(p.device, torch.float32) + local[name].to(p.device))
            self.state[p]["start"].copy_(theta0)
            if last:
                self.state[p]["last_step"] = last[name]

    def _own_delta(self, p: torch.Tensor) -> torch.Tensor:
        """Δ = origin − θ in float32 on ``p``'s device (origin: θ₀, or s when overlapping)."""
        return self._origin(p).to(p.device, torch.float32) - p.to(torch.float32)

    def _kept(self, deltas: Mapping[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``p`` → its Δ as ``deltas`` kept it (an overlapped round's), on ``p``'s device."""
        return lambda p: deltas[self._names[p]].to(p.device)

    def _encode_flight(self, flight: _InFlight, params: list[NamedParam]) -> None:
        """Encode the in-flight window's Δ with error feedback unless the boundary did, make
        the start's message step if the boundary deferred it, and commit the error buffers
        (only the round's thread touches them until it is collected)."""
        try:
            if flight.own is None:
                flight.own, flight.norm = self._encode(params, flight.deltas)
            if flight.deferred and flight.message_steps is None:
                flight.message_steps = self._message_steps(
                    params, flight.own, flight.message_scales
                )
            flight.message_ready.set()  # before the commit: the window waits for it
            if flight.deltas is not None:  # else committed before
                self._commit_own(params, flight.own, flight.deltas, flight.committed)
                flight.deltas = None
        finally:
            flight.message_ready.set()
            flight.encoded.set()

    @staticmethod
    def _wholes(
        params: list[NamedParam],
        local: Callable[[torch.Tensor], torch.Tensor],
        dtype: torch.dtype | None,
        attempt: Attempt,
    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """(name, p, the whole of ``local(p)``) one parameter at a time; a DTensor's is
        all-gathered, on every rank even after a local failure kept by ``attempt`` (the
        whole is then ``None``). ``dtype``: that of ``local(p)`` (``None``: ``p``'s)."""
        for name, p, _ in params:
            part = attempt.run(local, p)
            if sharded.is_sharded(p):
                whole = sharded.whole_or_join(part, p, dtype or p.dtype)
                part = None if attempt.failed else whole
            yield name, p, part

    def _exchange_round(
        self,
        window: int,
        own: Payload,
        params: list[NamedParam],
        timer: _Timer,
        aggregate_phase: str = "aggregate",
        *,
        pseudo_grad_norm: float = 0.0,
        published: threading.Event | None = None,
    ) -> _Round:
        """Publish ``own`` (then set ``published``), gather, check the payloads and
        aggregate them; changes no state (the aggregates depend on the parameters' names,
        shapes and devices only)."""
        with timer("publish"):
            sent = self.exchange.publish(window, own)
        if published is not None:
            published.set()
        with timer("gather"):
            gathered = self.exchange.gather(window)
            updates, statuses = self._usable(gathered, own, self._shapes(params))
        with timer(aggregate_phase):
            aggregates, norm = self._aggregate_all(updates, params)
        return _Round(
            window,
            sorted(updates),
            statuses,
            sent,
            gathered.bytes_received,
            aggregates,
            pseudo_grad_norm,
            norm,
            timer.times,
        )

    def _background_round(self, flight: _InFlight, params: list[NamedParam]) -> _Round:
        """Encode ``flight`` (if not yet) and :meth:`_exchange_round` it, a failure naming the
        phase (the last one timed); ``published`` is set once the upload is over, whatever
        became of it."""
        timer = _Timer()
        try:
            with timer("encode"):
                self._encode_flight(flight, params)
            assert flight.own is not None
            return self._exchange_round(
                flight.window,
                flight.own,
                params,
                timer,
                pseudo_grad_norm=flight.norm,
                published=flight.published,
            )
        except Exception as exc:
            raise _PhaseFailed(list(timer.times)[-1]) from exc
        finally:
            flight.published.set()

    def _launch(self, flight: _InFlight, params: list[NamedParam]) -> Future[_Round]:
        """Start ``flight``'s background round on a daemon thread."""
        future: Future[_Round] = Future()

        def run() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(self._background_round(flight, params))
            except BaseException as exc:  # handed to the next boundary
                future.set_exception(exc)

        threading.Thread(target=run, name=f"sparseloco-round-{flight.window}", daemon=True).start()
        return future

    def _collect(self, flight: _InFlight, params: list[NamedParam]) -> _Round:
        """The in-flight window's round: the background one, or one run here when there is
        none (after ``load_state_dict``, or after its failure was raised)."""
        future, flight.future = flight.future, None  # a failure is raised once
        where = "in the background" if future is not None else "at the boundary"
        try:
            done = self._background_round(flight, params) if future is None else future.result()
        except _PhaseFailed as exc:
            cause = exc.__cause__
            raise BackgroundRoundError(
                f"{exc.phase} failed {where}: {type(cause).__name__}: {cause}",
                window=flight.window,
                phase=exc.phase,
            ) from cause
        if future is None:  # run here: kept as a done one
            future = Future()
            future.set_result(done)
        flight.future = future  # kept until the commit: a failure after it reuses the result
        return done

    @torch.no_grad()
    def apply(
        self,
        updates: Mapping[str, Payload],
        *,
        on_aggregate: Callable[[dict[str, torch.Tensor]], None] | None = None,
    ) -> float:
        """Take the outer step of already-gathered payloads without publishing anything.

        For a window this peer missed (catching up), and for followers that never train
        (a validator's copy of the model): θ ← θ₀ − α·aggregate(updates), θ₀ ← θ, exactly the
        step the peers took. Raises a typed error, before changing anything, if a payload
        does not fit this model or is not decodable. Returns the norm of the aggregate;
        ``on_aggregate`` receives the aggregate (name → g) before the step, for callers
        that also need it (a validator remembering it for replay checks).

        With ``overlap=True`` nothing may be in flight (call :meth:`finish` first) and inner
        steps taken since the last boundary stay local: θ ← θ₀ + (θ − s). The ranks of a
        multi-process peer (``exchange.lockstep``) call it together with the same updates;
        a failure on one makes every rank raise the same :class:`~sparseloco.errors.RankError`.
        """
        if self._inflight is not None:
            raise ConfigError(
                f"window {self._inflight.window} is in flight; call finish() before apply()"
            )
        params = self._round_params()
        window = self.window
        lock = self._lockstep(params)
        aggregates, norm = _agreed(lock, window, "apply", lambda: self._checked_aggregate(updates))
        if on_aggregate is not None and updates:
            on_aggregate(aggregates)
        if self.overlap:
            self._keep_local_progress(params, aggregates)
            self.window += 1
        else:
            _agreed(lock, window, "commit", lambda: self._take_step(params, aggregates))
        return norm

    def _checked_aggregate(
        self, updates: Mapping[str, Payload]
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Every payload checked against this model, then aggregated (changes nothing)."""
        params = self._round_params()
        shapes = self._shapes(params)
        for payload in updates.values():
            self._check(payload, shapes)
            validate_payload(payload)
        return self._aggregate_all(dict(updates), params)

    @staticmethod
    def _shapes(params: list[NamedParam]) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p, _ in params}

    def _usable(
        self, gathered: GatherResult, own: Payload, shapes: dict[str, tuple[int, ...]]
    ) -> tuple[dict[str, Payload], dict[str, PeerStatus]]:
        """Own payload (if selected) plus gathered ones that match this model.

        Gathered payloads of the wrong kind, codec, names or shapes, or whose contents are
        not decodable (:func:`validate_payload`, unless the exchange already ran it:
        ``gathered.contents_validated``), become ``invalid``.
        """
        statuses = dict(gathered.statuses)
        updates: dict[str, Payload] = {self.exchange.peer_id: own} if gathered.self_selected else {}
        for peer, payload in gathered.updates.items():
            try:
                self._check(payload, shapes)
                if not gathered.contents_validated:
                    validate_payload(payload)
            except SparseLoCoError as exc:
                old = statuses.get(peer, PeerStatus(peer, "ok"))
                statuses[peer] = PeerStatus(peer, "invalid", str(exc), old.nbytes, old.latency_s)
                continue
            updates[peer] = payload
        return updates, statuses

    def _check(self, payload: Payload, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise unless ``payload`` is a dense update with exactly these names and shapes."""
        if not isinstance(payload, DenseUpdate):
            raise UpdateError(f"expected a dense payload, got {payload.kind}")
        payload.check_matches(shapes)

    def _aggregate_all(
        self, updates: dict[str, Payload], params: list[NamedParam]
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Every tensor's aggregate g, each on its own parameter's device (CPU when
        offloading; this rank's shard of it for a DTensor parameter), and ‖g‖.

        All of them exist before the step changes anything, so a failure here (a bad
        payload, out of memory) leaves the state as it was. With no selected update the
        aggregate is zero for every tensor (θ returns to θ₀).
        """
        out, norm_sq = {}, 0.0
        for name, p, _ in params:
            if updates:
                agg = self._aggregate_tensor(name, updates, p.device)
            else:
                agg = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            norm_sq += _sq_norm(agg)
            out[name] = self._store(sharded.shard_like(agg, p))
        return out, norm_sq**0.5

    def _take_step(self, params: list[NamedParam], aggregates: dict[str, torch.Tensor]) -> None:
        """The commit: apply every aggregate, then advance :attr:`window`."""
        self._outer_step(params, aggregates)
        self.window += 1

    def _outer_step(self, params: list[NamedParam], aggregates: dict[str, torch.Tensor]) -> None:
        """Every parameter's outer step: θ ← OuterStep(θ₀, g), θ₀ ← θ."""
        if self.outer_optimizer is None:
            for name, p, group in params:
                self._apply(p, group, aggregates[name].to(p.device, non_blocking=True))
        else:
            self._torch_outer_step(params, aggregates)

    def _torch_outer_step(
        self, params: list[NamedParam], aggregates: dict[str, torch.Tensor]
    ) -> None:
        """θ ← θ₀, ``.grad`` ← g, ``outer_optimizer.step()``, θ₀ ← θ; ``.grad`` restored."""
        assert self.outer_optimizer is not None
        saved = [p.grad for _, p, _ in params]
        for name, p, _ in params:
            p.copy_(self.state[p]["theta0"])
            p.grad = aggregates[name].to(p.device, p.dtype)
        try:
            self.outer_optimizer.step()
        finally:
            for (_, p, _), grad in zip(params, saved, strict=True):
                p.grad = grad
        for _, p, _ in params:
            self.state[p]["theta0"].copy_(p)

    def _outer_update(self, p: torch.Tensor, group: dict[str, Any], agg: torch.Tensor) -> None:
        """θ ← θ₀ − α·g (g through momentum/Nesterov when enabled); θ₀ ← θ."""
        state = self.state[p]
        momentum = group.get("momentum", 0.0)
        direction = agg
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = self._store(agg.clone())
            else:
                buf.mul_(momentum).add_(agg.to(buf.device))
            buf_d = buf.to(agg.device, non_blocking=True)
            direction = agg.add(buf_d, alpha=momentum) if group.get("nesterov") else buf_d
        theta0 = state["theta0"].to(p.device, torch.float32, non_blocking=True)
        p.copy_(theta0.sub_(direction, alpha=group["lr"]))
        state["theta0"].copy_(p)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict plus ``"outer"``: window, method, the outer
        optimizer's state and, when overlapping, the in-flight round (its window, this
        peer's payload as flat tensors once encoded, and the Δ of every tensor whose error
        buffer its round has not committed yet): after :meth:`load_state_dict` the next
        boundary finishes that round (the same bytes), gathers and aggregates it. With a
        round in flight in the background it first waits for the round's encode and commit.
        """
        flight = self._inflight
        if flight is not None and flight.future is not None:
            flight.encoded.wait()  # the error buffers are final once its round committed them
        sd = super().state_dict()
        sd["outer"] = {"window": self.window, "method": self.method}
        if self.outer_optimizer is not None:
            sd["outer"]["outer_optimizer"] = self.outer_optimizer.state_dict()
        if self.overlap:
            sd["outer"]["overlap"] = True
            if flight is not None:
                sd["outer"]["in_flight"] = self._flight_state(flight)
        return sd

    @staticmethod
    def _flight_state(flight: _InFlight) -> dict[str, Any]:
        """The in-flight window, its payload once encoded, and its Δ of the tensors whose
        error buffers are not committed yet (all of them before the encode)."""
        out: dict[str, Any] = {"window": flight.window, "norm": flight.norm}
        if flight.deferred:  # apply_message() remakes the step from the payload
            out["deferred"] = True
            out["message_scales"] = dict(flight.message_scales)
            left = flight.message_left if flight.message_steps is None else flight.message_steps
            if left is not None:
                out["message_left"] = sorted(left)
        if flight.own is not None:
            tensors, meta = flight.own.to_tensors()
            out.update(tensors=tensors, meta=dict(meta))
        if flight.deltas is not None:
            out["deltas"] = {n: d for n, d in flight.deltas.items() if n not in flight.committed}
            out["committed"] = sorted(flight.committed)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore groups' hyperparameters and every state tensor in place.

        Unlike ``torch.optim.Optimizer.load_state_dict`` this keeps each buffer's own dtype and
        device (a float32 error buffer of a bfloat16 model stays float32; offloaded state
        stays on the CPU). Shapes are checked; nothing changes if any check fails. With FSDP2
        (DTensor) parameters a saved full tensor is laid out like its parameter and an error
        buffer (global layout) kept by its owner rank only.
        """
        running = self._inflight is not None and self._inflight.future is not None
        if running and not self._inflight.future.done():  # type: ignore[union-attr]
            raise ConfigError(
                f"window {self.in_flight}'s round is still running in the background; call "
                "finish() (or wait for it) before load_state_dict()"
            )
        outer = state_dict.get("outer", {})
        if outer.get("method") != self.method:
            raise ConfigError(
                f"state_dict is for {outer.get('method')!r}, this optimizer is {self.method!r}"
            )
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(g["params"]) != len(h["params"])
            for g, h in zip(groups, self.param_groups, strict=True)
        ):
            raise ConfigError("state_dict's parameter groups do not match this optimizer's")
        for saved, group in zip(groups, self.param_groups, strict=True):
            if saved.get("param_names", group["param_names"]) != group["param_names"]:
                raise ConfigError(
                    f"state_dict's parameter names {saved['param_names']} differ from this "
                    f"optimizer's {group['param_names']}"
                )
        if (self.outer_optimizer is None) != ("outer_optimizer" not in outer):
            raise ConfigError("state_dict and this optimizer disagree on having an outer_optimizer")
        if bool(outer.get("overlap", False)) != self.overlap:
            raise ConfigError(
                f"state_dict is from an optimizer with overlap={bool(outer.get('overlap'))}, "
                f"this one has overlap={self.overlap}"
            )
        flight = self._saved_flight(outer.get("in_flight"))
        saved_state = state_dict["state"]
        plan: list[tuple[torch.Tensor, str, torch.Tensor]] = []
        dropped: list[tuple[torch.Tensor, str]] = []  # transient keys the saved state lacks
        for saved, group in zip(groups, self.param_groups, strict=True):
            for pid, p in zip(saved["params"], group["params"], strict=True):
                kept = saved_state.get(pid, {})
                dropped += [(p, key) for key in self.transient_state if key not in kept]
                for key, value in kept.items():
                    current = self.state[p].get(key)
                    if current is not None and tuple(current.shape) != tuple(value.shape):
                        raise ConfigError(
                            f"{self._names[p]}: saved {key} has shape {tuple(value.shape)}, "
                            f"expected {tuple(current.shape)}"
                        )
                    plan.append((p, key, value))
        for saved, group in zip(groups, self.param_groups, strict=True):
            for key, value in saved.items():
                if key not in ("params", "param_names"):
                    group[key] = value
        for p, key in dropped:
            self.state[p].pop(key, None)
        owned = self._owned()
        for p, key, value in plan:
            if key in self.owner_state and sharded.is_sharded(p) and self._names[p] not in owned:
                continue  # another rank owns it
            value = value if key in self.owner_state else sharded.to_layout(value, p)
            current = self.state[p].get(key)
            if current is None:
                self.state[p][key] = self._store(value.to(p.device).clone())
            else:
                current.copy_(value)
        if self.outer_optimizer is not None:
            self.outer_optimizer.load_state_dict(outer["outer_optimizer"])
        self.window = int(outer["window"])
        self._inflight = flight

    def _owned(self) -> set[str]:
        """The FSDP2 parameters whose :attr:`owner_state` this rank holds (by name)."""
        params = self._round_params()
        group = sharded.mesh_group(params)
        if group is None:
            return set()
        rank = dist.get_rank(group)
        return {
            n for n, r in sharded.owners(params, dist.get_world_size(group)).items() if r == rank
        }

    def _saved_flight(self, saved: dict[str, Any] | None) -> _InFlight | None:
        """The in-flight round of a state dict, checked against this model."""
        if saved is None:
            return None
        shapes = self._shapes(self._round_params())
        own = None
        if "tensors" in saved:
            own = payload_from_tensors(saved["tensors"], saved["meta"])
            self._check(own, shapes)
            validate_payload(own)
        flight = _InFlight(int(saved["window"]), own, None, norm=float(saved.get("norm", 0.0)))
        flight.deferred = saved.get("deferred", False)
        if not isinstance(flight.deferred, bool):
            raise ConfigError("state_dict's in-flight 'deferred' must be a bool")
        scales, left = saved.get("message_scales", {}), saved.get("message_left")
        if flight.deferred and not (
            isinstance(scales, dict)
            and set(scales) == set(shapes)
            and all(type(v) is float and math.isfinite(v) for v in scales.values())
        ):
            raise ConfigError(
                "state_dict's in-flight 'message_scales' must map every parameter to a finite float"
            )
        if left is not None and not (
            isinstance(left, list) and all(isinstance(n, str) and n in shapes for n in left)
        ):
            raise ConfigError("state_dict's in-flight 'message_left' must list parameter names")
        flight.message_scales = scales if flight.deferred else {}
        flight.message_left = None if left is None else set(left)
        if "deltas" in saved:  # error buffers still to commit (all of them if not encoded)
            committed = set(saved.get("committed", ()))
            deltas = saved["deltas"]
            expected = {n: shape for n, shape in shapes.items() if n not in committed}
            if {n: tuple(d.shape) for n, d in deltas.items()} != expected or (
                own is None and committed
            ):
                raise ConfigError("state_dict's in-flight progress does not fit this model")
            flight.deltas = {
                n: self._store(d.to(torch.float32, copy=True)) for n, d in deltas.items()
            }
            flight.committed = committed
        elif own is None:
            raise ConfigError("state_dict's in-flight round has neither payload nor progress")
        return flight


class SparseLoCo(OuterOptimizer):
    """SparseLoCo outer optimizer (arXiv 2508.15706), as run for Covenant-72B.

    Args:
        params: the model's parameters, preferably ``model.named_parameters()``.
        exchange: where updates are published and gathered (:class:`InProcessExchange`,
            :class:`DistributedExchange`, or netcomm's object-storage exchange).
        config: an :class:`OuterConfig` or a preset name (``"covenant-72b"`` by default).
        outer_optimizer: a ``torch.optim`` optimizer (or a callable building one from the
            parameters) for the outer step instead of the built-in SGD (see
            :class:`OuterOptimizer`); the config's ``lr``/``momentum``/``nesterov`` are then unused.
        overlap: overlap each round's gather with the next window's inner steps (the
            one-round-delayed outer step of the module docstring); default off (blocking).
            ``True`` or an :class:`~sparseloco.config.OverlapConfig`, which sets where the
            window after a one-round-late boundary starts.
        **overrides: fields of the config to change, e.g. ``lr=0.4`` or
            ``codec={"topk": 128}``.

    ``step()`` runs one round (see the module docstring) and returns a :class:`RoundReport`.
    A blocking round is atomic: one that raises (NaN/Inf in θ, the exchange, out of memory
    while aggregating) leaves θ, θ₀, the error and momentum buffers and the window
    bit-identical, and a retry publishes the same bytes again (overlapped rounds: see the
    module docstring).
    """

    method = "sparseloco"
    peer_local_state = ("error",)  # the error-feedback buffer
    owner_state = ("error",)

    def __init__(
        self,
        params: Iterable[Any],
        exchange: Exchange,
        config: OuterConfig | str = "covenant-72b",
        *,
        outer_optimizer: Optimizer | Callable[[list[torch.Tensor]], Optimizer] | None = None,
        overlap: bool | OverlapConfig = False,
        **overrides: Any,
    ) -> None:
        cfg = preset(config) if isinstance(config, str) else config
        if overrides:
            cfg = cfg.replace(**overrides)
        self.config = cfg
        self._error_dtype = getattr(torch, cfg.error_dtype)
        self._pending: dict[str, torch.Tensor] = {}  # owned DTensor params' new error buffers
        super().__init__(
            params,
            exchange,
            {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov},
            inner_steps=cfg.inner_steps,
            offload=cfg.offload,
            outer_optimizer=outer_optimizer,
            overlap=overlap,
        )

    def _error_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """The error-feedback buffer of ``p``, created by the first committed round so that
        followers that only :meth:`apply` aggregates never hold one."""
        state = self.state[p]
        if "error" not in state:
            state["error"] = self._store(self._zero_error(p))
        return state["error"]

    def _zero_error(self, p: torch.Tensor) -> torch.Tensor:
        layout = ChunkLayout.for_shape(p.shape, self.config.codec.chunk_size)
        return torch.zeros(layout.buffer_shape, dtype=self._error_dtype, device=p.device)

    def _check(self, payload: Payload, shapes: dict[str, tuple[int, ...]]) -> None:
        if not isinstance(payload, CompressedUpdate):
            raise UpdateError(f"expected a sparse payload, got {payload.kind}")
        payload.check_matches(shapes, self.config.codec)

    def _backend(self, device: torch.device) -> BackendChoice:
        codec = self.config.codec
        return resolve_backend(codec.backend, device, codec.chunk_size**2, codec.value_coding)

    def _encode(
        self, params: list[NamedParam], deltas: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[Payload, float]:
        """Δ through error feedback and the codec, one tensor at a time, on a scratch copy of
        each error buffer: the buffers themselves change only in :meth:`_commit_own`.

        A DTensor parameter's Δ is all-gathered and encoded by its owner rank, which keeps
        the new error buffer pending until the commit (see :mod:`sparseloco.sharded`).
        """
        group = sharded.mesh_group(params)
        owner = sharded.owners(params, dist.get_world_size(group)) if group else {}
        attempt = Attempt(strict=group is None)
        self._pending = {}
        tensors = {}
        pg_sq = 0.0
        local = self._own_delta if deltas is None else self._kept(deltas)
        for name, p, delta in self._wholes(params, local, torch.float32, attempt):
            if delta is not None:
                pg_sq += attempt.run(_sq_norm, delta) or 0.0
            if name in owner:
                ct = self._encode_owned(name, p, delta, owner[name], group, attempt)
            else:
                ct = attempt.run(self._encode_local, name, p, delta)
            tensors[name] = ct
            del delta
        attempt.done()
        codec = self.config.codec
        return CompressedUpdate(codec=codec, tensors=_all_sent(tensors)), pg_sq**0.5

    def _encode_local(self, name: str, p: torch.Tensor, delta: torch.Tensor) -> CompressedTensor:
        return encode_tensor(name, delta, self._scratch(p), self.config.codec)

    def _scratch(self, p: torch.Tensor) -> torch.Tensor:
        """A copy of ``p``'s error buffer (zeros before the first round) on ``p``'s device."""
        error = self.state[p].get("error")
        return self._zero_error(p) if error is None else error.to(p.device, copy=True)

    def _encode_owned(
        self,
        name: str,
        p: torch.Tensor,
        delta: torch.Tensor | None,
        owner: int,
        group: Any,
        attempt: Attempt,
    ) -> CompressedTensor | None:
        """The owner encodes the full Δ (it holds the error buffer) and every rank gets the
        result (one broadcast); ``None`` on every rank when the owner failed (it sends
        nothing and reports why in the phase's agreement)."""
        ct, mine = None, dist.get_rank(group) == owner
        if mine and delta is not None:
            ct = attempt.run(self._encode_as_owner, name, p, delta)
        blob = sharded.broadcast_compressed(name, ct, self.config.codec, owner, group, p.device)
        if mine or not blob:
            return ct
        return attempt.run(sharded.load_compressed, name, blob, p.device)

    def _encode_as_owner(self, name: str, p: torch.Tensor, delta: torch.Tensor) -> CompressedTensor:
        scratch = self._scratch(p)
        ct = encode_tensor(name, delta, scratch, self.config.codec)
        self._pending[name] = scratch
        return ct

    def _commit_own(
        self,
        params: list[NamedParam],
        own: Payload,
        deltas: Mapping[str, torch.Tensor] | None = None,
        committed: set[str] | None = None,
    ) -> None:
        """e ← β·e + Δ − D(sent) per tensor, with D(sent) the decoding of the message that was
        published (:func:`~sparseloco.codec.commit_tensor`, the receivers' decode).

        The residual matches the message by construction, so there is nothing to compare
        and nothing to fail after publishing beyond running out of memory, whatever backend
        encoded it. On the torch and Triton backends the buffer is bit-identical to the one
        the encoder left on its scratch copy: the same float32 roundings, fl(fl(β·e) + Δ)
        then v − v̂ at the kept entries, rounded once to the buffer's dtype. It costs one
        decode, not a second compress, and no memory beyond one tensor's scratch; holding
        every encoded scratch buffer until the commit would cost a whole second set. A
        DTensor parameter's owner takes its pending buffer instead (recomputing Δ would
        all-gather it again).
        """
        codec = self.config.codec
        assert isinstance(own, CompressedUpdate)
        for name, p, _ in params:
            if committed is not None and name in committed:
                continue
            if sharded.is_sharded(p):
                if name in self._pending:
                    self.state[p]["error"] = self._pending.pop(name)
                continue
            error = self._error_buffer(p)
            # Offloaded, or tracked tensor by tensor (an overlapped round, whose retry must
            # not commit a half-updated buffer twice): commit a copy, then take it whole.
            work = error
            if self.offload or committed is not None:
                work = error.to(p.device, copy=True, non_blocking=self.offload)
            delta = self._own_delta(p) if deltas is None else deltas[name].to(p.device)
            commit_tensor(name, delta, work, own.tensors[name], codec)
            if work is not error:
                error.copy_(work)
            if committed is not None:
                committed.add(name)

    def _decoded_own(self, name: str, own: Payload, device: torch.device) -> torch.Tensor:
        """The decoded message: the values of the aggregate of it alone under either reducer
        (one peer's clip factor is 1, its count 1), without the aggregate's passes."""
        assert isinstance(own, CompressedUpdate)
        return decode_tensor(name, own.tensors[name], self.config.codec).to(device)

    def _aggregate_tensor(
        self, name: str, updates: dict[str, Payload], device: torch.device
    ) -> torch.Tensor:
        single = {
            peer: CompressedUpdate(codec=u.codec, tensors={name: u.tensors[name]})  # type: ignore[union-attr]
            for peer, u in updates.items()
        }
        ((_, agg),) = iter_aggregate(
            single,
            reducer=self.config.reducer,
            clip_to_median=self.config.clip_to_median,
            device=device,
            backend=self.config.codec.backend,
        )
        return agg


class DiLoCo(OuterOptimizer):
    """DiLoCo (arXiv 2311.08455): dense pseudo-gradients, averaged, outer Nesterov SGD.

    Args:
        params, exchange: as for :class:`SparseLoCo`.
        lr: outer learning rate (paper: 0.7; 0.4 is often better at small scale).
        momentum: outer momentum (paper: 0.9).
        nesterov: Nesterov momentum (paper: True).
        inner_steps: H (paper: 500).
        wire_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` pseudo-gradients on the wire.
        offload: keep θ₀ and the momentum buffer in CPU memory.
        outer_optimizer: a ``torch.optim`` optimizer (or a callable building one) instead of
            the built-in Nesterov SGD; ``lr``, ``momentum`` and ``nesterov`` are then unused.
        overlap: overlapped rounds, as for :class:`SparseLoCo` (default off); ``True``
            starts each window from the global model plus the own progress
            (``OverlapConfig.local()``).
    """

    method = "diloco"
    # Its outer step carries Nesterov momentum, so Θ_k − Θ_{k−1} already runs ahead of the
    # next aggregate: repeating it overshoots, and the own progress alone does better.
    default_overlap = OverlapConfig.local()

    def __init__(
        self,
        params: Iterable[Any],
        exchange: Exchange,
        *,
        lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        inner_steps: int = 500,
        wire_dtype: str = "float32",
        offload: bool = False,
        outer_optimizer: Optimizer | Callable[[list[torch.Tensor]], Optimizer] | None = None,
        overlap: bool | OverlapConfig = False,
    ) -> None:
        if lr < 0 or not 0.0 <= momentum < 1.0 or (nesterov and momentum == 0.0):
            raise ConfigError(
                f"need lr >= 0, 0 <= momentum < 1 and momentum > 0 for Nesterov; got lr={lr}, "
                f"momentum={momentum}, nesterov={nesterov}"
            )
        if inner_steps < 1:
            raise ConfigError(f"inner_steps must be >= 1, got {inner_steps}")
        self.wire_dtype = wire_dtype
        self._wire = wire_dtype_or_raise(wire_dtype)
        super().__init__(
            params,
            exchange,
            {"lr": lr, "momentum": momentum, "nesterov": nesterov},
            inner_steps=inner_steps,
            offload=offload,
            outer_optimizer=outer_optimizer,
            overlap=overlap,
        )

    def _encode(
        self, params: list[NamedParam], deltas: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[Payload, float]:
        attempt = Attempt(strict=sharded.mesh_group(params) is None)
        # Δ in the parameters' dtype, or an overlapped round's float32 Δ; then the wire's
        local, dtype = (
            (self._plain_delta, None)
            if deltas is None
            else (
                self._kept(deltas),
                torch.float32,
            )
        )
        wire = {}
        for name, _, d in self._wholes(params, local, dtype, attempt):
            wire[name] = attempt.run(d.to, self._wire) if d is not None else None
        attempt.done()
        sent = _all_sent(wire)
        return DenseUpdate(tensors=sent), _norm(sent.values())

    def _plain_delta(self, p: torch.Tensor) -> torch.Tensor:
        """θ₀ − θ in the parameter's dtype (s − θ when overlapping)."""
        return self._origin(p).to(p.device) - p

    def _aggregate_tensor(
        self, name: str, updates: dict[str, Payload], device: torch.device
    ) -> torch.Tensor:
        return _dense_mean(name, updates, device)


class DataParallel(OuterOptimizer):
    """Plain data parallelism: every inner step, peers' gradients are averaged densely.

    Used through :class:`~sparseloco.loop.OuterLoop`, ``step()`` runs *before* each inner
    step and replaces every ``.grad`` with the mean over peers (sorted peer order).
    ``wire_dtype`` as for DiLoCo.

    ``nonfinite`` says what a NaN/Inf in this peer's gradient does: ``"raise"`` (default)
    raises :class:`NonFiniteError` before publishing; ``"propagate"`` publishes an overflow
    marker (a dense payload with no tensors) instead, and when any aggregated peer sent one,
    every peer's gradients become +Inf — so that, like DDP under mixed precision, every peer
    skips the same steps. With ``torch.amp.GradScaler`` use ``"propagate"`` and average the
    *scaled* gradients before the scaler looks at them (not through
    :class:`~sparseloco.loop.OuterLoop`, whose hook runs after the scaler's check)::

        scaler.scale(loss).backward()
        outer.step()                  # every peer: the same gradients, finite or all Inf
        scaler.step(inner)            # so every peer skips alike and keeps the same scale
        scaler.update()
    """

    method = "data_parallel"
    hook = "pre"

    def __init__(
        self,
        params: Iterable[Any],
        exchange: Exchange,
        *,
        wire_dtype: str = "float32",
        nonfinite: Literal["raise", "propagate"] = "raise",
    ):
        if nonfinite not in ("raise", "propagate"):
            raise ConfigError(f"nonfinite must be 'raise' or 'propagate', got {nonfinite!r}")
        self.wire_dtype = wire_dtype
        self.nonfinite = nonfinite
        self._wire = wire_dtype_or_raise(wire_dtype)
        super().__init__(params, exchange, {"lr": 1.0}, inner_steps=1)

    def _init_state(self, name: str, p: torch.Tensor) -> None:
        del name, p

    def global_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, parameter): with gradients averaged every step, the parameters themselves
        are the global model."""
        for name, p, _ in self.named_params():
            yield name, p.detach()

    def _round_params(self) -> list[NamedParam]:
        return [(n, p, g) for n, p, g in self.named_params() if p.grad is not None]

    def _check_inputs(self, params: list[NamedParam]) -> None:
        if self.nonfinite == "raise":
            grads = [(name, p.grad) for name, p, _ in params]
            _check_all_finite(grads)  # type: ignore[arg-type]

    def _encode(
        self, params: list[NamedParam], deltas: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[Payload, float]:
        del deltas  # gradient averaging publishes gradients, not progress
        attempt = Attempt(strict=sharded.mesh_group(params) is None)
        copies = {}
        for name, _, g in self._wholes(params, _grad, None, attempt):
            # a copy: the payload must stay unchanged after publishing while .grad is overwritten
            copies[name] = attempt.run(_copy_to, g, self._wire) if g is not None else None
        attempt.done()
        grads = _all_sent(copies)
        if self.nonfinite == "propagate" and not all(_finite(g) for g in grads.values()):
            return DenseUpdate(tensors={}), float("inf")  # the overflow marker
        return DenseUpdate(tensors=grads), _norm(grads.values())

    def _check(self, payload: Payload, shapes: dict[str, tuple[int, ...]]) -> None:
        if (
            self.nonfinite == "propagate"
            and isinstance(payload, DenseUpdate)
            and not payload.tensors
        ):
            return  # an overflow marker
        super()._check(payload, shapes)

    def _aggregate_all(
        self, updates: dict[str, Payload], params: list[NamedParam]
    ) -> tuple[dict[str, torch.Tensor], float]:
        if any(isinstance(u, DenseUpdate) and not u.tensors for u in updates.values()):
            inf = float("inf")
            full = {
                n: sharded.shard_like(torch.full(p.shape, inf, device=p.device), p)
                for n, p, _ in params
            }
            return full, inf
        return super()._aggregate_all(updates, params)

    def _aggregate_tensor(
        self, name: str, updates: dict[str, Payload], device: torch.device
    ) -> torch.Tensor:
        return _dense_mean(name, updates, device)

    def _apply(self, p: torch.Tensor, group: dict[str, Any], agg: torch.Tensor) -> None:
        p.grad.copy_(agg)  # type: ignore[union-attr]


def _agreed(
    lock: Lockstep | None,
    window: int,
    phase: str,
    fn: Callable[[], Any],
    extra: Callable[[Any], int] | None = None,
    what: str = "results",
) -> Any:
    """``fn()``; with ranks that step together, ended by their agreement (every rank raises
    the same :class:`~sparseloco.errors.RankError` if one failed)."""
    return fn() if lock is None else lock.run(window, phase, fn, extra, what)


def _sq_norm(t: torch.Tensor) -> float:
    """‖t‖₂², accumulated in float64."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad  # type: ignore[return-value]


def _copy_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype, copy=True)


def _all_sent(tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` when none is ``None``; else :class:`MissingRankData` (an owner rank failed
    and sent nothing: it says why in the phase's agreement)."""
    missing = [name for name, t in tensors.items() if t is None]
    if missing:
        raise MissingRankData(f"{missing[0]}: its owner rank sent nothing")
    return tensors


def _finite(t: torch.Tensor) -> bool:
    """Whether ``t`` (this rank's shard of it, for a DTensor) holds no NaN/Inf."""
    local = t.to_local() if sharded.is_sharded(t) else t
    return not local.is_floating_point() or bool(torch.isfinite(local).all())


def _check_all_finite(tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor holding NaN/Inf (in this rank's
    shard, for a DTensor: the round's agreement makes every rank raise)."""
    for name, t in tensors:
        if not _finite(t):
            raise NonFiniteError("contains NaN or Inf", tensor=name)


def _dense_mean(name: str, updates: dict[str, Payload], device: torch.device) -> torch.Tensor:
    """Mean over peers (sorted by id) of one dense tensor, in float32 on ``device``."""
    single = {peer: DenseUpdate(tensors={name: u.tensors[name]}) for peer, u in updates.items()}
    ((_, agg),) = iter_aggregate_dense(single, device=device)  # type: ignore[arg-type]
    return agg


def _overlap_config(overlap: object, default: OverlapConfig) -> OverlapConfig | None:
    """``overlap=``'s :class:`OverlapConfig` (``True``: ``default``), ``None`` for ``False``."""
    if overlap is False:
        return None
    if overlap is True:
        return default
    if isinstance(overlap, OverlapConfig):
        return overlap
    raise ConfigError(f"overlap must be a bool or an OverlapConfig, got {type(overlap).__name__}")


def wire_dtype_or_raise(name: str) -> torch.dtype:
    try:
        return wire_dtype(name)
    except SparseLoCoError:
        raise ConfigError(
            f"wire_dtype must be float32, bfloat16 or float16, got {name!r}"
        ) from None
