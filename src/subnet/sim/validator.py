"""The simulated validator: gathers, scores with Gauntlet, sets weights, follows the model."""

from __future__ import annotations

import time

import torch

from gauntlet import Scorer, WeightsError, WindowInputs, WindowReport, derive_seed
from netcomm import StorageError, update_key
from sparseloco.optim import SparseLoCo
from sparseloco.payload import DenseUpdate
from subnet.sim.swarm import PROOF_DIGEST, PROOF_SYNC, Swarm, loss_fn


class Validator:
    """Scores every window on its own copy of the global model and publishes checkpoints."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        cfg = swarm.cfg
        self.model = swarm.new_model()
        self.updates = swarm.exchange("validator")
        overrides = {"lr": cfg.outer_lr} if cfg.outer_lr is not None else {}
        # follows the swarm: applies each window's accepted updates, never publishes
        self.follower = SparseLoCo(
            self.model.named_parameters(), self.updates, cfg.preset, **overrides
        )
        self.proofs = swarm.exchange("validator", proofs=True)
        self.chain = swarm.subnet.connect("validator")
        self.scorer = Scorer(
            self.model,
            loss_fn,
            swarm.batches,
            seed=swarm.seed,
            config=swarm.gauntlet,
            codec=swarm.codec,
            contents_for=swarm.contents,
        )
        heldout = min(cfg.heldout_batches * cfg.batch_size, swarm.data.num_heldout)
        ids = list(range(heldout))
        self.heldout = [
            swarm.data.heldout_batch(ids[i : i + cfg.batch_size])
            for i in range(0, heldout, cfg.batch_size)
        ]

    @torch.no_grad()
    def heldout_loss(self) -> float:
        self.model.eval()
        losses = [float(loss_fn(self.model, b)) for b in self.heldout]
        return sum(losses) / len(losses)

    def _publish_times(self, window: int, peers: list[str]) -> dict[str, float]:
        times = {}
        for p in peers:
            record = self.swarm.updates.lookup(p)
            try:
                times[p] = self.swarm.storage.head(update_key(record.prefix, window, p)).mtime
            except StorageError:
                continue  # not published (or unreadable): the scorer treats it as missing
        return times

    def run_window(self, w: int) -> tuple[WindowReport, list[str], float]:
        swarm = self.swarm
        peers = swarm.cfg.peer_ids
        gathered = self.updates.gather(w, peers=peers)
        proofs = self.proofs.gather(w, peers=peers)
        digests, sync = {}, {}
        for p, proof in proofs.updates.items():
            assert isinstance(proof, DenseUpdate)
            digests[p] = bytes(int(v) for v in proof.tensors[PROOF_DIGEST].tolist()).hex()
            sync[p] = proof.tensors[PROOF_SYNC].to(torch.float64)
        inputs = WindowInputs(
            window=w,
            gather=gathered,
            eval_seed=str(derive_seed(swarm.seed, "eval", w)),
            publish_times=self._publish_times(w, peers),
            digests=digests,
            sync_values=sync,
        )
        report = self.scorer.score_window(inputs)
        if swarm.cfg.aggregate == "top":
            swarm.publish_selection(w, report.accepted)
        selected = swarm.selected(w)
        try:
            weights = self.scorer.scoreboard.chain_weights(
                self.chain.metagraph(), self.chain.weight_limits()
            )
        except WeightsError:
            pass  # every score is still 0: nothing to set this window
        else:
            self.chain.set_weights(weights.uids, weights.values)
        self.follower.apply({p: u for p, u in gathered.updates.items() if p in selected})
        swarm.checkpoints.save(
            w + 1,
            self.model.state_dict(),
            meta={"window": w + 1, "time": time.time()},
        )
        return report, sorted(p for p in gathered.updates if p in selected), self.heldout_loss()
