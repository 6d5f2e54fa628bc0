"""Data assignment determinism and proof-of-data digests."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gauntlet import (
    AssignmentConfig,
    assign_samples,
    data_digest,
    derive_seed,
    eval_assigned_samples,
    random_samples,
)

CFG = AssignmentConfig(num_samples=1000, samples_per_peer=50, eval_assigned=20, eval_random=30)


def test_assignment_is_pinned():
    # golden values: any change here breaks agreement with validators already deployed
    assert assign_samples("peer-a", 3, "seed", CFG)[:5] == [858, 414, 636, 471, 706]
    assert derive_seed("x", 1) == 7599991330949385985
    assert data_digest("p", 1, [1, 2, 3]) == (
        "eb334540531f85907a30c3a98281535dde44be536df970c021d0cad14b9f4bd1"
    )


@settings(max_examples=30, deadline=None)
@given(peer=st.text(max_size=12), window=st.integers(0, 10**9), seed=st.text(max_size=12))
def test_assignment_deterministic_distinct_and_in_range(peer, window, seed):
    ids = assign_samples(peer, window, seed, CFG)
    assert ids == assign_samples(peer, window, seed, CFG)
    assert len(set(ids)) == CFG.samples_per_peer and all(0 <= i < 1000 for i in ids)
    sub = eval_assigned_samples(peer, window, seed, "late", CFG)
    assert len(sub) == CFG.eval_assigned and set(sub) <= set(ids)


def test_inputs_change_the_assignment():
    base = assign_samples("p", 1, "s", CFG)
    assert base != assign_samples("q", 1, "s", CFG)
    assert base != assign_samples("p", 2, "s", CFG)
    assert base != assign_samples("p", 1, "t", CFG)
    assert random_samples(1, "e", CFG) != random_samples(1, "f", CFG)
    assert eval_assigned_samples("p", 1, "s", "e", CFG) != eval_assigned_samples(
        "p", 1, "s", "f", CFG
    )


def test_dense_draw_is_a_permutation_prefix():
    cfg = AssignmentConfig(num_samples=10, samples_per_peer=10, eval_assigned=10, eval_random=10)
    assert sorted(assign_samples("p", 0, "s", cfg)) == list(range(10))


def test_digest_binds_peer_window_ids_and_contents():
    ids = [3, 1, 2]
    data = [torch.arange(4), torch.ones(2, dtype=torch.bfloat16)]
    d = data_digest("p", 1, ids, data)
    assert d == data_digest("p", 1, ids, [t.clone() for t in data])
    assert d != data_digest("q", 1, ids, data)
    assert d != data_digest("p", 2, ids, data)
    assert d != data_digest("p", 1, [1, 2, 3], data)
    assert d != data_digest("p", 1, ids, [torch.arange(4), torch.zeros(2, dtype=torch.bfloat16)])
    assert d != data_digest("p", 1, ids)
    assert len(d) == 64
