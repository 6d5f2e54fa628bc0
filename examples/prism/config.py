"""The challenge's typed configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from examples.common.similarity import Thresholds


@dataclass(frozen=True)
class PrismConfig:
    """One PRISM round.

    Args:
        seed: the round's public seed: model init, data order and held-out batches.
        block_size: the sequence length every candidate must accept (part of the locked data).
        param_cap: the most parameters a candidate may have.
        corpus_bytes: bytes of the locked corpus (Python's standard library sources).
        batch_size: sequences per training step.
        lr: AdamW learning rate of every run (fixed: the architecture is what is judged).
        proxy_steps: prequential steps of the cheap proxy (tier 2).
        proxy_keep: candidates the proxy passes on to tier 3.
        train_steps: prequential steps of the short run (tier 3), counted from step 0.
        train_keep: candidates tier 3 passes on to the benchmark.
        bench_steps: total training steps before the held-out benchmark (tier 4).
        heldout_batches: held-out batches the benchmark scores.
        duplicate: similarity bands of the architecture fingerprints; ``copy`` and above
            is a near-duplicate of an earlier submission and is rejected.
        threads: torch intra-op threads during the round (1: small models run fastest and
            reproducibly on one thread).
    """

    seed: str = "prism-round-1"
    block_size: int = 64
    param_cap: int = 300_000
    corpus_bytes: int = 600_000
    batch_size: int = 8
    lr: float = 3e-3
    proxy_steps: int = 12
    proxy_keep: int = 4
    train_steps: int = 60
    train_keep: int = 2
    bench_steps: int = 120
    heldout_batches: int = 8
    duplicate: Thresholds = field(default_factory=Thresholds)
    threads: int = 1

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "param_cap",
            "batch_size",
            "proxy_steps",
            "proxy_keep",
            "train_keep",
            "heldout_batches",
            "threads",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.proxy_steps <= self.train_steps <= self.bench_steps:
            raise ValueError(
                "need proxy_steps <= train_steps <= bench_steps (each tier continues the "
                f"previous run), got {self.proxy_steps}, {self.train_steps}, {self.bench_steps}"
            )
        if self.train_keep > self.proxy_keep:
            raise ValueError("train_keep must not exceed proxy_keep: the funnel only narrows")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.corpus_bytes < 20 * self.block_size:
            raise ValueError("corpus_bytes is too small for a train and a held-out split")
