"""Raw challenge scores → OpenSkill ratings and u16 weights set on the chain.

Every challenge ends the same way (REFERENCE §4): it exposes a raw non-negative score per
hotkey. The weights follow those raw scores through :func:`gauntlet.normalize_scores` (a
platform blends each challenge's normalized scores by its emission share); the OpenSkill
rating from :func:`gauntlet.rate_match` (one match per epoch) is the standing a validator
carries from epoch to epoch, so one lucky epoch does not decide who is ahead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gauntlet import (
    ChainWeights,
    InMemorySubnet,
    RatingConfig,
    SetWeightsResult,
    WeightsConfig,
    normalize_scores,
    ordinal,
    rate_match,
    to_u16,
)


@dataclass(frozen=True)
class SettleConfig:
    """How scores become ratings and weights (gauntlet's own defaults unless overridden)."""

    rating: RatingConfig = field(default_factory=RatingConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)


@dataclass(frozen=True)
class Settlement:
    """What one epoch's settlement produced.

    Attributes:
        ratings: (μ, σ) per hotkey after this epoch's match (earlier ones carried over).
        ordinals: μ − 3σ per hotkey.
        weights: normalized weight per hotkey (sums to 1 when any score is positive).
        chain_weights: the u16 vector sent to the chain (None when every score was 0).
        result: the chain's answer.
    """

    ratings: dict[str, tuple[float, float]]
    ordinals: dict[str, float]
    weights: dict[str, float]
    chain_weights: ChainWeights | None
    result: SetWeightsResult


def settle(
    subnet: InMemorySubnet,
    validator: str,
    scores: Mapping[str, float],
    prior_ratings: Mapping[str, tuple[float, float]] | None = None,
    config: SettleConfig | None = None,
) -> Settlement:
    """Rate this epoch's match, normalize the scores and set weights as ``validator``."""
    config = config or SettleConfig()
    ratings = dict(prior_ratings or {})
    ratings.update(rate_match(ratings, scores, config.rating))
    ordinals = {h: ordinal(mu, sigma, config.rating) for h, (mu, sigma) in ratings.items()}
    weights = normalize_scores(scores, config.weights)
    if not any(weights.values()):
        return Settlement(
            ratings, ordinals, weights, None, SetWeightsResult(False, "no positive score")
        )
    graph = subnet.metagraph()
    uids = graph.hotkey_to_uid()
    limits = subnet.limits
    chain_weights = to_u16(
        {uids[h]: w for h, w in weights.items()},
        graph.uids,
        max_weight_limit=limits.max_weight_limit,
        min_allowed_weights=limits.min_allowed_weights,
    )
    result = subnet.connect(validator).set_weights(
        chain_weights.uids, chain_weights.values, limits.version_key
    )
    return Settlement(ratings, ordinals, weights, chain_weights, result)
