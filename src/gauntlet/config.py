"""Typed, validated configuration of the scorer; every default is documented on its field.

``GauntletConfig`` groups one dataclass per concern. All are frozen, check their fields in
``__post_init__`` and raise :class:`~gauntlet.errors.GauntletConfigError` (a ``ValueError``)
with a sentence naming the field, the bad value and the accepted range.
``to_dict``/``from_dict`` round-trip through plain JSON values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from gauntlet.errors import GauntletConfigError

WeightScheme = Literal["power", "rank"]
RatingTransform = Literal["clamp", "shift"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise GauntletConfigError(message)


def _positive_int(name: str, value: Any) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{name} must be a positive integer, got {value!r}; pass an int >= 1",
    )


def _finite(name: str, value: Any, lo: float, hi: float, *, open_lo: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if open_lo else value >= lo) and value <= hi
    bracket = "(" if open_lo else "["
    _require(ok, f"{name} must be a finite number in {bracket}{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class AssignmentConfig:
    """Which samples a peer trains on and which ones a validator evaluates.

    Args:
        num_samples: size of the sample-id space ``[0, num_samples)``; set it to your
            dataset's length (default 65,536).
        samples_per_peer: ids assigned to one peer per window (default 64).
        eval_assigned: how many of those the validator evaluates, drawn with the window's
            evaluation seed (default 32; at most ``samples_per_peer``).
        eval_random: size of the shared random evaluation set per window (default 64).
        enforce_digest: a peer whose published proof-of-data digest is missing or differs
            from the one recomputed from its assignment fails the window (default True).
    """

    num_samples: int = 65_536
    samples_per_peer: int = 64
    eval_assigned: int = 32
    eval_random: int = 64
    enforce_digest: bool = True

    def __post_init__(self) -> None:
        for name in ("num_samples", "samples_per_peer", "eval_assigned", "eval_random"):
            _positive_int(name, getattr(self, name))
        _require(
            self.samples_per_peer <= self.num_samples and self.eval_random <= self.num_samples,
            f"samples_per_peer ({self.samples_per_peer}) and eval_random ({self.eval_random}) "
            f"must not exceed num_samples ({self.num_samples}); raise num_samples",
        )
        _require(
            self.eval_assigned <= self.samples_per_peer,
            f"eval_assigned ({self.eval_assigned}) must not exceed samples_per_peer "
            f"({self.samples_per_peer}); lower eval_assigned",
        )


@dataclass(frozen=True)
class EvalConfig:
    """How one peer's update is applied for evaluation: θ ← θ − α·scale·f·v, with f from
    :mod:`gauntlet.clipping`.

    Args:
        outer_lr: α, the outer learning rate of the run (default 1.0).
        step_scale: fraction of the outer step used for evaluation (default 0.2, Gauntlet).
        eval_mode: run the loss with ``model.eval()`` (no dropout) and restore each module's
            training flag afterwards (default True).
        loss_floor: smallest |L_before| a relative gain divides by (default 1e-8).
        clip_growth: the next window's clip reference counts each accepted norm clamped to
            [r/clip_growth, clip_growth·r] of the current reference r, so it moves by at most
            that factor per window (default 2.0; see :mod:`gauntlet.clipping`).
    """

    outer_lr: float = 1.0
    step_scale: float = 0.2
    eval_mode: bool = True
    loss_floor: float = 1e-8
    clip_growth: float = 2.0

    def __post_init__(self) -> None:
        _finite("outer_lr", self.outer_lr, 0.0, 1e6, open_lo=True)
        _finite("clip_growth", self.clip_growth, 1.0, 1e6)
        _finite("step_scale", self.step_scale, 0.0, 1e6, open_lo=True)
        _finite("loss_floor", self.loss_floor, 0.0, 1.0, open_lo=True)

    @property
    def step(self) -> float:
        """The evaluation step size α·scale."""
        return self.outer_lr * self.step_scale


@dataclass(frozen=True)
class SignalConfig:
    """Sync check, copy detection and the assigned-data indicator.

    Args:
        sync_samples: parameter values each peer publishes for the sync check (default 256).
        sync_max: x at which sync reaches 0, in rounds of typical change (default 3.0).
        sync_power: exponent of sync = (1 − min(x, max)/max)^power (default 2.5).
        sync_missing: sync of a peer that published no (or malformed) values (default 0.0).
        copy_overlap: mean per-chunk top-k index overlap at which the later publisher of a
            pair is blamed for copying (default 0.4).
        copy_cosine: cosine similarity of two decoded updates at which the later one is a
            near-duplicate (default 0.95); identical updates are always duplicates.
        bma_decay: EMA decay of the assigned-data indicator, BMA ← d·BMA + (1−d)·b
            (default 0.95).
        bma_threshold: the (debiased) BMA below this counts as 0 once a peer has
            ``bma_warmup`` evaluations (default 0.10).
        bma_warmup: evaluations before the threshold applies (default 3).
        bma_debias: divide the BMA by 1 − dᵐ after m updates, as Adam debiases its moments
            (default True; False is Gauntlet's raw moving average).
        bma_full: the debiased BMA at which the score's factor reaches 1, factor =
            min(1, BMA / bma_full) (default 0.5; 1.0 is Gauntlet's factor = BMA).
        assigned_reference: ``"cross"`` (default): an update's advantage on its peer's
            assigned data over the random set, less the median advantage the other evaluated
            peers' updates show on that same data (:func:`gauntlet.evaluate.cross_indicators`;
            n·(k + 1) assigned-set evaluations for n peers); ``"random"``: Gauntlet's advantage
            over the random set alone (:func:`gauntlet.evaluate.assigned_indicator`; n).
        cross_peers: k, how many other peers' updates each assigned set is evaluated with
            for the cross indicator, drawn after the deadline when there are more
            (:func:`gauntlet.assignment.cross_partners`; at least 3, odd so that half of the
            scorers cannot set the median; default 15).
        assigned_margin: subtracted from the indicator's relative advantage (default 0.0).
        assigned_scale: relative advantage (own-data gain minus the reference's, as a
            fraction of the largest gain in play) that earns b = +1; the indicator is linear
            from −scale to +scale (default 0.05: an honest peer's cross x averaged 0.046 over
            the main job's recorded windows; 0 is Gauntlet's b = ±1).
        replay_windows: content digests of updates and aggregates are remembered for this
            many windows; an update with the content of one of them is a ``replay``
            (default 64; memory ≤ replay_windows × (peers + 1) digests).
        replay_cosine: an update whose sketch cosine (:mod:`gauntlet.sketches`) with an
            update or aggregate of the last ``replay_sketch_windows`` windows reaches this is
            a ``replay`` too: an old update sent again with values nudged or tensors rescaled
            (default 0.9: an unrelated update's estimate errs by ~1/16, and the scoring tests
            check that a re-encoded old update with 1 % noise is caught and that honest
            peers' consecutive updates are not).
        replay_sketch_windows: windows of sketches kept (default 8; memory 256 floats per
            update and aggregate kept).
        provenance_margin: how much better (relative to the pair's largest |gain|) one
            member's update must fit the other's data for provenance to decide a copy;
            below it the storage server's time order does (default 0.25).
    """

    sync_samples: int = 256
    sync_max: float = 3.0
    sync_power: float = 2.5
    sync_missing: float = 0.0
    copy_overlap: float = 0.4
    copy_cosine: float = 0.95
    bma_decay: float = 0.95
    bma_threshold: float = 0.10
    bma_warmup: int = 3
    bma_debias: bool = True
    bma_full: float = 0.5
    assigned_reference: str = "cross"
    cross_peers: int = 15
    assigned_margin: float = 0.0
    assigned_scale: float = 0.05
    replay_windows: int = 64
    replay_cosine: float = 0.9
    replay_sketch_windows: int = 8
    provenance_margin: float = 0.25

    def __post_init__(self) -> None:
        _positive_int("sync_samples", self.sync_samples)
        _positive_int("replay_windows", self.replay_windows)
        _positive_int("cross_peers", self.cross_peers)
        _require(
            self.cross_peers >= 3 and self.cross_peers % 2 == 1,
            f"cross_peers must be an odd integer >= 3, got {self.cross_peers!r}",
        )
        _positive_int("replay_sketch_windows", self.replay_sketch_windows)
        _finite("replay_cosine", self.replay_cosine, 0.0, 1.0, open_lo=True)
        _finite("sync_max", self.sync_max, 0.0, 1e6, open_lo=True)
        _finite("sync_power", self.sync_power, 0.0, 100.0, open_lo=True)
        _finite("sync_missing", self.sync_missing, 0.0, 1.0)
        _finite("copy_overlap", self.copy_overlap, 0.0, 1.0, open_lo=True)
        _finite("copy_cosine", self.copy_cosine, 0.0, 1.0, open_lo=True)
        _finite("provenance_margin", self.provenance_margin, 0.0, 10.0)
        _finite("bma_decay", self.bma_decay, 0.0, 1.0)
        _finite("bma_threshold", self.bma_threshold, 0.0, 1.0)
        _require(
            isinstance(self.bma_warmup, int) and self.bma_warmup >= 0,
            f"bma_warmup must be an integer >= 0, got {self.bma_warmup!r}",
        )
        _require(
            self.assigned_reference in ("cross", "random"),
            f"assigned_reference must be 'cross' or 'random', got {self.assigned_reference!r}",
        )
        _finite("assigned_margin", self.assigned_margin, -1.0, 1.0)
        _finite("assigned_scale", self.assigned_scale, 0.0, 100.0)
        _finite("bma_full", self.bma_full, 0.0, 1.0, open_lo=True)
        _require(
            isinstance(self.bma_debias, bool),
            f"bma_debias must be a bool, got {self.bma_debias!r}",
        )


@dataclass(frozen=True)
class RatingConfig:
    """OpenSkill Plackett-Luce ratings and the penalties of failed contributions.

    A failed peer enters the window's match with score ``min(0, lowest valid score) −
    penalty`` so it ranks below every evaluated peer, the more severe failures lowest.

    Args:
        beta: PlackettLuce β (default 7).
        tau: PlackettLuce τ, the per-match sigma inflation (default 0.1).
        mu: a fresh rating's μ (default 25).
        sigma: a fresh rating's σ (default 25/3).
        z: ordinal = μ − z·σ (default 3; a fresh ordinal is 0).
        transform: how the ordinal becomes a non-negative factor: ``"clamp"`` =
            max(0, ordinal) (default), ``"shift"`` = max(0, ordinal + shift).
        shift: offset for ``"shift"`` (default 0.0).
        null_anchor: a fresh player ranked just above sending nothing joins every match
            (default True). Without it, ratings only compare peers with each other: in a
            swarm of equally good honest peers the ranking is noise, half of them lose rating
            each window and the clamp leaves them at weight 0. With it, a peer also gains by
            beating doing-nothing, so steady helpers all rise, while free-riders (a zero
            update) and harmful peers lose to the anchor and fall.
        anchor_matches: besides the free-for-all, every rated peer plays the null anchor
            one-on-one each window (default True; only with ``null_anchor``). In the
            free-for-all a helper ranked below the others still loses μ, so in short runs
            the weakest of several equal honest peers (or every honest peer beside one
            strong one) stayed at μ − 3σ ≤ 0; the one-on-one match credits usefulness on
            its own; a better peer still rates higher (tested in
            ``tests/gauntlet/test_signals.py``).
        penalty_missing: for ``missing`` and ``timeout`` statuses (default 1.0).
        penalty_late: for ``late`` (default 0.5).
        penalty_invalid: for ``invalid`` updates, non-finite or undecodable (default 2.0).
        penalty_copy: for a blamed copier (default 2.0).
        penalty_data: for a proof-of-data digest mismatch (default 2.0).
    """

    beta: float = 7.0
    tau: float = 0.1
    mu: float = 25.0
    sigma: float = 25.0 / 3.0
    z: float = 3.0
    transform: RatingTransform = "clamp"
    shift: float = 0.0
    null_anchor: bool = True
    anchor_matches: bool = True
    penalty_missing: float = 1.0
    penalty_late: float = 0.5
    penalty_invalid: float = 2.0
    penalty_copy: float = 2.0
    penalty_data: float = 2.0

    def __post_init__(self) -> None:
        _finite("beta", self.beta, 0.0, 1e6, open_lo=True)
        _finite("tau", self.tau, 0.0, 1e6)
        _finite("mu", self.mu, -1e6, 1e6)
        _finite("sigma", self.sigma, 0.0, 1e6, open_lo=True)
        _finite("z", self.z, 0.0, 100.0)
        _require(
            self.transform in ("clamp", "shift"),
            f"transform must be 'clamp' or 'shift', got {self.transform!r}",
        )
        _finite("shift", self.shift, -1e6, 1e6)
        _require(
            isinstance(self.null_anchor, bool),
            f"null_anchor must be true or false, got {self.null_anchor!r}",
        )
        _require(
            isinstance(self.anchor_matches, bool),
            f"anchor_matches must be true or false, got {self.anchor_matches!r}",
        )
        for name in ("missing", "late", "invalid", "copy", "data"):
            _finite(f"penalty_{name}", getattr(self, f"penalty_{name}"), 0.0, 1e6, open_lo=True)


@dataclass(frozen=True)
class WeightsConfig:
    """How final scores become normalized weights.

    Args:
        scheme: ``"power"``: w ∝ s^power (default); ``"rank"``: a fixed profile by rank.
        power: exponent of the power scheme (default 1.0, weights in proportion to scores;
            early Templar used 2.0, which squares the rating noise between equally good
            peers: in 8–12 windows their weights then often differ more than 3×).
        rank_top: peers in the top band of the rank profile (default 20).
        rank_top_share: total weight of the top band (default 0.75).
        rank_ramp: first-to-last weight ratio on the top band's linear ramp (default 2.0).
        rank_next: peers in the second band (default 10).
        rank_next_ratio: ratio between consecutive weights of the geometric second band
            (default 0.8).
        burn_uid: uid that receives ``burn_fraction`` of the weight (default None: no burn).
        burn_fraction: share of the weight sent to ``burn_uid`` (default 0.0).
    """

    scheme: WeightScheme = "power"
    power: float = 1.0
    rank_top: int = 20
    rank_top_share: float = 0.75
    rank_ramp: float = 2.0
    rank_next: int = 10
    rank_next_ratio: float = 0.8
    burn_uid: int | None = None
    burn_fraction: float = 0.0

    def __post_init__(self) -> None:
        _require(
            self.scheme in ("power", "rank"),
            f"scheme must be 'power' or 'rank', got {self.scheme!r}",
        )
        _finite("power", self.power, 0.0, 100.0, open_lo=True)
        _positive_int("rank_top", self.rank_top)
        _require(
            isinstance(self.rank_next, int) and self.rank_next >= 0,
            f"rank_next must be an integer >= 0, got {self.rank_next!r}",
        )
        _finite("rank_top_share", self.rank_top_share, 0.0, 1.0, open_lo=True)
        _finite("rank_ramp", self.rank_ramp, 1.0, 1e6)
        _finite("rank_next_ratio", self.rank_next_ratio, 0.0, 1.0, open_lo=True)
        _finite("burn_fraction", self.burn_fraction, 0.0, 1.0)
        _require(
            self.burn_uid is None or (isinstance(self.burn_uid, int) and self.burn_uid >= 0),
            f"burn_uid must be None or a uid >= 0, got {self.burn_uid!r}",
        )
        _require(
            self.burn_fraction == 0.0 or self.burn_uid is not None,
            "burn_fraction > 0 needs a burn_uid; set burn_uid or burn_fraction=0",
        )


_SECTIONS = {
    "assignment": AssignmentConfig,
    "evaluation": EvalConfig,
    "signals": SignalConfig,
    "rating": RatingConfig,
    "weights": WeightsConfig,
}


@dataclass(frozen=True)
class GauntletConfig:
    """Everything the scorer needs besides the model, the loss and the data.

    Args:
        assignment: data assignment sizes (:class:`AssignmentConfig`).
        evaluation: the evaluation step (:class:`EvalConfig`).
        signals: sync, copy and assigned-data indicator (:class:`SignalConfig`).
        rating: OpenSkill and penalties (:class:`RatingConfig`).
        weights: the weight scheme and burn (:class:`WeightsConfig`).
        max_evaluations: evaluate at most this many peers per window, the least recently
            evaluated first (ties by a hash of the window seed); None = all (default).
    """

    assignment: AssignmentConfig = field(default_factory=AssignmentConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    signals: SignalConfig = field(default_factory=SignalConfig)
    rating: RatingConfig = field(default_factory=RatingConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    max_evaluations: int | None = None

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            _require(
                isinstance(getattr(self, name), cls),
                f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}",
            )
        if self.max_evaluations is not None:
            _positive_int("max_evaluations", self.max_evaluations)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GauntletConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise instead of being ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        _require(not unknown, f"unknown GauntletConfig fields {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            section = _SECTIONS.get(name)
            if section is None:
                kwargs[name] = value
                continue
            allowed = {f.name for f in fields(section)}
            bad = sorted(set(value) - allowed)
            _require(not bad, f"unknown {section.__name__} fields {bad}; known: {sorted(allowed)}")
            kwargs[name] = section(**value)
        return cls(**kwargs)
