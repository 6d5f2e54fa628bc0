"""Loss before and after applying one peer's update alone (Gauntlet's gradient score).

For a peer i with decoded dense update vᵢ (one tensor per parameter name) the evaluation
step is, per tensor,

    θ ← θ − α·scale·fᵢ·vᵢ

with the factors fᵢ of :mod:`gauntlet.clipping` (every non-zero tensor applied at the
window's reference length r, fᵢ = r/‖vᵢ‖). With L_b / L_a the mean loss before / after on a
set of batches, the relative gain is g = (L_b − L_a) / max(|L_b|, floor).

* gradient score sᵢ = g on the shared random set (the same batches for every peer, so
  scores are comparable in one ranking);
* the assigned-data indicator bᵢ = clamp(x / scale, −1, 1) (``scale`` = 0: Gauntlet's bᵢ = +1
  if x > 0, else −1), −1 when a gain is not finite or the update changes nothing, where x is
  how much better the update fits the peer's own assigned batches than other data:

  - **cross** (the default, :func:`cross_indicators`): every evaluated update is also
    applied to the assigned batches of the other evaluated peers, or of ``cross_peers``
    (k) of them drawn after the deadline (:func:`gauntlet.assignment.cross_partners`). With
    G[z][y] the gain of z's update on y's batches and g_z its gain on the random set,

        x = ((G[x][x] − gₓ) − Aₓ − margin) / max(|G[x][x]|, |gₓ|, median_z |g_z|),
        Aₓ = median_z (G[z][x] − g_z)   (z ≠ x scored on x's set, g_z > 0):

    Gauntlet's own-data-over-random-set advantage, less the median of the same advantage
    of the other peers' updates on x's set (how much easier x's set is than the random set
    for updates that did not train on it). Under an additive model
    G[z][y] = s_z + e_y + δ_z·[z = y], g_z = s_z + e_R, the numerator is exactly δₓ: the
    update's strength, the set's easiness and the random set's easiness all cancel. The
    last one matters most: every peer shares the random set, so a window whose set
    happened to be easy or hard moved every peer's Gauntlet indicator together, and on a
    small model that common noise was as large as an honest peer's δ and zeroed honest
    peers. Each other update's advantage is taken on its own gains (paired, so its strength
    cancels before the median; a median of G[z][x] less a median of g_z picks different
    peers and let adversaries' strengths through). Only x's own two gains enter for x and
    the others' through a median of at least three, so no single peer moves another's
    indicator by more than one rank of that median; a coalition holding 8 of a peer's
    k = 15 scorers takes it (drawn at random, for a coalition of 30 % of the peers that is
    about 5 % of an honest peer's windows, 0.4 % at 20 %). Degrading other peers' (public)
    assignments does not raise one's own, and the random set is still drawn after the
    deadline. The denominator includes the others' gains, so a near-zero update is not
    amplified. Costs n·(k + 1) set
    evaluations for n evaluated peers and k = min(n − 1, ``cross_peers``).
  - **random** (Gauntlet's, :func:`assigned_indicator`; also used for a peer whose set
    fewer than :data:`MIN_CROSS` other helpful updates were scored on):
    x = (g_assigned − g_random − margin) / max(|g_random|, |g_assigned|).

The soft indicator keeps the size of the evidence: an honest peer's x is small but steadily
positive while a peer that trained on other data has x centred on 0, so the moving average
separates them in fewer windows than the sign does.

Before-losses are computed once per window (:meth:`Evaluator.baseline`) and shared.
The model is restored bit for bit after every peer (parameters, buffers, gradients,
training flags, the global RNG state, and an optimizer's state if one is given), by
copying back a snapshot rather than subtracting the step again.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import nn

from gauntlet.config import EvalConfig

LossFn = Callable[[nn.Module, Any], torch.Tensor]
_T = TypeVar("_T")


@dataclass(frozen=True)
class Baseline:
    """Before-losses of one window: the shared random set and each peer's assigned set."""

    random: float
    assigned: dict[str, float]


@dataclass(frozen=True)
class EvalResult:
    """One peer's evaluation.

    Attributes:
        peer: the evaluated peer.
        loss_random_before / loss_random_after: mean loss on the shared random batches.
        loss_assigned_before / loss_assigned_after: mean loss on the peer's assigned batches.
        gain_random: (L_b − L_a)/L_b on the random set, the gradient score.
        gain_assigned: the same on the assigned set.
        indicator: bᵢ in [−1, 1] (:func:`cross_indicators` or :func:`assigned_indicator`).
        finite: False when an after-loss is NaN/Inf (the scorer counts it as invalid).
        cross_gains: the gain on each partner's assigned batches (the cross indicator's
            row; empty for the random-set indicator).
    """

    peer: str
    loss_random_before: float
    loss_random_after: float
    loss_assigned_before: float
    loss_assigned_after: float
    gain_random: float
    gain_assigned: float
    indicator: float
    finite: bool
    cross_gains: Mapping[str, float] = field(default_factory=dict)

    @property
    def gradient_score(self) -> float:
        return self.gain_random


def relative_gain(before: float, after: float, floor: float = 1e-8) -> float:
    """(L_b − L_a) / max(|L_b|, floor); NaN when either loss is not finite."""
    if not (math.isfinite(before) and math.isfinite(after)):
        return math.nan
    return (before - after) / max(abs(before), floor)


def assigned_indicator(g_random: float, g_assigned: float, margin: float, scale: float) -> float:
    """bᵢ = clamp(x / scale, −1, 1) with x = (g_assigned − g_random − margin) /
    max(|g_random|, |g_assigned|); with ``scale`` = 0 the sign of x (±1, a tie is −1); −1
    when a gain is not finite or both are 0 (an update that changes nothing shows no training
    on anything)."""
    size = max(abs(g_random), abs(g_assigned))
    if not (math.isfinite(g_random) and math.isfinite(g_assigned)) or size == 0.0:
        return -1.0
    return _clamped((g_assigned - g_random - margin) / size, scale)


def _clamped(x: float, scale: float) -> float:
    if scale == 0.0:
        return 1.0 if x > 0.0 else -1.0
    return min(1.0, max(-1.0, x / scale))


#: the fewest other updates whose median the cross indicator trusts (module doc).
MIN_CROSS = 3


def cross_indicators(
    gains: Mapping[str, Mapping[str, float]],
    random_gains: Mapping[str, float],
    margin: float,
    scale: float,
) -> dict[str, float]:
    """bᵢ of every peer from the cross gains G[z][y] (z's update on y's assigned batches; row
    z names z itself and the peers whose sets z's update was also scored on) and each
    update's random-set gain g_z (module doc):

        x = ((G[x][x] − gₓ) − Aₓ − margin) / max(|G[x][x]|, |gₓ|, median_z |g_z|),
        Aₓ = median_z (G[z][x] − g_z)   over the peers z ≠ x scored on x's set with g_z > 0,

    clamped as :func:`assigned_indicator`. A peer with a non-finite gain, or whose update
    changes nothing (all its gains 0), gets −1 and is left out of the others' medians, as is
    an update that does not help the random set (g_z ≤ 0: no reference for how data
    responds to training, and the cheap way to push a median). A peer whose set fewer than
    :data:`MIN_CROSS` such updates were scored on is judged by :func:`assigned_indicator`
    alone: with one or two, a single peer would decide the median."""
    peers = sorted(gains)
    if sorted(random_gains) != peers or any(
        x not in gains[x] or not set(gains[x]) <= set(peers) for x in peers
    ):
        raise ValueError("cross_indicators needs each row to name its own peer and known peers")
    out: dict[str, float] = {}
    for x in peers:
        row = [*gains[x].values(), random_gains[x]]
        if not all(math.isfinite(g) for g in row) or all(g == 0.0 for g in row):
            out[x] = -1.0
    live = [x for x in peers if x not in out]
    for x in live:
        own, rand = gains[x][x], random_gains[x]
        others = [z for z in live if z != x and x in gains[z] and random_gains[z] > 0.0]
        if len(others) < MIN_CROSS:
            out[x] = assigned_indicator(rand, own, margin, scale)
            continue
        others_lead = statistics.median(gains[z][x] - random_gains[z] for z in others)
        size = max(abs(own), abs(rand), statistics.median(abs(random_gains[z]) for z in others))
        lead = (own - rand) - others_lead - margin
        out[x] = _clamped(lead / size, scale) if size > 0.0 else -1.0
    return {x: out[x] for x in peers}


def mean_loss(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any]) -> float:
    """Mean of ``loss_fn(model, batch)`` over ``batches``, summed in order in float64."""
    if not batches:
        raise ValueError("mean_loss needs at least one batch")
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            total += float(loss_fn(model, batch).detach().to(torch.float64))
    return total / len(batches)


class _Snapshot:
    """Exact copies of everything an evaluation may touch, and their in-place restore."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.tensors = [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]]
        self.grads = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
        self.training = [(m, m.training) for m in model.modules()]
        self.optim: list[tuple[dict[str, Any], str, Any]] = []
        if optimizer is not None:
            for state in optimizer.state.values():
                for key, value in state.items():
                    saved = value.clone() if isinstance(value, torch.Tensor) else value
                    self.optim.append((state, key, saved))

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)
        for p, g in self.grads:
            if g is None:
                p.grad = None
            elif p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        for module, flag in self.training:
            module.training = flag
        for state, key, saved in self.optim:
            if isinstance(saved, torch.Tensor):
                state[key].copy_(saved)
            else:
                state[key] = saved


@dataclass
class _Replica:
    """A model evaluations run on, with its parameters by name and the snapshot it is
    restored from after each peer."""

    model: nn.Module
    params: dict[str, torch.Tensor]
    snap: _Snapshot


class Evaluator:
    """Evaluates peers' decoded updates on one model; the model is left exactly as found.

    Args:
        model: the validator's model at the start of the window (any ``nn.Module``).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``; called under ``torch.no_grad``.
        config: the evaluation step (:class:`~gauntlet.config.EvalConfig`).
        optimizer: an optimizer whose state must also be preserved (optional).
        threads: evaluate the peers of :meth:`evaluate_many` on this many threads, each on
            its own copy of the model (``threads − 1`` deep copies, made per call): for a
            CPU validator whose cores would otherwise sit idle while it scores. Every peer is
            still evaluated alone on a model equal to the original, so the results are
            bit-identical to one thread's. Needs ``config.eval_mode`` (no dropout draws from
            the shared random generator) and a model ``copy.deepcopy`` can copy.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        config: EvalConfig | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        threads: int = 1,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.config = config or EvalConfig()
        self.optimizer = optimizer
        if not (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if threads > 1 and not self.config.eval_mode:
            raise ValueError("threads > 1 needs eval_mode: dropout would share one generator")
        self.threads = threads
        self._params = dict(model.named_parameters())

    @contextmanager
    def _preserved(self) -> Iterator[_Snapshot]:
        snap = _Snapshot(self.model, self.optimizer)
        devices = sorted(
            {p.device.index or 0 for p in self._params.values() if p.device.type == "cuda"}
        )
        try:
            with torch.random.fork_rng(devices=devices):
                if self.config.eval_mode:
                    self.model.eval()
                yield snap
        finally:
            snap.restore()

    def _loss(self, batches: Sequence[Any], model: nn.Module | None = None) -> float:
        return mean_loss(self.model if model is None else model, self.loss_fn, batches)

    def baseline(
        self, random_batches: Sequence[Any], assigned_batches: Mapping[str, Sequence[Any]]
    ) -> Baseline:
        """Before-losses, once per window: the random set and every peer's assigned set."""
        sets = {"": random_batches} | {f"/{p}": assigned_batches[p] for p in assigned_batches}
        losses = self._spread(sorted(sets), lambda r, name: self._loss(sets[name], r.model))
        return Baseline(
            random=losses[""], assigned={p: losses[f"/{p}"] for p in sorted(assigned_batches)}
        )

    def losses(self, sets: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """Mean loss of each named batch set on the model as it is (sorted names)."""
        with self._preserved():
            return {name: self._loss(sets[name]) for name in sorted(sets)}

    def gains_on(
        self,
        update: Mapping[str, torch.Tensor],
        factors: Mapping[str, float],
        sets: Mapping[str, Sequence[Any]],
        before: Mapping[str, float],
    ) -> dict[str, float]:
        """Relative gain of one update (applied once, as in :meth:`evaluate_many`) on each
        named batch set, from the before-losses ``before`` of :meth:`losses`."""
        floor = self.config.loss_floor
        with self._preserved():
            self._apply(update, factors)
            return {
                name: relative_gain(before[name], self._loss(sets[name]), floor)
                for name in sorted(sets)
            }

    def _apply(
        self,
        update: Mapping[str, torch.Tensor],
        factors: Mapping[str, float],
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        params = self._params if params is None else params
        step = self.config.step
        with torch.no_grad():
            for name in sorted(update):
                param = params[name]
                v = update[name].to(device=param.device, dtype=param.dtype)
                param.sub_(v, alpha=step * factors.get(name, 1.0))

    def _spread(self, keys: list[str], fn: Callable[[_Replica, str], _T]) -> dict[str, _T]:
        """``{key: fn(replica, key)}`` in the order of ``keys``, the keys dealt round-robin to
        up to ``threads`` replicas of the model (the model itself first), each on its own
        thread; the model is preserved as :meth:`_preserved` does."""
        with self._preserved() as snap:
            replicas = [_Replica(self.model, self._params, snap)]
            replicas += [self._replica() for _ in range(min(self.threads, len(keys)) - 1)]
            groups = [keys[i :: len(replicas)] for i in range(len(replicas))]

            def run(i: int) -> dict[str, _T]:
                return {k: fn(replicas[i], k) for k in groups[i]}

            if len(replicas) == 1:
                parts = [run(0)]
            else:
                with ThreadPoolExecutor(len(replicas), thread_name_prefix="evaluate") as pool:
                    parts = list(pool.map(run, range(len(replicas))))
        merged = {k: v for part in parts for k, v in part.items()}
        return {k: merged[k] for k in keys}

    def _replica(self) -> _Replica:
        """A deep copy of the model, as :meth:`_preserved` leaves it, for another thread."""
        model = copy.deepcopy(self.model)
        return _Replica(model, dict(model.named_parameters()), _Snapshot(model, None))

    def evaluate_many(
        self,
        updates: Mapping[str, Mapping[str, torch.Tensor]],
        factors: Mapping[str, Mapping[str, float]],
        baseline: Baseline,
        random_batches: Sequence[Any],
        assigned_batches: Mapping[str, Sequence[Any]],
        *,
        margin: float = 0.0,
        scale: float = 0.0,
        partners: Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, EvalResult]:
        """Evaluate each peer of ``updates`` alone, in sorted order, restoring in between.

        ``updates`` maps peer → {parameter name → dense decoded update}; ``factors`` are the
        clip factors of :func:`gauntlet.clipping.reference_factors` (a missing name is 1);
        ``margin`` and ``scale`` shape the indicator. With ``partners`` (peer → the other peers
        whose assigned batches its update is also scored on, e.g.
        :func:`gauntlet.assignment.cross_partners`) the indicator is :func:`cross_indicators`;
        without, :func:`assigned_indicator`.
        """
        unknown = sorted({n for u in updates.values() for n in u} - set(self._params))
        if unknown:
            raise KeyError(f"updates name tensors the model does not have: {unknown}")
        peers = sorted(updates)
        cross = partners is not None
        if cross and any(q not in updates or q == p for p in peers for q in partners[p]):
            raise KeyError("partners must name other evaluated peers")
        floor = self.config.loss_floor

        def measure(replica: _Replica, peer: str) -> EvalResult:
            self._apply(updates[peer], factors[peer], replica.params)
            rand_after = self._loss(random_batches, replica.model)
            sets = sorted({peer, *partners[peer]}) if cross else [peer]
            after = {y: self._loss(assigned_batches[y], replica.model) for y in sets}
            replica.snap.restore()
            if self.config.eval_mode:
                replica.model.eval()
            gains = {y: relative_gain(baseline.assigned[y], after[y], floor) for y in sets}
            g_rand = relative_gain(baseline.random, rand_after, floor)
            return EvalResult(
                peer=peer,
                loss_random_before=baseline.random,
                loss_random_after=rand_after,
                loss_assigned_before=baseline.assigned[peer],
                loss_assigned_after=after[peer],
                gain_random=g_rand,
                gain_assigned=gains[peer],
                indicator=assigned_indicator(g_rand, gains[peer], margin, scale),
                finite=math.isfinite(g_rand) and all(math.isfinite(g) for g in after.values()),
                cross_gains={y: g for y, g in gains.items() if y != peer},
            )

        results = self._spread(peers, measure)
        if cross:
            table = {p: {**r.cross_gains, p: r.gain_assigned} for p, r in results.items()}
            rand = {p: r.gain_random for p, r in results.items()}
            indicators = cross_indicators(table, rand, margin, scale)
            results = {p: replace(r, indicator=indicators[p]) for p, r in results.items()}
        return results

    def evaluate(
        self,
        peer: str,
        update: Mapping[str, torch.Tensor],
        factors: Mapping[str, float],
        baseline: Baseline,
        random_batches: Sequence[Any],
        assigned_batches: Sequence[Any],
        *,
        margin: float = 0.0,
        scale: float = 0.0,
    ) -> EvalResult:
        """One peer; see :meth:`evaluate_many`."""
        return self.evaluate_many(
            {peer: update},
            {peer: factors},
            baseline,
            random_batches,
            {peer: assigned_batches},
            margin=margin,
            scale=scale,
        )[peer]
