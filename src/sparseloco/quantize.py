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
    c = (values - mu).to(torch.float64)
    counts_i = torch.bincount(codes, minlength=levels)
    # Bin sums as differences of one running sum over the values sorted by bin: a fixed
    # order on every device (index_add_ adds float64 with atomics on CUDA, which is not).
    running = torch.cumsum(c[torch.argsort(codes, stable=True)], 0)
    running = torch.cat([running.new_zeros(1), running])
    at_ends = running[torch.cumsum(counts_i, 0)]
    sums = torch.diff(at_ends, prepend=at_ends.new_zeros(1))
    counts = counts_i.to(torch.float64)
    centres = (torch.arange(levels, device=values.device, dtype=torch.float64) - levels // 2) * (
        scale.to(torch.float64)
    )
    means = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return means.to(torch.float32) + mu


def quantize(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize 1-D float32 ``values`` to ``bits``: (int64 codes, float32 table)."""
    levels = 1 << bits
    mu, scale = quant_scale(values, levels)
    codes = quantize_codes(values, mu, scale, levels)
    return codes, centroid_table(values, codes, mu, scale, levels)


def dequantize(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """v̂ = table[q]."""
    return table[codes]
