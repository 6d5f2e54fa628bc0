"""OpenSkill Plackett-Luce ratings: one match per window, ranked by the window's scores.

Each peer holds (μ, σ), fresh at (25, 25/3). Per window every evaluated or failed peer enters
one free-for-all match (``openskill.models.PlackettLuce``, β = 7, τ = 0.1), peers in sorted
id order, higher score = better rank. The ordinal μ − z·σ (z = 3) of a fresh rating is 0 and
a loser's goes negative; multiplying a negative ordinal by the other factors would reward
losers with two negatives, so :func:`rating_factor` maps it to a non-negative factor first:

* ``"clamp"``: max(0, μ − z·σ)  (fresh peers and losers get 0 until they win);
* ``"shift"``: max(0, μ − z·σ + shift).

With ``null_anchor`` (default) a fresh player that ranks just above sending nothing joins
every match, so peers gain rating by helping, not only by beating each other: equally good
honest peers all rise; a free-rider (score exactly 0) and a harmful peer lose to it. The
anchor's score is the smallest positive float, not 0: a draw would shrink the free-rider's
σ and so raise its ordinal μ − z·σ.

With ``null_anchor`` and ``anchor_matches`` (both default) every rated peer then also plays
a fresh anchor one-on-one (two-player matches, peers in sorted order, each from its rating
after the free-for-all): the free-for-all orders peers by quality, the one-on-one credits
each for beating doing-nothing whatever the others did, so equally good honest peers rise
together instead of the weakest of them sinking below an ordinal of 0 in a short run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from openskill.models import PlackettLuce

from gauntlet.config import RatingConfig

# ranks are all that count (margin 0): any real improvement beats it, a zero update does not
ANCHOR_SCORE = math.ulp(0.0)


def _model(config: RatingConfig) -> PlackettLuce:
    return PlackettLuce(mu=config.mu, sigma=config.sigma, beta=config.beta, tau=config.tau)


def rate_match(
    ratings: Mapping[str, tuple[float, float]],
    scores: Mapping[str, float],
    config: RatingConfig,
) -> dict[str, tuple[float, float]]:
    """New (μ, σ) of every peer in ``scores`` after one match; others are not returned.

    Peers missing from ``ratings`` start fresh. With ``config.null_anchor`` a fresh player
    scoring :data:`ANCHOR_SCORE` (just above sending nothing) joins the match last in the
    player order and is dropped from the result; otherwise a match needs two peers, and with
    fewer nothing changes.
    """
    peers = sorted(scores)
    current = {p: ratings.get(p, (config.mu, config.sigma)) for p in peers}
    players = [current[p] for p in peers]
    values = [float(scores[p]) for p in peers]
    if config.null_anchor:
        players.append((config.mu, config.sigma))
        values.append(ANCHOR_SCORE)
    if len(players) < 2:
        return dict(current)
    model = _model(config)
    teams = [[model.rating(mu=mu, sigma=sigma)] for mu, sigma in players]
    result = model.rate(teams, scores=values)
    rated = result[: len(peers)]  # the anchor, if any, is last
    out = {
        p: (float(team[0].mu), float(team[0].sigma)) for p, team in zip(peers, rated, strict=True)
    }
    if config.null_anchor and config.anchor_matches:
        for p in peers:
            me = model.rating(mu=out[p][0], sigma=out[p][1])
            anchor = model.rating(mu=config.mu, sigma=config.sigma)
            (mine,), _ = model.rate([[me], [anchor]], scores=[float(scores[p]), ANCHOR_SCORE])
            out[p] = (float(mine.mu), float(mine.sigma))
    return out


def ordinal(mu: float, sigma: float, config: RatingConfig) -> float:
    """μ − z·σ."""
    return mu - config.z * sigma


def rating_factor(mu: float, sigma: float, config: RatingConfig) -> float:
    """The non-negative rating term of the final score (see the module docstring)."""
    value = ordinal(mu, sigma, config)
    if config.transform == "shift":
        value += config.shift
    return max(0.0, value)
