"""Set similarity for near-duplicate detection: shingles, Jaccard, MinHash and the verdict.

Pass 1 of an anti-plagiarism check compares a submission against every earlier one, so it
must be cheap: :class:`MinHasher` turns a set of shingles into a fixed-size signature once,
and the fraction of equal signature slots estimates the Jaccard similarity (standard error
about ``sqrt(J(1-J)/num_perm)``, ≈ 0.04 at 128 slots). Exact :func:`jaccard` is for small sets
and for the finer second pass.

:func:`verdict` applies the Platform thresholds (REFERENCE §4): similarity ≥ 0.97 is a copy,
0.30–0.97 is suspicious (goes to a finer check), below is original.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from gauntlet import derive_seed

Verdict = Literal["copy", "suspicious", "original"]

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a bijection on uint64 whose outputs look independent."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1  # uint64 arrays wrap modulo 2**64, as intended
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Thresholds:
    """Similarity bands: ``copy`` and above is a copy, ``suspicious`` and above is checked again."""

    copy: float = 0.97
    suspicious: float = 0.30

    def __post_init__(self) -> None:
        if not 0.0 < self.suspicious < self.copy <= 1.0:
            raise ValueError(
                f"need 0 < suspicious < copy <= 1, got suspicious={self.suspicious}, "
                f"copy={self.copy}"
            )


def verdict(similarity: float, thresholds: Thresholds) -> Verdict:
    """``"copy"``, ``"suspicious"`` or ``"original"`` for one similarity value."""
    if similarity >= thresholds.copy:
        return "copy"
    if similarity >= thresholds.suspicious:
        return "suspicious"
    return "original"


def shingles(tokens: Sequence[str], n: int) -> set[str]:
    """Every run of ``n`` consecutive tokens, joined by a space (the whole list if shorter)."""
    if n < 1:
        raise ValueError(f"shingle size must be >= 1, got {n}")
    if len(tokens) <= n:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class MinHasher:
    """MinHash signatures with ``num_perm`` slots; the hash family comes from a public seed.

    Two validators with the same ``seed`` compute identical signatures and estimates.
    """

    def __init__(self, num_perm: int = 128, seed: str = "minhash") -> None:
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        rng = np.random.Generator(np.random.PCG64(derive_seed("minhash", seed)))
        self.num_perm = num_perm
        # slot i hashes x as mix(x XOR salt_i): one well-mixed hash function per slot
        self._salts = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64)

    def signature(self, items: Iterable[str]) -> np.ndarray:
        """The (num_perm,) uint64 signature of a set; an empty set gives all-max slots."""
        x = np.array(
            [
                int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                for s in set(items)
            ],
            dtype=np.uint64,
        )
        if x.size == 0:
            return np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        return _mix64(x[None, :] ^ self._salts[:, None]).min(axis=1)

    @staticmethod
    def estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
        """Estimated Jaccard similarity: the fraction of equal slots."""
        return float(np.mean(sig_a == sig_b))
