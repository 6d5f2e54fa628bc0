"""The participants' window loops: honest SparseLoCo peers and the adversaries."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from gauntlet import data_digest, draw_ids
from sparseloco.codec import CompressedTensor, CompressedUpdate, ErrorFeedback, encode
from sparseloco.optim import RoundReport, SparseLoCo
from subnet.sim.swarm import SelectedExchange, Swarm, loss_fn

STALE_LAG = 3


@dataclass
class PeerLog:
    """Per-window records of one participant (written into metrics.jsonl)."""

    peer: str
    kind: str
    windows: list[dict] = field(default_factory=list)


def train_steps(
    swarm: Swarm, model: torch.nn.Module, inner: torch.optim.Optimizer, ids: list[int]
) -> float:
    """H AdamW steps on the samples ``ids``; mean training loss."""
    model.train()
    losses = []
    for x, y in swarm.batches(ids):
        loss = loss_fn(model, (x, y))
        loss.backward()
        inner.step()
        inner.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses)


class HonestPeer:
    """Trains on its assignment, publishes a proof and a SparseLoCo update, steps with the rest."""

    kind = "honest"

    def __init__(self, swarm: Swarm, peer: str) -> None:
        self.swarm, self.peer = swarm, peer
        cfg = swarm.cfg
        self.model = swarm.new_model()
        self.inner = torch.optim.AdamW(self.model.parameters(), lr=cfg.inner_lr, weight_decay=0.1)
        overrides = {"lr": cfg.outer_lr} if cfg.outer_lr is not None else {}
        self.outer = SparseLoCo(
            self.model.named_parameters(),
            SelectedExchange(swarm.exchange(peer), swarm),
            cfg.preset,
            inner_steps=cfg.inner_steps,
            **overrides,
        )
        self.proofs = swarm.exchange(peer, proofs=True)
        self.log = PeerLog(peer, self.kind)

    def run_window(self, w: int) -> None:
        ids = self.swarm.assignment(self.peer, w)
        digest = data_digest(self.peer, w, ids, self.swarm.contents(ids))
        self.proofs.publish(w, self.swarm.proof(self.model, w, digest))
        loss = train_steps(self.swarm, self.model, self.inner, ids)
        report: RoundReport = self.outer.step()
        self.log.windows.append(
            {
                "window": w,
                "train_loss": loss,
                "bytes_sent": report.bytes_sent,
                "bytes_received": report.bytes_received,
                "peers_aggregated": report.peers,
                "seconds": report.timings,
            }
        )


class Adversary:
    """A peer that follows the global model from checkpoints and publishes a bad update."""

    def __init__(self, swarm: Swarm, peer: str, kind: str) -> None:
        self.swarm, self.peer, self.kind = swarm, peer, kind
        self.model = swarm.new_model()
        self.exchange = swarm.exchange(peer)
        self.proofs = swarm.exchange(peer, proofs=True)
        self.log = PeerLog(peer, kind)
        self.victim = swarm.cfg.honest_ids[0]

    def _load_global(self, w: int) -> None:
        step = max(0, w - STALE_LAG) if self.kind == "stale" else w
        if step == 0:
            self.model.load_state_dict(self.swarm.init_state)
            return
        self.swarm.wait(step - 1)
        self.model.load_state_dict(self.swarm.checkpoints.load(step).model)

    def _honest_delta(self, ids: list[int]) -> dict[str, torch.Tensor]:
        theta0 = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        inner = torch.optim.AdamW(self.model.parameters(), lr=self.swarm.cfg.inner_lr)
        train_steps(self.swarm, self.model, inner, ids)
        return {n: theta0[n] - p.detach() for n, p in self.model.named_parameters()}

    def _copy(self, w: int) -> CompressedUpdate:
        got = self.exchange.gather(w, peers=[self.victim], deadline=self.swarm.cfg.deadline_s)
        original = got.updates[self.victim]
        assert isinstance(original, CompressedUpdate)
        tensors = {
            n: CompressedTensor(
                shape=ct.shape,
                indices=ct.indices,
                gaps=ct.gaps,
                codes=ct.codes,
                table=ct.table * 1.01,
                rice_param=ct.rice_param,
            )
            for n, ct in original.tensors.items()
        }
        return CompressedUpdate(codec=original.codec, tensors=tensors)

    def run_window(self, w: int) -> None:
        swarm = self.swarm
        self._load_global(w)
        ids = swarm.assignment(self.peer, w)
        digest = data_digest(self.peer, w, ids, swarm.contents(ids))
        self.proofs.publish(w, swarm.proof(self.model, w, digest))
        ef = ErrorFeedback(swarm.codec)
        if self.kind == "copier":
            update = self._copy(w)
        elif self.kind == "free-rider":
            update = encode({n: torch.zeros_like(p) for n, p in self.model.named_parameters()}, ef)
        else:
            if self.kind == "wrong-data":
                ids = draw_ids("wrong", (swarm.seed, self.peer, w), swarm.data.num_train, len(ids))
            delta = self._honest_delta(ids)
            if self.kind == "noise":
                g = torch.Generator().manual_seed(w)
                noise = {n: torch.randn(d.shape, generator=g) for n, d in delta.items()}
                delta = {n: noise[n] * (d.norm() / noise[n].norm()) for n, d in delta.items()}
            elif self.kind == "poisoner":
                delta = {n: -10.0 * d for n, d in delta.items()}
            update = encode(delta, ef)
        start = time.monotonic()
        sent = self.exchange.publish(w, update)
        self.log.windows.append(
            {"window": w, "bytes_sent": sent, "publish_s": time.monotonic() - start}
        )
