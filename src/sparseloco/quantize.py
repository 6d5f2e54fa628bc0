"""Per-tensor low-bit quantization of the kept values (REFERENCE §1, step 6).

For the n kept values v of one tensor and L = 2^bits levels:

    μ = mean(v)                       (accumulated in float64, stored as float32)
    c = v − μ                         (float32)
    σ = sqrt(Σ c² / (n − 1))          (float64; 0 when n = 1)
    s = 6σ / L                        (bin width; 1.5σ for 2 bits)
    q = clamp(round(c / s + L/2), 0, L − 1)      (float32, round half to even)
    table[j] = mean{c : q = j} + μ    (empty bin: (j − L/2)·s + μ)
    v̂ = table[q]

When s = 0 (all kept values equal, or n = 1) every code is L/2. Decoding needs only the
L-entry float32 table and the codes.

``value_coding="signmag"`` (:func:`signmag_quantize`) fits the bins to the kept values
instead: they are the largest magnitudes of their chunks, so |v| is far from 0 and a grid
centred on μ wastes its middle levels. With B bits and M = 2^(B−1) magnitude bins:

    a = |v|,  a₍₀₎ ≤ … ≤ a₍ₙ₋₁₎ sorted              (float32)
    t_j = a₍⌊j·n/M⌋₎  for j = 1..M−1                (lower order statistic: no interpolation)
    m = #{j : t_j ≤ a}                               (magnitude bin, 0..M−1)
    q = M·[v < 0] + m                                (sign bit above the magnitude bits)
    table[q] = mean{v : code q}                      (float64 sums in a fixed order;
                                                      empty bin: ±t_m, with t_0 = 0)
    v̂ = table[q]

B = 1 keeps only the sign (one centroid per sign), B = 2 splits |v| at its median, B = 4 at
its octiles. Equal magnitudes always share a bin, so the codes depend on the values only.
"""

from __future__ import annotations

import math

import torch


def quant_scale(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, s) as float32 scalars for ``values`` (1-D float32)."""
    n = values.numel()
    if n == 0:
        zero = torch.zeros((), dtype=torch.float32, device=values.device)
        return zero, zero.clone()
    v64 = values.to(torch.float64)
    mu = (v64.sum() / n).to(torch.float32)
    c = (values - mu).to(torch.float64)
    sigma = torch.sqrt((c * c).sum() / (n - 1)) if n > 1 else torch.zeros_like(c.sum())
    scale = (sigma * (6.0 / levels)).to(torch.float32)
    if not math.isfinite(float(scale)):
        scale = torch.zeros_like(mu)
    return mu, scale


def quantize_codes(
    values: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, levels: int
) -> torch.Tensor:
    """Bin index of each value, int64 in ``[0, levels)``."""
    if float(scale) == 0.0:
        return torch.full(values.shape, levels // 2, dtype=torch.int64, device=values.device)
    c = values - mu
    q = torch.round(c / scale + float(levels // 2))
    return q.clamp_(0, levels - 1).to(torch.int64)


def centroid_table(
    values: torch.Tensor, codes: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, levels: int
) -> torch.Tensor:
    """The float32 decode table: mean of the centred values in each bin, plus μ."""
    sums, counts = bin_sums((values - mu).to(torch.float64), codes, levels)
    centres = (torch.arange(levels, device=values.device, dtype=torch.float64) - levels // 2) * (
        scale.to(torch.float64)
    )
    means = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return means.to(torch.float32) + mu


def bin_sums(
    x: torch.Tensor, codes: torch.Tensor, levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ x per bin, count per bin) as float64, for float64 ``x`` and int64 ``codes``."""
    counts_i = torch.bincount(codes, minlength=levels)
    # Bin sums as differences of one running sum over the values sorted by bin: a fixed
    # order on every device (index_add_ adds float64 with atomics on CUDA, which is not).
    running = torch.cumsum(x[torch.argsort(codes, stable=True)], 0)
    running = torch.cat([running.new_zeros(1), running])
    at_ends = running[torch.cumsum(counts_i, 0)]
    sums = torch.diff(at_ends, prepend=at_ends.new_zeros(1))
    return sums, counts_i.to(torch.float64)


def signmag_quantize(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign + magnitude-quantile codes of 1-D float32 ``values``: (int64 codes, float32 table).

    See the module docstring for the rule.
    """
    m_bins = 1 << (bits - 1)
    mag = values.abs()
    n = values.numel()
    if n and m_bins > 1:
        ranks = torch.arange(1, m_bins, device=values.device) * n // m_bins
        edges = torch.sort(mag).values[ranks]
        mbin = torch.searchsorted(edges, mag, right=True)
    else:  # one magnitude bin, or no values: every edge at 0 (the table needs M − 1)
        edges = mag.new_zeros(m_bins - 1)
        mbin = torch.zeros(n, dtype=torch.int64, device=values.device)
    codes = (values < 0).to(torch.int64) * m_bins + mbin
    sums, counts = bin_sums(values.to(torch.float64), codes, 2 * m_bins)
    lower = torch.cat([edges.new_zeros(1), edges]).to(torch.float64)
    empty = torch.cat([lower, -lower])
    means = torch.where(counts > 0, sums / counts.clamp_min(1), empty)
    return codes, means.to(torch.float32)


def encode_values(
    values: torch.Tensor, bits: int, coding: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, table) of 1-D float32 ``values`` under ``coding`` (``"uniform"``/``"signmag"``)."""
    if coding == "signmag":
        return signmag_quantize(values, bits)
    return quantize(values, bits)


def quantize(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize 1-D float32 ``values`` to ``bits``: (int64 codes, float32 table)."""
    levels = 1 << bits
    mu, scale = quant_scale(values, levels)
    codes = quantize_codes(values, mu, scale, levels)
    return codes, centroid_table(values, codes, mu, scale, levels)


def dequantize(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """v̂ = table[q]."""
    return table[codes]
