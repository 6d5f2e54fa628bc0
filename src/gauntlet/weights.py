"""Scores → normalized weights → the chain's u16 form.

Normalization schemes (only finite scores > 0 get weight):

* power: wᵢ = sᵢ^p / Σⱼ sⱼ^p (p = 2: early Templar);
* rank: peers sorted by score (ties by id). The top ``rank_top`` share ``rank_top_share`` on
  a linear ramp whose first weight is ``rank_ramp`` times its last; the next ``rank_next``
  share the rest geometrically (ratio ``rank_next_ratio``); a band with no peers gives its
  share to the others (the weights always sum to 1).

:func:`to_u16` then applies an optional burn (w ← (1−b)·w, w_burn += b), caps every weight at
``max_weight_limit`` by water-filling (the excess of capped entries is redistributed in
proportion to the others, repeatedly, never truncated), scales so the largest entry is
65535 as the SDK does, checks the chain's cap again on the rounded values, and adds the
smallest weight (1) to the lowest uids without weight until ``min_allowed_weights`` uids
have one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gauntlet.config import WeightsConfig
from gauntlet.errors import WeightsError

U16_MAX = 65535


def rank_profile(n: int, config: WeightsConfig) -> list[float]:
    """Weights of ranks 0..n−1 under the rank scheme (sum 1; ranks past both bands get 0)."""
    if n <= 0:
        return []
    top = min(n, config.rank_top)
    nxt = min(n - top, config.rank_next)
    ramp = [
        config.rank_ramp - (config.rank_ramp - 1.0) * (i / (top - 1) if top > 1 else 0.0)
        for i in range(top)
    ]
    geo = [config.rank_next_ratio**i for i in range(nxt)]
    top_share = config.rank_top_share if nxt else 1.0
    out = [top_share * r / sum(ramp) for r in ramp]
    if nxt:
        out += [(1.0 - top_share) * g / sum(geo) for g in geo]
    return out + [0.0] * (n - top - nxt)


def normalize_scores(scores: Mapping[str, float], config: WeightsConfig) -> dict[str, float]:
    """Weights summing to 1 over peers with a positive score (all 0 when there are none)."""
    positive = {p: float(s) for p, s in scores.items() if math.isfinite(s) and s > 0}
    out = dict.fromkeys(scores, 0.0)
    if not positive:
        return out
    if config.scheme == "power":
        powered = {p: s**config.power for p, s in sorted(positive.items())}
        total = math.fsum(powered.values())
        if total <= 0.0 or not math.isfinite(total):
            raise WeightsError("scores underflow or overflow under the power scheme; rescale")
        out.update({p: v / total for p, v in powered.items()})
        return out
    ranked = sorted(positive, key=lambda p: (-positive[p], p))
    out.update(dict(zip(ranked, rank_profile(len(ranked), config), strict=True)))
    return out


def cap_weights(weights: Sequence[float], limit: float) -> list[float]:
    """Water-fill: every entry ≤ ``limit``, excess redistributed in proportion to the rest.

    ``weights`` must sum to 1. When the positive entries cannot absorb the mass
    (count·limit < 1), the remainder is spread evenly over the zero entries, in order.
    """
    w = [float(x) for x in weights]
    n = len(w)
    if n * limit < 1.0 - 1e-12:
        raise WeightsError(
            f"{n} uids with max_weight_limit {limit:.6f} cannot hold a total weight of 1; "
            "the subnet needs more registered uids or a larger max_weight_limit"
        )
    capped: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in capped and w[i] > 0]
        room = 1.0 - limit * len(capped)
        mass = math.fsum(w[i] for i in free)
        if not free or mass <= 0.0:
            break
        scaled = {i: w[i] * room / mass for i in free}
        over = [i for i in free if scaled[i] > limit]
        for i in free:
            w[i] = scaled[i]
        if not over:
            break
        for i in over:
            w[i] = limit
            capped.add(i)
    rest = 1.0 - math.fsum(w)
    if rest > 1e-12:
        # only positives capped and no uncapped positive left: use zero entries, evenly
        zeros = [i for i in range(n) if w[i] == 0.0]
        share = rest / len(zeros)
        for i in zeros:
            w[i] = min(limit, share)
    return w


@dataclass(frozen=True)
class ChainWeights:
    """The weights as the chain takes them: uids ascending, u16 values, zeros dropped."""

    uids: list[int]
    values: list[int]

    def normalized(self) -> dict[int, float]:
        total = sum(self.values)
        return {u: v / total for u, v in zip(self.uids, self.values, strict=True)} if total else {}


def _chain_max(values: list[int]) -> int:
    total = sum(values)
    return max(v * U16_MAX // total for v in values) if total else 0


def to_u16(
    weights: Mapping[int, float],
    uids: Sequence[int],
    *,
    max_weight_limit: float = 1.0,
    min_allowed_weights: int = 0,
    burn_uid: int | None = None,
    burn_fraction: float = 0.0,
) -> ChainWeights:
    """Normalized per-uid weights → :class:`ChainWeights` the chain will accept.

    Args:
        weights: uid → weight ≥ 0 (normalized or not); uids absent get 0.
        uids: every registered uid (the candidates for redistribution and minimum weights).
        max_weight_limit: the chain's cap on one normalized weight, as a fraction (u16/65535).
        min_allowed_weights: the chain's minimum count of non-zero weights.
        burn_uid / burn_fraction: share of the weight sent to a burn uid.
    """
    order = sorted(set(int(u) for u in uids))
    if not order:
        raise WeightsError("no registered uids to set weights on")
    unknown = sorted(set(weights) - set(order))
    if unknown:
        raise WeightsError(f"weights name uids that are not registered: {unknown}")
    if burn_uid is not None and burn_uid not in order:
        raise WeightsError(f"burn uid {burn_uid} is not registered; fix WeightsConfig.burn_uid")
    if min_allowed_weights > len(order):
        raise WeightsError(
            f"min_allowed_weights={min_allowed_weights} exceeds the {len(order)} registered uids"
        )
    vec = [max(0.0, float(weights.get(u, 0.0))) for u in order]
    if any(not math.isfinite(v) for v in vec):
        raise WeightsError("weights must be finite")
    total = math.fsum(vec)
    if burn_uid is not None and (burn_fraction > 0.0 or total == 0.0):
        frac = 1.0 if total == 0.0 else burn_fraction
        vec = [(1.0 - frac) * v / (total or 1.0) for v in vec]
        vec[order.index(burn_uid)] += frac
    elif total == 0.0:
        raise WeightsError("every weight is 0 and there is no burn uid; nothing to set")
    else:
        vec = [v / total for v in vec]
    limit = min(1.0, max(0.0, float(max_weight_limit)))
    vec = cap_weights(vec, limit)
    top = max(vec)
    values = [round(v / top * U16_MAX) for v in vec]
    limit_u16 = math.floor(limit * U16_MAX)
    # rounding can push the largest entries a hair over the chain's cap: shave them
    while len([v for v in values if v]) > 1 and _chain_max(values) > limit_u16:
        i = max(range(len(values)), key=lambda j: (values[j], -j))
        values[i] -= 1
    missing = min_allowed_weights - sum(1 for v in values if v)
    for i in range(len(values)):
        if missing <= 0:
            break
        if values[i] == 0:
            values[i] = 1
            missing -= 1
    kept = [(u, v) for u, v in zip(order, values, strict=True) if v]
    return ChainWeights(uids=[u for u, _ in kept], values=[v for _, v in kept])
