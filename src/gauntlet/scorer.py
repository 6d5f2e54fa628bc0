"""One validator window: gathered payloads and side data in, scores and weights out.

:meth:`Scorer.score_window` runs, in this order (every step deterministic: peers sorted,
float64 reductions, seeds from public values):

1. **statuses**: ``missing``/``late``/``invalid``/``timeout`` from the exchange fail the
   window; ``ok`` payloads are decoded (:func:`gauntlet.decoding.decode_update`) and any
   that do not decode, hold NaN/Inf or are out of protocol (a dense payload, another codec)
   are ``invalid`` (:func:`decode_all`);
2. **proof of data**: the published digest must equal :func:`gauntlet.assignment.data_digest`
   of the peer's assignment (and contents, when ``contents_for`` is given), else ``bad_data``
   (:meth:`Scorer._proof_failures`);
3. **replays**: an update whose content digest (:func:`gauntlet.decoding.content_digest`)
   was seen in an earlier window, as a peer's update or as the applied aggregate
   (:meth:`Scorer.record_aggregate`), or whose sketch (:mod:`gauntlet.sketches`) has a
   cosine of at least ``replay_cosine`` with one of the last ``replay_sketch_windows``
   windows', is ``replay`` (:meth:`Scorer._replay_failures`);
4. **clip factors**: every non-zero tensor is evaluated at the reference length r of
   :mod:`gauntlet.clipping` (the median norm of the last accepted set; before any, the
   smallest norm of this window's remaining updates), so amplifying an update earns nothing
   (:meth:`Scorer._clip_factors`);
5. **copies**: pairwise overlap/cosine among the remaining updates; in a similar pair, a peer
   whose update fits the other's assigned data at least as well as its own is ``copy``
   (:meth:`Scorer._fits`, :func:`~gauntlet.signals.blame_copies`, :func:`copy_failures`);
   publish times play no part (the copier sets or races them);
6. **evaluation** of the remaining peers (at most ``max_evaluations``, least recently
   evaluated first; :meth:`Scorer._evaluate`): each update on the shared random set and,
   for the assigned-data indicator, on its own and up to ``cross_peers`` other evaluated
   peers' assigned sets (:func:`~gauntlet.assignment.cross_partners`,
   :func:`~gauntlet.evaluate.cross_indicators`); a non-finite after-loss is ``invalid``
   (:func:`nonfinite_failures`);
7. **sync** from the published sampled values (:meth:`Scorer._syncs`);
8. **match**: one OpenSkill match; evaluated peers score their gradient score, failed ones
   ``min(0, lowest valid) − penalty`` (:func:`match_scores`); BMA gets b for evaluated
   peers and −1 for failed ones (:meth:`Scorer._record`); a window in which no peer's
   bytes arrived is void: nobody is rated (:func:`is_void`);
9. **scores and weights** from the :class:`~gauntlet.scoreboard.Scoreboard`, which also
   keeps the next window's clip reference (the accepted set's norms) and the window's
   content digests (:meth:`Scorer._remember`).

Call ``score_window`` before applying the window's outer step to the model: it records the
model's sampled values for the next window's typical-change reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gauntlet.assignment import (
    assign_samples,
    cross_partners,
    data_digest,
    derive_seed,
    eval_assigned_samples,
    random_samples,
)
from gauntlet.clipping import (
    Norms,
    accepted_reference,
    reference_factors,
    update_norms,
    window_reference,
)
from gauntlet.config import GauntletConfig, RatingConfig
from gauntlet.decoding import DecodedUpdate, InvalidUpdate, content_digest, decode_update
from gauntlet.evaluate import EvalResult, Evaluator, LossFn
from gauntlet.ratings import rate_match
from gauntlet.scoreboard import Scoreboard
from gauntlet.signals import (
    CopyVerdict,
    PairSimilarity,
    SyncResult,
    blame_copies,
    is_similar,
    mean_abs_diff,
    pair_similarities,
    sample_values,
    sync_positions,
    sync_score,
    update_bma,
)
from gauntlet.sketches import update_sketch
from sparseloco.codec import ErrorFeedback, encode
from sparseloco.config import CodecConfig
from sparseloco.exchange import GatherResult

Statuses = dict[str, tuple[str, str]]
"""peer → (failure kind, reason)."""


@dataclass(frozen=True)
class WindowInputs:
    """What a validator collected for one window.

    Attributes:
        window: the window index.
        gather: the exchange's :class:`~sparseloco.exchange.GatherResult` (payloads and a
            status for every expected peer).
        eval_seed: a value that became public only after the publish deadline (e.g. the
            hash of that block); picks the evaluated subset and the random set.
        digests: peer → the proof-of-data digest it published.
        sync_values: peer → the values it published at :meth:`Scorer.sync_positions`.
        publish_times: peer → the time the storage server stamped its update (S3
            ``LastModified``); only a tie-breaker of copy blame where provenance cannot tell.
    """

    window: int
    gather: GatherResult
    eval_seed: str
    digests: Mapping[str, str] = field(default_factory=dict)
    sync_values: Mapping[str, torch.Tensor] = field(default_factory=dict)
    publish_times: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerOutcome:
    """One peer's window: its status, evaluation, sync, match score and final score."""

    peer: str
    status: str
    reason: str = ""
    evaluation: EvalResult | None = None
    sync: SyncResult | None = None
    match_score: float | None = None
    final_score: float = 0.0


@dataclass
class WindowReport:
    """Everything :meth:`Scorer.score_window` decided, for logs and for aggregation
    (``clip_reference``: the length r per tensor every evaluated update was applied at;
    ``void``: no peer's bytes arrived, so nobody was rated, see :meth:`Scorer.score_window`)."""

    window: int
    outcomes: dict[str, PeerOutcome]
    pairs: list[PairSimilarity]
    copies: dict[str, CopyVerdict]
    scores: dict[str, float]
    weights: dict[str, float]
    timings: dict[str, float]
    clip_reference: dict[str, float] = field(default_factory=dict)
    void: bool = False

    @property
    def accepted(self) -> list[str]:
        """The aggregation set: evaluated peers whose update helped this window or whose
        standing (final score) is positive.

        The standing keeps an honest peer whose gain on a small random set came out slightly
        negative once; failed peers (missing, invalid, copies, bad data) are never accepted.
        """
        return sorted(
            p
            for p, o in self.outcomes.items()
            if o.status == "evaluated"
            and o.evaluation is not None
            and (o.evaluation.gain_random > 0 or self.scores.get(p, 0.0) > 0)
        )

    def table(self) -> str:
        """A fixed-width text table of the window's outcomes."""
        lines = [
            f"{'peer':<14}{'status':<11}{'gain_rand':>10}{'gain_asg':>10}"
            f"{'sync':>7}{'score':>10}{'weight':>8}"
        ]
        for p in sorted(self.outcomes):
            o = self.outcomes[p]
            gr = f"{o.evaluation.gain_random:10.4f}" if o.evaluation else f"{'-':>10}"
            ga = f"{o.evaluation.gain_assigned:10.4f}" if o.evaluation else f"{'-':>10}"
            sy = f"{o.sync.score:7.3f}" if o.sync else f"{'-':>7}"
            lines.append(
                f"{p:<14}{o.status:<11}{gr}{ga}{sy}{self.scores.get(p, 0.0):10.4f}"
                f"{self.weights.get(p, 0.0):8.4f}"
            )
        return "\n".join(lines)


class Scorer:
    """Gauntlet scoring of a window's contributions on a validator's model.

    Args:
        model: the validator's model at the start of the window (restored after scoring).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches_for: sample ids → the batches made of them (the validator's data loader).
        seed: the public seed of the run (data assignment and sync positions).
        config: :class:`~gauntlet.config.GauntletConfig`.
        scoreboard: existing state to continue from (a fresh one by default).
        codec: the codec every compressed update must use (None: accept the payload's).
        contents_for: sample ids → their contents, to include in the digest (optional).
        optimizer: an optimizer whose state the evaluation must also preserve (optional).
        eval_threads: threads the evaluations are split over (:class:`Evaluator`'s
            ``threads``; bit-identical results).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches_for: Callable[[Sequence[int]], Sequence[Any]],
        *,
        seed: str,
        config: GauntletConfig | None = None,
        scoreboard: Scoreboard | None = None,
        codec: CodecConfig | None = None,
        contents_for: Callable[[Sequence[int]], Iterable[Any]] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        eval_threads: int = 1,
    ) -> None:
        self.config = config or (scoreboard.config if scoreboard else GauntletConfig())
        self.scoreboard = scoreboard or Scoreboard(self.config)
        self.model = model
        self.batches_for = batches_for
        self.seed = seed
        self.codec = codec
        self.contents_for = contents_for
        self.evaluator = Evaluator(
            model, loss_fn, self.config.evaluation, optimizer, threads=eval_threads
        )
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def sync_positions(self, window: int) -> list[tuple[str, int]]:
        """The parameter entries peers publish for ``window``'s sync check."""
        return sync_positions(self._shapes, window, self.seed, self.config.signals.sync_samples)

    def expected_digest(self, peer: str, window: int) -> str:
        """The proof-of-data digest an honest ``peer`` publishes for ``window``."""
        ids = assign_samples(peer, window, self.seed, self.config.assignment)
        contents = self.contents_for(ids) if self.contents_for is not None else None
        return data_digest(peer, window, ids, contents)

    def _own_values(self, window: int) -> torch.Tensor:
        return sample_values(dict(self.model.named_parameters()), self.sync_positions(window))

    def _typical_change(self, window: int, own: torch.Tensor) -> float | None:
        board = self.scoreboard
        ref = board.sync_reference
        if ref is not None and ref["window"] == window and len(ref["values"]) == own.numel():
            board.typical_change = mean_abs_diff(own, torch.tensor(ref["values"]))
        return board.typical_change

    def _select(self, candidates: list[str], window: int, eval_seed: str) -> list[str]:
        limit = self.config.max_evaluations
        if limit is None or len(candidates) <= limit:
            return candidates

        def key(p: str) -> tuple[int, int]:
            return (self.scoreboard.record(p).last_evaluated, derive_seed(eval_seed, window, p))

        return sorted(sorted(candidates, key=key)[:limit])

    def score_window(self, inputs: WindowInputs) -> WindowReport:
        """Score every peer of ``inputs.gather`` for ``inputs.window``; see the module doc."""
        window = inputs.window
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        peers, decoded, status = decode_all(inputs.gather, self._shapes, self.codec)
        timings["decode"] = time.perf_counter() - t0
        status.update(self._proof_failures(decoded, inputs))
        digests = {p: content_digest(decoded[p].dense) for p in sorted(decoded)}
        sketches = {p: update_sketch(decoded[p].dense) for p in sorted(decoded)}
        replays = self._replay_failures(digests, sketches, window)
        status.update({p: v for p, v in replays.items() if p not in status})
        unfailed = {p: decoded[p] for p in sorted(decoded) if p not in status}
        norms = update_norms({p: d.dense for p, d in unfailed.items()})
        reference, factors = self._clip_factors(norms)
        t1 = time.perf_counter()
        pairs = pair_similarities(unfailed)
        fits = self._fits(pairs, unfailed, factors, inputs)
        copies = blame_copies(pairs, fits, self.config.signals, inputs.publish_times)
        status.update(copy_failures(copies))
        timings["copy_detection"] = time.perf_counter() - t1
        candidates = [p for p in unfailed if p not in status]
        chosen = self._select(candidates, window, inputs.eval_seed)
        results = self._evaluate(chosen, decoded, factors, inputs, timings)
        status.update(nonfinite_failures(results))
        syncs = self._syncs(window, peers, inputs.sync_values)
        evaluated = {p: r for p, r in results.items() if p not in status}
        match = match_scores(evaluated, status, self.config.rating)
        void = is_void(peers, status)
        if not void:
            self._record(window, peers, match, evaluated, status, syncs)
        # every window, void or not: the next one's typical change is measured from here
        self.scoreboard.sync_reference = {
            "window": window + 1,
            "values": [float(v) for v in self._own_values(window + 1)],
        }
        scores = self.scoreboard.final_scores()
        outcomes = {}
        for peer in peers:
            kind, reason = status.get(peer, ("evaluated" if peer in evaluated else "skipped", ""))
            outcomes[peer] = PeerOutcome(
                peer=peer,
                status=kind,
                reason=reason,
                evaluation=results.get(peer),
                sync=syncs.get(peer),
                match_score=match.get(peer),
                final_score=scores.get(peer, 0.0),
            )
        report = WindowReport(
            window=window,
            outcomes=outcomes,
            pairs=pairs,
            copies=copies,
            scores=scores,
            weights=self.scoreboard.weights(),
            timings=timings,
            clip_reference=reference,
            void=void,
        )
        self._remember(window, digests, norms, reference, report.accepted)
        self.scoreboard.remember_sketches(
            window, [("update", sk) for _, sk in sorted(sketches.items()) if sk is not None]
        )
        timings["total"] = time.perf_counter() - t0
        return report

    def record_aggregate(self, window: int, aggregate: Mapping[str, torch.Tensor]) -> None:
        """Remember the content of the aggregate applied after ``window``, so that an update
        that sends it again in a later window is a ``replay``.

        The aggregate is taken as a peer would send it: encoded under the scorer's codec
        with a fresh error-feedback buffer and decoded (without a codec, as given).
        """
        dense = {n: aggregate[n].detach().to(torch.float32) for n in sorted(aggregate)}
        if self.codec is not None:
            payload = encode(dense, ErrorFeedback(self.codec))
            dense = decode_update(payload, self._shapes, self.codec).dense
        digest = content_digest(dense)
        if digest is not None:
            self.scoreboard.remember(window, {digest: "aggregate"})
        sketch = update_sketch(dense)
        if sketch is not None:
            self.scoreboard.remember_sketches(window, [("aggregate", sketch)])

    def _replay_failures(
        self,
        digests: Mapping[str, str | None],
        sketches: Mapping[str, list[float] | None],
        window: int,
    ) -> Statuses:
        """``replay`` for every update whose content was seen in an earlier window, or whose
        sketch cosine with an earlier update or aggregate reaches ``replay_cosine``."""
        out: Statuses = {}
        limit = self.config.signals.replay_cosine
        closest = self.scoreboard.closest_earlier(sketches, window)
        for peer, digest in sorted(digests.items()):
            seen = self.scoreboard.first_seen(digest, window)
            if seen is not None:
                out[peer] = ("replay", f"same content as the {seen[1]} of window {seen[0]}")
                continue
            cos, w, source = closest.get(peer, (0.0, -1, ""))
            if cos >= limit:
                out[peer] = (
                    "replay",
                    f"near copy (cosine {cos:.4f}) of the {source} of window {w}",
                )
        return out

    def _clip_factors(self, norms: Norms) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """The reference length r per tensor and every peer's factor r/‖v‖
        (:mod:`gauntlet.clipping`): the last accepted set's reference where there is one,
        else the smallest norm of this window's remaining updates."""
        reference = {
            **window_reference(norms, list(norms)),
            **(self.scoreboard.clip_reference or {}),
        }
        return reference, reference_factors(norms, reference)

    def _remember(
        self,
        window: int,
        digests: Mapping[str, str | None],
        norms: Norms,
        reference: Mapping[str, float],
        accepted: list[str],
    ) -> None:
        """Keep the window's content digests and, when it accepted anyone, the next window's
        clip reference: the accepted norms' median, each clamped to clip_growth^±1 × this
        one."""
        board = self.scoreboard
        board.remember(window, {d: "update" for d in digests.values() if d is not None})
        if accepted:
            board.clip_reference = accepted_reference(
                norms, accepted, reference, self.config.evaluation.clip_growth
            )

    def _proof_failures(self, decoded: Mapping[str, Any], inputs: WindowInputs) -> Statuses:
        """``bad_data`` for every decoded peer whose proof-of-data digest is absent or wrong."""
        if not self.config.assignment.enforce_digest:
            return {}
        out: Statuses = {}
        for peer in sorted(decoded):
            got = inputs.digests.get(peer)
            if got != self.expected_digest(peer, inputs.window):
                out[peer] = (
                    "bad_data",
                    "no proof-of-data digest" if got is None else "digest mismatch",
                )
        return out

    def _assigned_batches(self, peers: Iterable[str], inputs: WindowInputs) -> dict[str, Any]:
        """Each peer's evaluated assigned samples of the window, as batches."""
        a_cfg, window, eval_seed = self.config.assignment, inputs.window, inputs.eval_seed
        return {
            p: self.batches_for(eval_assigned_samples(p, window, self.seed, eval_seed, a_cfg))
            for p in peers
        }

    def _evaluate(
        self,
        chosen: list[str],
        decoded: Mapping[str, DecodedUpdate],
        factors: Mapping[str, Mapping[str, float]],
        inputs: WindowInputs,
        timings: dict[str, float],
    ) -> dict[str, EvalResult]:
        """Gains of each chosen peer on the shared random set and on its assigned subset
        (with the cross indicator, also on its partners' assigned subsets)."""
        if not chosen:
            return {}
        t0 = time.perf_counter()
        a_cfg = self.config.assignment
        random_batches = self.batches_for(random_samples(inputs.window, inputs.eval_seed, a_cfg))
        assigned = self._assigned_batches(chosen, inputs)
        baseline = self.evaluator.baseline(random_batches, assigned)
        timings["baseline"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        results = self.evaluator.evaluate_many(
            {p: decoded[p].dense for p in chosen},
            {p: factors[p] for p in chosen},
            baseline,
            random_batches,
            assigned,
            margin=self.config.signals.assigned_margin,
            scale=self.config.signals.assigned_scale,
            partners=self._partners(chosen, inputs),
        )
        timings["evaluate"] = time.perf_counter() - t1
        return results

    def _partners(self, chosen: list[str], inputs: WindowInputs) -> dict[str, list[str]] | None:
        """Whose assigned sets each chosen update is also scored on (the cross indicator)."""
        sig = self.config.signals
        if sig.assigned_reference != "cross" or len(chosen) < 2:
            return None
        return cross_partners(chosen, inputs.window, inputs.eval_seed, sig.cross_peers)

    def _fits(
        self,
        pairs: list[PairSimilarity],
        decoded: Mapping[str, DecodedUpdate],
        factors: Mapping[str, Mapping[str, float]],
        inputs: WindowInputs,
    ) -> dict[tuple[str, str], float]:
        """fit(x, y) for both members x, y of every similar pair: the gain of x's update
        (at the clip reference) on y's evaluated assigned samples, and fit(x, x) on x's own;
        each member's update is applied once, each set's before-loss computed once."""
        similar = [p for p in pairs if is_similar(p, self.config.signals)]
        if not similar:
            return {}
        members = sorted({x for pair in similar for x in (pair.a, pair.b)})
        sets = self._assigned_batches(members, inputs)
        before = self.evaluator.losses(sets)
        fits: dict[tuple[str, str], float] = {}
        for x in members:
            partners = {p.b if p.a == x else p.a for p in similar if x in (p.a, p.b)}
            on = {y: sets[y] for y in sorted(partners | {x})}
            gains = self.evaluator.gains_on(decoded[x].dense, factors[x], on, before)
            fits.update({(x, y): g for y, g in gains.items()})
        return fits

    def _syncs(
        self, window: int, peers: list[str], values: Mapping[str, torch.Tensor]
    ) -> dict[str, SyncResult]:
        """Every peer's sync against the validator's own sampled values."""
        own = self._own_values(window)
        typical = self._typical_change(window, own)
        return {p: sync_score(own, values.get(p), typical, self.config.signals) for p in peers}

    def _record(
        self,
        window: int,
        peers: list[str],
        match: Mapping[str, float],
        evaluated: Mapping[str, EvalResult],
        status: Statuses,
        syncs: Mapping[str, SyncResult],
    ) -> None:
        """Rate the window's match and write every peer's record and the next sync reference."""
        board, sig = self.scoreboard, self.config.signals
        new_ratings = rate_match(
            {p: (board.record(p).mu, board.record(p).sigma) for p in match},
            match,
            self.config.rating,
        )
        for peer in peers:
            rec = board.record(peer)
            rec.last_window = window
            if peer in new_ratings:
                rec.mu, rec.sigma = new_ratings[peer]
            if peer in evaluated:
                res = evaluated[peer]
                rec.bma = update_bma(rec.bma, res.indicator, sig)
                rec.evaluations += 1
                rec.last_evaluated = window
                rec.last_status = "evaluated"
                rec.last_gain_random = res.gain_random
                rec.last_gain_assigned = res.gain_assigned
                rec.sync = syncs[peer].score
            elif peer in status:
                kind = status[peer][0]
                rec.bma = update_bma(rec.bma, -1.0, sig)
                rec.failures[kind] = rec.failures.get(kind, 0) + 1
                rec.last_status = kind
            else:
                rec.last_status = "skipped"


def decode_all(
    gather: GatherResult,
    shapes: Mapping[str, tuple[int, ...]],
    codec: CodecConfig | None,
) -> tuple[list[str], dict[str, DecodedUpdate], Statuses]:
    """Every peer of the gather (sorted), the decoded ``ok`` payloads, and the failures:
    the exchange's own non-``ok`` statuses, an ``ok`` without payload (``missing``) and a
    payload :func:`~gauntlet.decoding.decode_update` rejects (``invalid``)."""
    peers = sorted(set(gather.statuses) | set(gather.updates))
    decoded: dict[str, DecodedUpdate] = {}
    status: Statuses = {}
    for peer in peers:
        st = gather.statuses.get(peer)
        if st is not None and st.status != "ok":
            status[peer] = (st.status, st.reason)
            continue
        payload = gather.updates.get(peer)
        if payload is None:
            status[peer] = ("missing", "status ok but no payload")
            continue
        try:
            decoded[peer] = decode_update(payload, shapes, codec)
        except InvalidUpdate as exc:
            status[peer] = ("invalid", str(exc))
    return peers, decoded, status


def is_void(peers: Sequence[str], status: Statuses) -> bool:
    """True when no peer's bytes arrived at all (every one ``missing``, ``late`` or
    ``timeout``). Such a window says nothing about any peer: it is the validator's own
    connectivity or clock that failed far more often than every miner at once, and rating
    it would lower every honest peer's standing alike and zero short runs."""
    transport = ("missing", "late", "timeout")
    return bool(peers) and all(p in status and status[p][0] in transport for p in peers)


def copy_failures(copies: Mapping[str, CopyVerdict]) -> Statuses:
    """``copy`` with the evidence for every blamed peer."""
    return {
        peer: (
            "copy",
            f"copies {v.source} (overlap {v.overlap:.3f}, cosine {v.cosine:.4f}; gain "
            f"{v.fit_source:.4f} on {v.source}'s data vs {v.fit_own:.4f} on its own)",
        )
        for peer, v in copies.items()
    }


def nonfinite_failures(results: Mapping[str, EvalResult]) -> Statuses:
    """``invalid`` for every evaluation whose after-loss was NaN/Inf."""
    return {
        p: ("invalid", "non-finite loss after applying the update")
        for p, r in results.items()
        if not r.finite
    }


def match_scores(
    evaluated: Mapping[str, EvalResult], status: Statuses, config: RatingConfig
) -> dict[str, float]:
    """The window's match: evaluated peers score g_random; a failed peer scores
    ``min(0, lowest g_random) − penalty(kind)`` so it ranks below every evaluated peer."""
    low = min([0.0, *(r.gain_random for r in evaluated.values())])
    penalty = {
        "missing": config.penalty_missing,
        "timeout": config.penalty_missing,
        "late": config.penalty_late,
        "invalid": config.penalty_invalid,
        "copy": config.penalty_copy,
        "bad_data": config.penalty_data,
        "replay": config.penalty_copy,
    }
    match = {p: r.gain_random for p, r in evaluated.items()}
    for peer, (kind, _) in status.items():
        match[peer] = low - penalty.get(kind, config.penalty_invalid)
    return match
