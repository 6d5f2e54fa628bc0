"""Locked data, forced initialization and the prequential bits-per-byte run.

Prequential scoring (REFERENCE §4, PRISM v2): at every step the model first predicts the
step's batch and that loss is recorded, then it trains on the batch. Every recorded loss is on
data the model has not trained on yet, so the mean measures how fast an architecture learns,
without a separate validation set. Tokens are raw UTF-8 bytes, so the loss in nats per token
divided by ln 2 is bits per byte (bpb); the score is 1 / (1 + bpb).

Everything a miner could tune besides the architecture is fixed by the validator: the
initialization (seeded from the round's public seed, never taken from the submission), the
data (the first ``corpus_bytes`` of Python's standard library, in an order drawn from the
seed), the optimizer and its learning rate.
"""

from __future__ import annotations

import math

import torch

from examples.prism.config import PrismConfig
from gauntlet import derive_seed, draw_ids
from sparseloco.data import TokenDataset, stdlib_corpus
from sparseloco.models import GPT, GPTConfig

LN2 = math.log(2.0)


def score_from_bpb(bpb: float) -> float:
    """The PRISM score: 1 / (1 + bpb); 0 for a non-finite bpb."""
    return 1.0 / (1.0 + bpb) if math.isfinite(bpb) else 0.0


def locked_data(cfg: PrismConfig) -> TokenDataset:
    """The round's corpus: the same bytes on every validator with the same Python version."""
    return TokenDataset(stdlib_corpus(cfg.corpus_bytes), cfg.block_size, heldout_fraction=0.1)


def build_model(gpt: GPTConfig, seed: str) -> GPT:
    """The candidate with the validator's forced random init (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "prism-init") % (1 << 63))
        return GPT(gpt)


class PrequentialRun:
    """One candidate's training run; tiers 2–4 each continue it further.

    Args:
        gpt: the candidate's config.
        data: the locked data.
        cfg: the round (seed, batch size, learning rate).
    """

    def __init__(self, gpt: GPTConfig, data: TokenDataset, cfg: PrismConfig) -> None:
        self.cfg = cfg
        self.data = data
        self.model = build_model(gpt, cfg.seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        self.losses: list[float] = []

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s batch: ids drawn from the public seed, the same for every candidate."""
        ids = draw_ids(
            "prism-train", (self.cfg.seed, step), self.data.num_train, self.cfg.batch_size
        )
        return self.data.train_batch(ids)

    def advance_to(self, steps: int) -> None:
        """Train until ``steps`` steps are done, recording each batch's loss before its update."""
        self.model.train()
        for step in range(len(self.losses), steps):
            x, y = self.batch(step)
            _, loss = self.model(x, y)
            self.losses.append(float(loss.detach()))
            if not math.isfinite(self.losses[-1]):
                return
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

    def prequential_bpb(self) -> float:
        """Mean recorded loss in bits per byte (inf once a loss was not finite)."""
        if not self.losses:
            raise ValueError("no steps recorded yet")
        return math.fsum(self.losses) / len(self.losses) / LN2

    @torch.no_grad()
    def heldout_bpb(self, batches: int) -> float:
        """Bits per byte on ``batches`` held-out batches drawn from the public seed."""
        self.model.eval()
        count = min(self.data.num_heldout, batches * self.cfg.batch_size)
        ids = draw_ids("prism-heldout", (self.cfg.seed,), self.data.num_heldout, count)
        total = 0.0
        for start in range(0, count, self.cfg.batch_size):
            x, y = self.data.heldout_batch(ids[start : start + self.cfg.batch_size])
            _, loss = self.model(x, y)
            total += float(loss) * x.numel()
        return total / (count * self.cfg.block_size) / LN2
