"""The four-tier funnel: each tier is costlier than the last and sees fewer candidates.

====================  =========================================================  ===========
tier                  what it checks                                              who passes
====================  =========================================================  ===========
signature             the record verifies against the key the miner committed     all valid
static                fields, builds, parameter cap, forward shapes               all valid
dedup                 architecture fingerprint vs earlier submissions (Jaccard)   < copy band
proxy                 prequential bpb over the first ``proxy_steps`` steps        top proxy_keep
train                 prequential bpb over ``train_steps`` steps (the PRISM       top train_keep
                      score 1/(1+bpb))
bench                 train to ``bench_steps``, bpb on held-out batches           ranked
====================  =========================================================  ===========

Tiers 2–4 continue one training run per candidate (same init, same data order), so a later
tier never repeats the work of an earlier one. Ties are broken by arrival block, then hotkey.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from examples.common.similarity import jaccard, verdict
from examples.common.submissions import Rejected, Submission
from examples.prism.config import PrismConfig
from examples.prism.static import StaticRejection, StaticReport, check_static
from examples.prism.training import PrequentialRun, locked_data, score_from_bpb
from sparseloco.models import GPTConfig

TIERS = ("signature", "static", "dedup", "proxy", "train", "bench")


@dataclass
class CandidateResult:
    """One submission's way through the funnel.

    ``proxy``, ``train`` and ``bench`` are scores 1/(1+bpb) of the tiers it reached;
    ``dropped_at`` is the tier that stopped it (None for a candidate that was benchmarked).
    """

    hotkey: str
    block: int
    body: dict
    params: int | None = None
    config: GPTConfig | None = None
    proxy: float | None = None
    train: float | None = None
    bench: float | None = None
    bench_bpb: float | None = None
    dropped_at: str | None = None
    reason: str = ""

    @property
    def depth(self) -> int:
        """How far it got: the index of its dropping tier, or len(TIERS) if benchmarked."""
        return len(TIERS) if self.dropped_at is None else TIERS.index(self.dropped_at)

    @property
    def last_score(self) -> float:
        """The score of the last scored tier it reached (0 before tier 2)."""
        for value in (self.bench, self.train, self.proxy):
            if value is not None:
                return value
        return 0.0

    def drop(self, tier: str, reason: str) -> None:
        self.dropped_at, self.reason = tier, reason


def _keep_top(
    results: list[CandidateResult], runs: dict[str, PrequentialRun], score: str, keep: int
) -> list[CandidateResult]:
    """Drop, at tier ``score``, all but the ``keep`` best (non-finite scores always drop)."""
    finite = [r for r in results if getattr(r, score) > 0.0]
    for r in results:
        if r not in finite:
            r.drop(score, f"loss diverged (step {len(runs[r.hotkey].losses) - 1})")
    finite.sort(key=lambda r: (-getattr(r, score), r.block, r.hotkey))
    for rank, r in enumerate(finite[keep:], start=keep + 1):
        r.drop(score, f"{score} rank {rank} > keep {keep}")
    return finite[:keep]


def _earlier_twin(
    report: StaticReport, earlier: dict[str, StaticReport], cfg: PrismConfig
) -> tuple[str, float] | None:
    """The first earlier candidate whose fingerprint is in the copy band, with the similarity."""
    for hotkey, other in earlier.items():
        similarity = jaccard(report.fingerprint, other.fingerprint)
        if verdict(similarity, cfg.duplicate) == "copy":
            return hotkey, similarity
    return None


def run_funnel(
    submissions: list[Submission],
    rejected: list[Rejected],
    cfg: PrismConfig,
    log: Callable[[str], None] = lambda _: None,
) -> list[CandidateResult]:
    """Every candidate's result, ranked: deepest tier first, then by that tier's score."""
    results = [CandidateResult(r.hotkey, -1, {}) for r in rejected]
    for res, rej in zip(results, rejected, strict=True):
        res.drop("signature", rej.reason)
    reports: dict[str, StaticReport] = {}
    alive: list[CandidateResult] = []
    for sub in submissions:  # arrival order: the earlier of two near-duplicates is kept
        res = CandidateResult(sub.hotkey, sub.block, sub.body)
        results.append(res)
        try:
            report = check_static(sub.body, cfg)
        except StaticRejection as exc:
            res.drop("static", str(exc))
            continue
        res.params, res.config = report.params, report.config
        twin = _earlier_twin(report, reports, cfg)
        if twin is not None:
            res.drop("dedup", f"near-duplicate of {twin[0]} (similarity {twin[1]:.2f})")
            continue
        reports[sub.hotkey] = report
        alive.append(res)
    log(f"static + dedup: {len(alive)} of {len(results)} candidates left")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        data = locked_data(cfg)
        runs = {r.hotkey: PrequentialRun(reports[r.hotkey].config, data, cfg) for r in alive}
        tiers = (
            ("proxy", cfg.proxy_steps, cfg.proxy_keep),
            ("train", cfg.train_steps, cfg.train_keep),
        )
        for tier, steps, keep in tiers:
            for r in alive:
                runs[r.hotkey].advance_to(steps)
                setattr(r, tier, score_from_bpb(runs[r.hotkey].prequential_bpb()))
            alive = _keep_top(alive, runs, tier, keep)
            log(f"{tier}: {len(alive)} left after {steps} steps")
        for r in alive:
            runs[r.hotkey].advance_to(cfg.bench_steps)
            bpb = runs[r.hotkey].heldout_bpb(cfg.heldout_batches)
            r.bench_bpb, r.bench = bpb, score_from_bpb(bpb)
            if not math.isfinite(bpb):
                r.drop("bench", "held-out loss is not finite")
        log(f"bench: {len(alive)} benchmarked after {cfg.bench_steps} steps")
    finally:
        torch.set_num_threads(previous_threads)
    return sorted(results, key=lambda r: (-r.depth, -r.last_score, r.block, r.hotkey))
