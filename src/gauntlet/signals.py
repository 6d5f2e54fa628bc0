"""Sync check, copy detection and the assigned-data indicator's moving average.

**Sync.** Each peer publishes the values of ``sync_samples`` parameter entries of the model
it started the window from; positions come from (public seed, window) by hash
(:func:`sync_positions`). With θ_val the validator's values at those positions and
τ = mean|θ_t − θ_{t−1}| the validator's own last per-round change at the same positions,

    x = mean|θ_val − θ_peer| / τ,   sync = (1 − min(x, x_max)/x_max)^p

(x_max = 3, p = 2.5 by default), so a peer one round behind has x ≈ 1 and sync ≈ 0.36, three
rounds behind 0. Without a reference yet (a validator's first window) sync is 1.

**Copies.** For two peers a, b: the mean over chunks of |I_a ∩ I_b| / k (top-k index overlap)
and the cosine of the decoded updates. A pair is *similar* when the updates are identical, the
cosine ≥ ``copy_cosine`` or the overlap ≥ ``copy_overlap``. Who copied whom is decided by
provenance, not by time (publish times are set or raced by the copier: a local mtime can be
backdated, S3 ties at 1 s): an update is trained on its author's assigned data, so with
fit(x, y) the gain of x's update on y's evaluated assigned samples (:func:`blame_copies`),

    m(x) = fit(x, y) − fit(x, x)          (how much better x's update fits y's data)

and at most one member of a similar pair is blamed. With s the largest |fit| of the pair and
τ = ``provenance_margin``: when max(m(x), m(y)) ≥ τ·s, the one with the larger m (an exact
copy of y, or an update trained on y's assignment, fits y's data better than the copier's
own); when both m ≤ −τ·s, nobody (two look-alikes that each fit their own data). A small
model or a small evaluation set can leave the fits within noise of each other; then, and
only then, the storage server's clock decides: the later of the two stored objects
(``WindowInputs.publish_times``, the time the *server* stamped, never one the peer
supplies) is blamed, and when those tie (same second on S3) the larger m. A copier that
backdates or races therefore only wins where the fits are too close to tell.

**Assigned-data indicator.** BMA ← max(0, d·BMA + (1−d)·b) with b ∈ [−1, 1]
(:func:`gauntlet.evaluate.cross_indicators`, or Gauntlet's
:func:`gauntlet.evaluate.assigned_indicator`), from BMA = 0. After m updates the moving
average is debiased as Adam's moments are, B = BMA / (1 − dᵐ) (``bma_debias``; without it a
peer needs ~1/(1−d) = 20 windows before B can reach its real level, and the threshold zeroes
honest peers of short runs); B counts as 0 when B < threshold once the peer has ``warmup``
evaluations; the score's factor is min(1, B / ``bma_full``), so every peer whose indicator
is clearly positive gets the full factor and the weights of equal peers are not spread by
the indicator's noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from gauntlet.assignment import draw_ids
from gauntlet.config import SignalConfig
from gauntlet.decoding import DecodedUpdate


def sync_positions(
    shapes: Mapping[str, tuple[int, ...]], window: int, seed: str, count: int
) -> list[tuple[str, int]]:
    """(parameter name, flat index) pairs to sample in ``window``, in a fixed order."""
    names = sorted(shapes)
    sizes = [math.prod(shapes[n]) for n in names]
    total = sum(sizes)
    picks = sorted(draw_ids("sync", (seed, int(window)), total, min(count, total)))
    out: list[tuple[str, int]] = []
    bounds = np.cumsum([0, *sizes])
    for g in picks:
        i = int(np.searchsorted(bounds, g, side="right")) - 1
        out.append((names[i], int(g - bounds[i])))
    return out


def sample_values(
    params: Mapping[str, torch.Tensor], positions: list[tuple[str, int]]
) -> torch.Tensor:
    """The float64 values of ``params`` at ``positions`` (what a peer publishes)."""
    if not positions:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(
        [params[name].detach().reshape(-1)[i].to(torch.float64).cpu() for name, i in positions]
    )


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a − b| in float64."""
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().mean())


@dataclass(frozen=True)
class SyncResult:
    """x (rounds behind, NaN when unknown) and the sync factor in [0, 1]."""

    x: float
    score: float


def sync_score(
    own: torch.Tensor,
    peer: torch.Tensor | None,
    typical_change: float | None,
    config: SignalConfig,
) -> SyncResult:
    """sync = (1 − min(x, x_max)/x_max)^p with x = mean|own − peer| / typical_change."""
    if peer is None or tuple(peer.shape) != tuple(own.shape):
        return SyncResult(math.nan, config.sync_missing)
    peer = peer.to(torch.float64)
    if not bool(torch.isfinite(peer).all()):
        return SyncResult(math.nan, config.sync_missing)
    diff = mean_abs_diff(own, peer)
    if diff == 0.0:
        return SyncResult(0.0, 1.0)
    if typical_change is None:
        return SyncResult(math.nan, 1.0)
    x = diff / typical_change if typical_change > 0 else math.inf
    frac = min(x, config.sync_max) / config.sync_max
    return SyncResult(x, (1.0 - frac) ** config.sync_power)


@dataclass(frozen=True)
class PairSimilarity:
    """Similarity of two peers' updates (``a`` < ``b`` by id)."""

    a: str
    b: str
    overlap: float
    cosine: float
    identical: bool


@dataclass(frozen=True)
class CopyVerdict:
    """``peer`` is blamed for copying ``source``: its update fits ``source``'s assigned data
    (gain ``fit_source``) at least as well as its own (``fit_own``)."""

    peer: str
    source: str
    overlap: float
    cosine: float
    identical: bool
    fit_own: float
    fit_source: float


def index_overlap(a: DecodedUpdate, b: DecodedUpdate) -> float:
    """Mean over all sparse chunks of |I_a ∩ I_b| / k; NaN when no tensor is sparse."""
    total, chunks = 0.0, 0
    for name in sorted(set(a.keys) & set(b.keys)):
        n_chunks, k = a.kept[name]
        if n_chunks == 0 or b.kept[name] != (n_chunks, k):
            continue
        shared = np.intersect1d(a.keys[name], b.keys[name], assume_unique=True).size
        total += shared / k
        chunks += n_chunks
    return total / chunks if chunks else math.nan


def pair_similarities(updates: Mapping[str, DecodedUpdate]) -> list[PairSimilarity]:
    """Overlap, cosine and identity of every pair, peers in sorted order (float64 Gram)."""
    peers = sorted(updates)
    n = len(peers)
    if n < 2:
        return []
    gram = np.zeros((n, n), dtype=np.float64)
    names = sorted(updates[peers[0]].dense)
    for name in names:
        mat = torch.stack(
            [updates[p].dense[name].reshape(-1).to(torch.float64).cpu() for p in peers]
        )
        gram += (mat @ mat.T).numpy()
    norms = np.sqrt(np.diag(gram))
    out = []
    for i in range(n):
        for j in range(i + 1, n):
            a, b = updates[peers[i]], updates[peers[j]]
            denom = norms[i] * norms[j]
            cos = float(gram[i, j] / denom) if denom > 0 else 0.0
            identical = (norms[i] == norms[j]) and (denom == 0 or cos > 1 - 1e-9)
            identical = identical and all(torch.equal(a.dense[m], b.dense[m]) for m in names)
            out.append(PairSimilarity(peers[i], peers[j], index_overlap(a, b), cos, identical))
    return out


def is_similar(pair: PairSimilarity, config: SignalConfig) -> bool:
    """Identical, cosine ≥ ``copy_cosine`` or index overlap ≥ ``copy_overlap``."""
    overlap_hit = not math.isnan(pair.overlap) and pair.overlap >= config.copy_overlap
    return pair.identical or pair.cosine >= config.copy_cosine or overlap_hit


def blame_copies(
    pairs: list[PairSimilarity],
    fits: Mapping[tuple[str, str], float],
    config: SignalConfig,
    times: Mapping[str, float] | None = None,
) -> dict[str, CopyVerdict]:
    """One member of every similar pair, by provenance, else by server time (see the module
    docstring), each with the strongest evidence against it.

    ``fits[(x, y)]`` is the gain of x's update on y's assigned samples; it must hold both
    members' own and cross fits for every similar pair. ``times``: storage-server times of
    the updates (peers without one are never blamed by time).
    """
    blamed: dict[str, CopyVerdict] = {}
    for pair in pairs:
        if not is_similar(pair, config):
            continue
        peer = _copier(pair, fits, config, times or {})
        if peer is None:
            continue
        source = pair.b if peer == pair.a else pair.a
        verdict = CopyVerdict(
            peer,
            source,
            pair.overlap,
            pair.cosine,
            pair.identical,
            fits[(peer, peer)],
            fits[(peer, source)],
        )
        prev = blamed.get(peer)
        if prev is None or (verdict.cosine, verdict.source) > (prev.cosine, prev.source):
            blamed[peer] = verdict
    return blamed


def _copier(
    pair: PairSimilarity,
    fits: Mapping[tuple[str, str], float],
    config: SignalConfig,
    times: Mapping[str, float],
) -> str | None:
    """The blamed member of a similar pair; ``None`` when a fit is not finite."""
    a, b = pair.a, pair.b
    values = (fits[(a, a)], fits[(a, b)], fits[(b, b)], fits[(b, a)])
    if not all(math.isfinite(v) for v in values):
        return None
    margin = {a: fits[(a, b)] - fits[(a, a)], b: fits[(b, a)] - fits[(b, b)]}
    by_margin = a if (margin[a], b) >= (margin[b], a) else b
    bar = config.provenance_margin * max(abs(v) for v in values)
    if max(margin.values()) >= bar:
        return by_margin
    if max(margin.values()) <= -bar:
        return None  # each fits its own data clearly better: look-alikes, not copies
    if a in times and b in times and times[a] != times[b]:
        return a if times[a] > times[b] else b
    return by_margin


def update_bma(bma: float, indicator: float, config: SignalConfig) -> float:
    """BMA ← max(0, d·BMA + (1 − d)·b)."""
    d = config.bma_decay
    return max(0.0, d * bma + (1.0 - d) * float(indicator))


def effective_bma(bma: float, evaluations: int, updates: int, config: SignalConfig) -> float:
    """The score's factor: B = BMA / (1 − dᵐ) over m = ``updates`` (debiased), 0 below the
    threshold once past ``warmup`` evaluations, then min(1, B / bma_full)."""
    value = max(0.0, bma)
    weight = 1.0 - config.bma_decay**updates
    if config.bma_debias and weight > 0.0:  # with d = 1 the average never moves: no debias
        value = min(1.0, value / weight)
    if evaluations >= config.bma_warmup and value < config.bma_threshold:
        return 0.0
    return min(1.0, value / config.bma_full)
