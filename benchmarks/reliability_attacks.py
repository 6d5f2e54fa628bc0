"""The attack table of ``benchmarks/reliability.py``: every scorer attack × 3 seeds.

The scenarios are the ones ``tests/gauntlet/test_robust_scoring.py`` proves window by window
(its four honest peers training a small MLP through the real codec, scored by the real
``Scorer``); this module loads that file and plays each attack for whole runs, then compares
the attacker's final weight with the honest peers' smallest and largest. The target: every
attacker below every honest peer, or, for the amplifier (whose origin is honest work), no
more than it earns sending its origin:

* framing: an exact copy stamped a second before its victim, one stamped the same second,
  and a clone that trains on its victim's public assignment;
* fuzzy copy: 35 % of three honest peers' kept entries each, plus noise;
* amplifier ×3 beside three identities sending noise at 1000× the honest norm;
* predictor: trains on the random evaluation set of the seed it can compute before the
  deadline (the old public derivation);
* replay: each window, the update an honest peer sent the window before;
* dense: a dense (uncompressed) update on the sparse channel.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "tests" / "gauntlet" / "test_robust_scoring.py"
WINDOWS = 6


def scenarios() -> ModuleType:
    """The scoring test module, imported once (its harness: ``Setup``, ``send``, …)."""
    key = "_attack_scenarios"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, SCENARIOS)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


Attack = Callable[[Any, int, dict[str, Any]], dict[str, Any]]


def _run(seed: int, attack: Attack, windows: int = WINDOWS) -> dict[str, float]:
    """Final weights after ``windows`` windows of the honest peers plus ``attack``'s payloads."""
    s = scenarios()
    setup = s.Setup(seed)
    scorer = setup.scorer()
    history: dict[str, Any] = {}
    for t in range(windows):
        payloads = {p: s.send(setup.delta(p, t)) for p in s.HONEST}
        extra = attack(setup, t, {**history, "payloads": payloads})
        inputs = setup.inputs(t, {**payloads, **extra})
        report = scorer.score_window(inputs)
        setup.step(inputs, report.accepted)
        scorer.model.load_state_dict(setup.model.state_dict())
        history["previous"] = payloads
    return scorer.scoreboard.weights()


def _amplifier(scale: float) -> Attack:
    """The amplifier: honest training on its own assignment, sent ×``scale``, beside the
    huge-norm sybils (×1 is its origin: what it earns without amplifying)."""

    def attack(setup: Any, t: int, ctx: dict[str, Any]) -> dict[str, Any]:
        s = scenarios()
        delta = setup.delta(s.AMP, t)
        out = {s.AMP: s.send(delta, scale)}
        out |= {y: s.send(setup.noise(delta, 1000.0)) for y in s.SYBILS}
        return out

    return attack


def _predictor(setup: Any, t: int, ctx: dict[str, Any]) -> dict[str, Any]:
    s = scenarios()
    guess = str(s.derive_seed(s.SEED, "eval", t))
    ids = s.random_samples(t, guess, s.CONFIG.assignment)[: s.PER_PEER]
    return {"predictor": s.send(setup.train(ids))}


def _replay(setup: Any, t: int, ctx: dict[str, Any]) -> dict[str, Any]:
    s = scenarios()
    previous = ctx.get("previous")
    if previous is None:
        return {"replayer": s.send(setup.delta("replayer", t))}  # honest once, to get a rating
    return {"replayer": previous[s.HONEST[0]]}


def _dense(setup: Any, t: int, ctx: dict[str, Any]) -> dict[str, Any]:
    s = scenarios()
    return {"dense": s.DenseUpdate(setup.delta("dense", t))}


def _row(
    name: str, seed: int, weights: dict[str, float], attackers: list[str], origin: float = 0.0
) -> dict:
    """``origin``: what the attacker earns without attacking (the amplifier's honest weight);
    the target is to earn no more than that, and below every honest peer when it is 0."""
    s = scenarios()
    honest = [weights.get(p, 0.0) for p in s.HONEST]
    adversary = max(weights.get(a, 0.0) for a in attackers)
    return {
        "attack": name,
        "seed": seed,
        "adversary_weight": adversary,
        "origin_weight": origin,
        "honest_min": min(honest),
        "honest_max": max(honest),
        "honest_at_zero": sum(1 for w in honest if w == 0.0),
        "below_every_honest": adversary < min(honest) or (origin > 0 and adversary <= origin),
    }


def run_attacks(seeds: list[int]) -> dict[str, Any]:
    """One row per (attack, seed) and a per-attack summary."""
    s = scenarios()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for seed in seeds:
            framed, _ = s.framing_run(seed, attack=True)
            for copier in s.COPIERS:
                rows.append(_row(f"framing: {copier}", seed, framed.scoreboard.weights(), [copier]))
            fuzzy, _ = s.fuzzy_run(seed, attack=True)
            rows.append(_row("fuzzy copy (35 %)", seed, fuzzy.scoreboard.weights(), ["fuzzy"]))
            origin = _run(seed, _amplifier(1.0))[s.AMP]
            amp = _run(seed, _amplifier(3.0))
            rows.append(_row("amplifier x3 + 3 huge sybils", seed, amp, [s.AMP, *s.SYBILS], origin))
            rows.append(_row("predictor", seed, _run(seed, _predictor), ["predictor"]))
            rows.append(_row("replay", seed, _run(seed, _replay), ["replayer"]))
            rows.append(_row("dense", seed, _run(seed, _dense), ["dense"]))
    finally:
        torch.set_num_threads(threads)
    summary = {}
    for name in dict.fromkeys(r["attack"] for r in rows):
        rs = [r for r in rows if r["attack"] == name]
        summary[name] = {
            "max_adversary_weight": max(r["adversary_weight"] for r in rs),
            "min_honest_weight": min(r["honest_min"] for r in rs),
            "target_met_in_every_seed": all(r["below_every_honest"] for r in rs),
            "honest_peers_at_zero": sum(r["honest_at_zero"] for r in rs),
        }
    return {"seeds": seeds, "windows": WINDOWS, "rows": rows, "summary": summary}
