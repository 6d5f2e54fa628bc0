"""The validator's epoch: run, validate, check answers, check plagiarism, score.

A miner's score is the product of four fractions of its ``count`` requested pairs:

* format: lines that are valid records (missing lines count as invalid, extra ones are cut);
* quality: valid pairs whose response equals the answer the validator computes;
* diversity: distinct prompts among the valid pairs;
* originality: 0 for a copy (either pass), 1 otherwise.

A run that times out, runs out of memory or CPU, floods its output or crashes scores 0.
Generators run with seed ``derive_seed(epoch seed, hotkey)``, so every validator reproduces
the same data, and pass 2 uses ``derive_seed(epoch seed, "probe")`` for every suspect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from examples.common.submissions import Submission
from examples.data_fabrication.config import FabricationConfig
from examples.data_fabrication.plagiarism import PlagiarismChecker, PlagiarismVerdict
from examples.data_fabrication.sandbox import run_generator
from examples.data_fabrication.tasks import Pair, is_correct, parse_line
from gauntlet import derive_seed


@dataclass
class MinerResult:
    """One miner's epoch."""

    hotkey: str
    block: int
    status: str
    detail: str = ""
    valid: int = 0
    correct: int = 0
    unique: int = 0
    requested: int = 1
    plagiarism: PlagiarismVerdict | None = None
    pairs: list[Pair] = field(default_factory=list)

    @property
    def format_score(self) -> float:
        return self.valid / self.requested

    @property
    def quality(self) -> float:
        return self.correct / self.valid if self.valid else 0.0

    @property
    def diversity(self) -> float:
        return self.unique / self.valid if self.valid else 0.0

    @property
    def originality(self) -> float:
        return 0.0 if self.plagiarism is None or self.plagiarism.verdict == "copy" else 1.0

    @property
    def score(self) -> float:
        if self.status != "ok":
            return 0.0
        return self.format_score * self.quality * self.diversity * self.originality


def generator_seed(cfg: FabricationConfig, hotkey: str) -> int:
    """The seed a miner's generator runs with (31 bits: any generator's argparse takes it)."""
    return derive_seed(cfg.seed, hotkey) % (1 << 31)


def evaluate_epoch(
    submissions: list[Submission],
    cfg: FabricationConfig,
    log: Callable[[str], None] = lambda _: None,
    accepted: Mapping[str, Sequence[Pair]] | None = None,
) -> list[MinerResult]:
    """Every submission's result, in arrival order (plagiarism needs that order).

    ``accepted`` is earlier epochs' accepted data (label → pairs); pass 1 compares every
    submission's data against it as well as against the epoch's earlier submissions.
    """
    probe_seed = derive_seed(cfg.seed, "probe") % (1 << 31)

    def probe(source: str) -> list[str] | None:
        outcome = run_generator(source, probe_seed, cfg.count, cfg.limits)
        return outcome.lines[: cfg.count] if outcome.status == "ok" else None

    checker = PlagiarismChecker(cfg, probe)
    for label, pairs in (accepted or {}).items():
        checker.add_accepted(label, pairs)
    results = []
    for sub in submissions:
        source = sub.body.get("source")
        if not isinstance(source, str):
            results.append(MinerResult(sub.hotkey, sub.block, "malformed", "no source"))
            continue
        outcome = run_generator(source, generator_seed(cfg, sub.hotkey), cfg.count, cfg.limits)
        res = MinerResult(
            sub.hotkey, sub.block, outcome.status, outcome.detail, requested=cfg.count
        )
        results.append(res)
        log(f"{sub.hotkey}: {outcome.status} in {outcome.seconds:.2f} s {outcome.detail}".rstrip())
        if outcome.status != "ok":
            continue
        parsed = [parse_line(line) for line in outcome.lines[: cfg.count]]
        res.pairs = [p for p in parsed if p is not None]
        res.valid = len(res.pairs)
        res.correct = sum(is_correct(p) for p in res.pairs)
        res.unique = len({p.prompt for p in res.pairs})
        res.plagiarism = checker.check(sub.hotkey, source, res.pairs)
    return results
