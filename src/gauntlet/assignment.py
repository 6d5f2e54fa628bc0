"""Deterministic data assignment and the proof-of-data digest.

Every validator must derive the same samples from public values alone, on any platform and
numpy/torch version, so ids come from BLAKE2b of the public inputs and a counter, never from
a library RNG or the clock:

    id_j = int(BLAKE2b(domain ‖ seed ‖ peer ‖ window ‖ j)) mod N,  j = 0, 1, …

skipping repeats until ``count`` distinct ids are drawn (order of first appearance).

* :func:`assign_samples` (peer, window, public seed) → the ids a miner trains on;
* :func:`eval_assigned_samples` picks the subset a validator evaluates, with a seed that
  should only become public after the publish deadline (e.g. the hash of that block), so a
  miner cannot train on the evaluated subset alone;
* :func:`random_samples` (window, evaluation seed) → the shared random evaluation set;
* :func:`data_digest` is the proof-of-data a miner publishes beside its update; the
  validator recomputes it from the assignment (and, when it has them, the samples'
  contents) and treats a mismatch as a failed contribution.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from gauntlet.config import AssignmentConfig

_SEP = b"\x1f"


def _hash(*parts: object) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(str(part).encode("utf-8"))
        h.update(_SEP)
    return h.digest()


def derive_seed(*parts: object) -> int:
    """A 64-bit integer seed from public values: BLAKE2b of their ``str`` forms."""
    return int.from_bytes(_hash("gauntlet.seed", *parts)[:8], "little")


def draw_ids(domain: str, key: tuple[object, ...], population: int, count: int) -> list[int]:
    """``count`` distinct ids in ``[0, population)`` from BLAKE2b(domain, key, j), j = 0, 1, …"""
    if count > population:
        raise ValueError(f"cannot draw {count} distinct ids from {population}")
    if 2 * count > population:
        # dense draws: rank every id by its hash (no retry loop near exhaustion)
        keys = [(_hash(domain, *key, i), i) for i in range(population)]
        return [i for _, i in sorted(keys)[:count]]
    out: list[int] = []
    seen: set[int] = set()
    j = 0
    while len(out) < count:
        value = int.from_bytes(_hash(domain, *key, j), "little") % population
        j += 1
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def assign_samples(peer: str, window: int, seed: str, config: AssignmentConfig) -> list[int]:
    """The ``config.samples_per_peer`` sample ids ``peer`` must train on in ``window``."""
    return draw_ids(
        "assign", (seed, peer, int(window)), config.num_samples, config.samples_per_peer
    )


def eval_assigned_samples(
    peer: str, window: int, seed: str, eval_seed: str, config: AssignmentConfig
) -> list[int]:
    """The ``config.eval_assigned`` ids of the peer's assignment a validator evaluates on."""
    assigned = assign_samples(peer, window, seed, config)
    picks = draw_ids(
        "eval-assigned", (eval_seed, peer, int(window)), len(assigned), config.eval_assigned
    )
    return [assigned[i] for i in sorted(picks)]


def random_samples(window: int, eval_seed: str, config: AssignmentConfig) -> list[int]:
    """The shared random evaluation ids of ``window`` (the same for every peer)."""
    return draw_ids("random", (eval_seed, int(window)), config.num_samples, config.eval_random)


def cross_partners(
    peers: Sequence[str], window: int, eval_seed: str, count: int
) -> dict[str, list[str]]:
    """The peers whose assigned sets each peer's update is also evaluated on (the cross
    indicator, :func:`gauntlet.evaluate.cross_indicators`): every other peer when there are
    at most ``count`` of them; else the ``count`` peers after it in a cycle ordered by
    BLAKE2b(eval_seed, window, peer), so each set is evaluated by exactly ``count`` other
    updates and nobody knows their partners before the deadline."""
    order = sorted(peers)
    if len(order) - 1 <= count:
        return {p: [q for q in order if q != p] for p in order}
    order.sort(key=lambda p: _hash("cross", eval_seed, int(window), p))
    n = len(order)
    return {order[i]: sorted(order[(i + j) % n] for j in range(1, count + 1)) for i in range(n)}


def data_digest(
    peer: str,
    window: int,
    sample_ids: Sequence[int],
    contents: Iterable[torch.Tensor | np.ndarray | bytes] | None = None,
) -> str:
    """Hex BLAKE2b-256 over (peer, window, sample ids in the given order, their contents).

    ``contents`` are the samples' data (e.g. token tensors) in the same order as the ids;
    hashing them proves the data was read, not just its ids computed. Tensors are hashed
    as contiguous CPU bytes with dtype and shape, so equal data gives equal digests.
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(_hash("gauntlet.data", peer, int(window), len(sample_ids)))
    h.update(np.asarray(list(sample_ids), dtype="<i8").tobytes())
    for item in contents or ():
        if isinstance(item, torch.Tensor):
            t = item.detach().cpu().contiguous()
            # numpy has no bfloat16: hash its raw 16-bit patterns, tagged by the torch dtype
            arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
            h.update(_hash("tensor", t.dtype))
        elif isinstance(item, np.ndarray):
            arr = np.ascontiguousarray(item)
        else:
            h.update(_hash("bytes", len(item)))
            h.update(item)
            continue
        h.update(_hash("array", arr.dtype.str, arr.shape))
        h.update(arr.tobytes())
    return h.hexdigest()
