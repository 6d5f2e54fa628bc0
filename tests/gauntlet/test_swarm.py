"""A simulated swarm: honest peers plus one of each adversary, scored over several windows.

Honest peers train a small MLP for a few AdamW steps on their *assigned* samples and send
Δ = θ₀ − θ through the real SparseLoCo codec. The data are noisy-teacher labels, so
training on a sample helps that sample more than unseen ones (what the assigned-data
indicator measures). Two validators score the same inputs; their chain weights must be
identical and keep full Yuma trust.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from gauntlet import (
    AssignmentConfig,
    GauntletConfig,
    InMemorySubnet,
    Scoreboard,
    Scorer,
    WeightLimits,
    WindowInputs,
    assign_samples,
    data_digest,
    sample_values,
    yuma_consensus,
)
from sparseloco import (
    CodecConfig,
    CompressedTensor,
    CompressedUpdate,
    ErrorFeedback,
    aggregate,
    decode,
    encode,
)
from sparseloco.exchange import GatherResult, PeerStatus

SEED = "swarm-test"
N_SAMPLES, DIM, CLASSES = 4096, 16, 8
HONEST = [f"honest-{i}" for i in range(6)]
ADVERSARIES = ["freerider", "noise", "copier", "stale", "wrong-data", "poisoner", "absent"]
WINDOWS = 6
INNER_STEPS, INNER_LR = 8, 3e-3
CODEC = CodecConfig(chunk_size=16, topk=16, value_bits=2, backend="torch")
CONFIG = GauntletConfig(assignment=AssignmentConfig(num_samples=N_SAMPLES))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, DIM, generator=g)
    teacher = torch.randn(DIM, CLASSES, generator=g)
    y = (x @ teacher).argmax(dim=1)
    noisy = torch.rand(N_SAMPLES, generator=g) < 0.3
    y[noisy] = torch.randint(0, CLASSES, (int(noisy.sum()),), generator=g)
    return x, y


X, Y = make_data()


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES)
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def batches_for(ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    idx = torch.tensor(ids)
    return [(X[idx], Y[idx])]


def contents_for(ids: list[int]) -> list[torch.Tensor]:
    return [X[i] for i in ids]


def train_delta(start: nn.Module, ids: list[int], steps: int = INNER_STEPS) -> dict:
    model = copy.deepcopy(start)
    opt = torch.optim.AdamW(model.parameters(), lr=INNER_LR, weight_decay=0.0)
    idx = torch.tensor(ids)
    for s in range(steps):
        half = idx[(s % 2) * 32 : (s % 2) * 32 + 32]
        opt.zero_grad()
        loss_fn(model, (X[half], Y[half])).backward()
        opt.step()
    before = dict(start.named_parameters())
    return {n: (before[n] - p).detach() for n, p in model.named_parameters()}


def craft(update: CompressedUpdate, table_fn) -> CompressedUpdate:
    """The same indices and codes with a hand-made decode table (what encode never emits)."""
    return CompressedUpdate(
        codec=update.codec,
        tensors={
            n: CompressedTensor(
                ct.shape, ct.indices, ct.gaps, ct.codes, table_fn(ct.table.clone()), ct.rice_param
            )
            for n, ct in update.tensors.items()
        },
    )


class Swarm:
    def __init__(self) -> None:
        self.model = make_model()
        self.initial = copy.deepcopy(self.model)
        self.peers = HONEST + ADVERSARIES
        self.ef = {p: ErrorFeedback(CODEC) for p in self.peers}
        self.rng = torch.Generator().manual_seed(7)

    def window(self, t: int, positions) -> WindowInputs:
        params = dict(self.model.named_parameters())
        sync_now = sample_values(params, positions)
        payloads, digests, sync = {}, {}, {}
        honest_norms = {}
        for peer in self.peers:
            ids = assign_samples(peer, t, SEED, CONFIG.assignment)
            digests[peer] = data_digest(peer, t, ids, contents_for(ids))
            sync[peer] = sync_now
            if peer.startswith("honest"):
                delta = train_delta(self.model, ids)
                honest_norms = {n: float(d.norm()) for n, d in delta.items()}
                payloads[peer] = encode(delta, self.ef[peer])
            elif peer == "freerider":
                payloads[peer] = encode(
                    {n: torch.zeros_like(p) for n, p in params.items()}, self.ef[peer]
                )
            elif peer == "noise":
                noise = {}
                for n, p in params.items():
                    r = torch.randn(p.shape, generator=self.rng)
                    noise[n] = r * honest_norms[n] / float(r.norm())
                payloads[peer] = encode(noise, self.ef[peer])
            elif peer == "copier":
                victim = payloads["honest-0"]
                if t % 2 == 0:
                    payloads[peer] = victim
                else:
                    dense = decode(victim)
                    noisy = {
                        n: d + 0.01 * d.abs().max() * torch.randn(d.shape, generator=self.rng)
                        for n, d in dense.items()
                    }
                    payloads[peer] = encode(noisy, ErrorFeedback(CODEC))
            elif peer == "stale":
                payloads[peer] = encode(train_delta(self.initial, ids), self.ef[peer])
                sync[peer] = sample_values(dict(self.initial.named_parameters()), positions)
            elif peer == "wrong-data":
                other = assign_samples(peer, t + 10_000, SEED, CONFIG.assignment)
                payloads[peer] = encode(train_delta(self.model, other), self.ef[peer])
            elif peer == "poisoner":
                flipped = {n: -d for n, d in train_delta(self.model, ids).items()}
                honest_like = encode(flipped, self.ef[peer])
                mode = t % 3
                if mode == 0:
                    payloads[peer] = craft(honest_like, lambda tb: tb.fill_(float("nan")))
                elif mode == 1:
                    payloads[peer] = craft(honest_like, lambda tb: tb * 1e30)
                else:
                    payloads[peer] = honest_like
        gather = GatherResult(window=t)
        for peer in self.peers:
            if peer == "absent":
                gather.statuses[peer] = PeerStatus(peer, "missing", "nothing published")
                del sync[peer], digests[peer]
                continue
            gather.updates[peer] = payloads[peer]
            gather.statuses[peer] = PeerStatus(peer, "ok")
        return WindowInputs(
            window=t,
            gather=gather,
            eval_seed=f"block-hash-{t}",
            digests=digests,
            sync_values=sync,
        )

    def step(self, inputs: WindowInputs, accepted: list[str]) -> None:
        if not accepted:
            return
        agg = aggregate({p: inputs.gather.updates[p] for p in accepted})
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.sub_(agg[n])


@pytest.fixture(scope="module")
def swarm_run():
    start = time.perf_counter()
    swarm = Swarm()
    validators = []
    for _ in range(2):
        vmodel = copy.deepcopy(swarm.model)
        validators.append(
            Scorer(
                vmodel,
                loss_fn,
                batches_for,
                seed=SEED,
                config=CONFIG,
                codec=CODEC,
                contents_for=contents_for,
            )
        )
    reports = []
    for t in range(WINDOWS):
        inputs = swarm.window(t, validators[0].sync_positions(t))
        window_reports = [v.score_window(inputs) for v in validators]
        reports.append(window_reports)
        swarm.step(inputs, window_reports[0].accepted)
        for v in validators:
            v.model.load_state_dict(swarm.model.state_dict())
    return swarm, validators, reports, time.perf_counter() - start


def test_honest_peers_outweigh_every_adversary(swarm_run, capsys):
    swarm, _validators, reports, elapsed = swarm_run
    final = reports[-1][0]
    with capsys.disabled():  # the weight table is part of the test's output on purpose
        print(f"\nswarm: {len(swarm.peers)} peers, {WINDOWS} windows, {elapsed:.1f}s")
        print(final.table())
    weights = final.weights
    honest_min = min(weights[p] for p in HONEST)
    adv_max = max(weights.get(p, 0.0) for p in ADVERSARIES)
    assert honest_min > 0.05
    assert adv_max < 1e-3, {p: weights.get(p) for p in ADVERSARIES}
    assert honest_min > 50 * max(adv_max, 1e-9) or adv_max == 0.0
    assert math.isclose(sum(weights[p] for p in HONEST), 1.0, rel_tol=1e-6)


def test_adversaries_caught_by_the_intended_signal(swarm_run):
    _, validators, reports, _ = swarm_run
    last = reports[-1][0].outcomes
    assert last["copier"].status == "copy" and "honest-0" in last["copier"].reason
    assert last["absent"].status == "missing"
    assert last["stale"].sync is not None and last["stale"].sync.score == 0.0
    assert all(last[p].status == "evaluated" for p in HONEST)
    assert all(last[p].sync.score == 1.0 for p in HONEST)
    statuses = [r[0].outcomes["poisoner"].status for r in reports]
    assert statuses[0] == "invalid" and statuses[3] == "invalid"  # NaN table
    assert all(
        r[0].outcomes["poisoner"].evaluation is None
        or r[0].outcomes["poisoner"].evaluation.gain_random < 0
        for r in reports
    )
    free = last["freerider"].evaluation
    assert free is not None and free.gain_random == 0.0 and free.indicator == -1
    board = validators[0].scoreboard
    assert board.peers["wrong-data"].bma < CONFIG.signals.bma_threshold
    assert min(board.peers[p].bma for p in HONEST) > CONFIG.signals.bma_threshold
    # every honest pair stays below the copy threshold (no false positives)
    honest_pairs = [pr for r in reports for pr in r[0].pairs if pr.a in HONEST and pr.b in HONEST]
    assert max(pr.overlap for pr in honest_pairs) < CONFIG.signals.copy_overlap


def test_validators_agree_and_keep_full_trust(swarm_run):
    swarm, validators, reports, _ = swarm_run
    for pair in reports:
        assert pair[0].scores == pair[1].scores
    subnet = InMemorySubnet(
        netuid=3, limits=WeightLimits(max_weight_limit=0.5, min_allowed_weights=2)
    )
    for peer in swarm.peers:
        subnet.register(peer)
    for i in range(3):
        subnet.register(f"validator-{i}", stake=1000.0 * (i + 1))
    rows = []
    for i, v in enumerate(validators):
        cw = v.scoreboard.chain_weights(subnet.metagraph(), subnet.limits)
        rows.append((cw.uids, cw.values))
        assert subnet.connect(f"validator-{i}").set_weights(cw.uids, cw.values).success
    assert rows[0] == rows[1]
    # a third validator with its own (wrong) opinion: uniform over everyone
    uids = subnet.metagraph().uids[: len(swarm.peers)]
    assert subnet.connect("validator-2").set_weights(uids, [100] * len(uids)).success
    _names, stakes, w = subnet.weight_matrix()
    result = yuma_consensus(w[:2], stakes[:2])
    np.testing.assert_allclose(result.validator_trust, [1.0, 1.0])
    result3 = yuma_consensus(w, stakes * np.array([1.0, 1.0, 0.5]))
    assert result3.validator_trust[0] == pytest.approx(1.0)
    assert result3.validator_trust[2] < 0.6
    honest_uids = [swarm.peers.index(p) for p in HONEST]
    adv_uids = [swarm.peers.index(p) for p in ADVERSARIES]
    assert min(result3.incentive[honest_uids]) > 10 * max(result3.incentive[adv_uids])


def test_scoreboard_restart_loses_nothing(swarm_run):
    import json

    _, validators, _, _ = swarm_run
    board = validators[0].scoreboard
    restored = Scoreboard()
    restored.load_state_dict(json.loads(json.dumps(board.state_dict())))
    assert restored.final_scores() == board.final_scores()
    assert restored.weights() == board.weights()
    assert restored.state_dict() == board.state_dict()
