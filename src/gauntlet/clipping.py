"""The length every update is evaluated at: a reference no update of the window can raise.

Gauntlet clips each update to the median norm of the window's updates. That median moves
with the count of large norms: three huge-norm identities raise it above the honest norms, and
an update amplified ×3 is then applied at three times the honest length and out-scores honest
peers. Here the evaluation ranks *directions* at one common length per tensor, so scaling an
update by any factor changes nothing, and the length comes from values the window's updates
cannot push up.

For tensor n, with ‖vᵢ[n]‖ the float64 norm of peer i's decoded update, window t is
evaluated at the reference length

    r_t[n] = median_{j ∈ A_s} clamp(‖v_j[n]‖, r_s[n]/g, g·r_s[n])
                 A_s = the accepted set of the latest earlier window s that had one,
                 r_s = the reference window s used, g = ``EvalConfig.clip_growth`` (2)
    r_t[n] = min_{j ∈ C_t, ‖v_j[n]‖ > 0} ‖v_j[n]‖
                 before any window was accepted (C_t = the window's decoded, not failed
                 updates)

    fᵢ[n] = r_t[n] / ‖vᵢ[n]‖   (1 for a zero tensor, which stays zero)

Every non-zero tensor is applied at length exactly r_t[n] (up to float32 rounding), so
fᵢ·(c·vᵢ) = fᵢ·vᵢ for every c > 0: amplifying (×2, ×3) or shrinking an update earns nothing,
and since all peers share one length, moving r gives nobody an edge over another. No update
of window t enters r_t once a window has been accepted, and before that adding norms to a
minimum can only lower it. Only *accepted* updates (helpful at length r) shape the next
reference, as a median: huge-norm noise that is not accepted has no say, a minority of the
accepted set cannot move it, and even a majority moves it by at most ×g (or ÷g) per window.
Zero norms never enter a reference (a free-rider cannot zero the steps).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from sparseloco.kernels.reference import median

Norms = dict[str, dict[str, float]]
"""peer → tensor name → float64 norm of its decoded update."""


def update_norms(updates: Mapping[str, Mapping[str, torch.Tensor]]) -> Norms:
    """Per peer (sorted) and tensor (sorted), ‖v‖ in float64."""
    return {
        peer: {
            name: float(torch.linalg.vector_norm(updates[peer][name].to(torch.float64)))
            for name in sorted(updates[peer])
        }
        for peer in sorted(updates)
    }


def window_reference(norms: Norms, peers: Iterable[str]) -> dict[str, float]:
    """r[n] = the smallest non-zero norm of tensor n over ``peers`` (names with none omitted)."""
    out: dict[str, float] = {}
    for peer in sorted(peers):
        for name, value in norms[peer].items():
            if value > 0.0 and (name not in out or value < out[name]):
                out[name] = value
    return dict(sorted(out.items()))


def accepted_reference(
    norms: Norms, accepted: Iterable[str], previous: Mapping[str, float], growth: float
) -> dict[str, float]:
    """r[n] = median over the ``accepted`` peers' non-zero norms of tensor n, each clamped to
    [``previous[n]``/``growth``, ``growth``·``previous[n]``] (unclamped without a previous)."""
    by_name: dict[str, list[float]] = {}
    for peer in sorted(accepted):
        for name, value in norms[peer].items():
            if value > 0.0:
                prev = previous.get(name)
                if prev is not None:
                    value = min(max(value, prev / growth), growth * prev)
                by_name.setdefault(name, []).append(value)
    return {name: median(values) for name, values in sorted(by_name.items())}


def reference_factors(norms: Norms, reference: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """fᵢ[n] = r[n]/‖vᵢ[n]‖ for every peer and tensor; 1 for a zero norm or no reference."""
    return {
        peer: {
            name: reference[name] / value if value > 0.0 and name in reference else 1.0
            for name, value in tensors.items()
        }
        for peer, tensors in norms.items()
    }
