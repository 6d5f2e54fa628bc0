"""A small numpy Yuma-consensus simulator (REFERENCE §3), enough to check validator agreement.

With validator stakes S (normalized to sum 1) and row-normalized weights W (validators ×
miners):

    C_m   = max{c : Σ_{v: W_vm ≥ c} S_v ≥ κ}        stake-weighted κ-quantile ("median")
    W̄_vm  = min(W_vm, C_m)                         weights above consensus are clipped
    R_m   = Σ_v S_v·W̄_vm,  I_m = R_m / Σ R          rank and incentive
    T_m   = R_m / Σ_v S_v·W_vm                       miner trust
    VT_v  = Σ_m W̄_vm                                validator trust (1 = fully in consensus)
    ΔB_vm = S_v·W̄_vm / Σ_v S_v·W̄_vm,  B ← α·ΔB + (1−α)·B,  D_v ∝ Σ_m B_vm·I_m

Validators that run the same deterministic scorer on the same inputs submit identical rows,
so nothing is clipped and every one keeps VT = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class YumaResult:
    """Per-miner consensus, rank, trust and incentive; per-validator trust and dividends."""

    consensus: np.ndarray
    ranks: np.ndarray
    trust: np.ndarray
    incentive: np.ndarray
    validator_trust: np.ndarray
    dividends: np.ndarray
    bonds: np.ndarray


def _normalize_rows(w: np.ndarray) -> np.ndarray:
    sums = w.sum(axis=1, keepdims=True)
    return np.divide(w, sums, out=np.zeros_like(w), where=sums > 0)


def weighted_quantile_consensus(w: np.ndarray, stakes: np.ndarray, kappa: float) -> np.ndarray:
    """C_m = the largest c with Σ stake of validators weighting m at ≥ c being ≥ κ."""
    out = np.zeros(w.shape[1])
    for m in range(w.shape[1]):
        order = np.argsort(-w[:, m], kind="stable")
        cum = np.cumsum(stakes[order])
        hit = np.nonzero(cum >= kappa - 1e-12)[0]
        out[m] = w[order[hit[0]], m] if hit.size else 0.0
    return out


def yuma_consensus(
    weights: np.ndarray,
    stakes: np.ndarray,
    *,
    kappa: float = 0.5,
    bond_alpha: float = 0.1,
    prev_bonds: np.ndarray | None = None,
) -> YumaResult:
    """One epoch of Yuma consensus; see the module docstring for the formulas."""
    w = _normalize_rows(np.asarray(weights, dtype=np.float64))
    s = np.asarray(stakes, dtype=np.float64)
    if s.shape != (w.shape[0],) or s.sum() <= 0:
        raise ValueError("stakes must have one positive-sum entry per weight row")
    s = s / s.sum()
    consensus = weighted_quantile_consensus(w, s, kappa)
    clipped = np.minimum(w, consensus[None, :])
    ranks = s @ clipped
    incentive = ranks / ranks.sum() if ranks.sum() > 0 else np.zeros_like(ranks)
    raw = s @ w
    trust = np.divide(ranks, raw, out=np.zeros_like(ranks), where=raw > 0)
    vtrust = clipped.sum(axis=1)
    delta = s[:, None] * clipped
    col = delta.sum(axis=0, keepdims=True)
    delta = np.divide(delta, col, out=np.zeros_like(delta), where=col > 0)
    bonds = delta if prev_bonds is None else bond_alpha * delta + (1 - bond_alpha) * prev_bonds
    div = bonds @ incentive
    dividends = div / div.sum() if div.sum() > 0 else np.zeros_like(div)
    return YumaResult(consensus, ranks, trust, incentive, vtrust, dividends, bonds)
