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
centred on μ wastes its middle levels. With B bits and M = 2^(B−1) magnitude bins, each
sign s ∈ {+, −} gets its own Lloyd–Max quantizer of the magnitudes a = |v| of its values:

    q = M·[v < 0] + m,   m = #{j : t_j^s ≤ a}        (sign bit above the magnitude bits)
    v̂ = table[q],        table[q] = mean{v : code q}  (float64 sums, stored as float32;
                                                      empty bin: ±t_m^s, with t_0^s = 0)

and the M − 1 edges t^s of each sign are fitted to its magnitudes a₍₀₎ ≤ … ≤ a₍ₙ₋₁₎:

    start: the magnitudes split in two where Σ(a − bin mean)² is smallest (an exact search
           over every split between distinct magnitudes), then each half likewise, until
           there are M bins; t_j = a₍ₚ₎ at cut j (the lowest magnitude above it)
    repeat at most LLOYD_ITERATIONS times, until the bins stop changing:
        c_j ← mean{a : t_j ≤ a < t_{j+1}}     (t_0 = 0, t_M = ∞; empty bin: c_j = t_j)
        t_j ← (c_{j−1} + c_j) / 2             (float64)

For M = 2 the start is already the best 2-level quantizer of each sign's magnitudes (the
Lloyd–Max optimum), so B = 2 is the best a sign + 1 magnitude bit per-tensor code can do;
for M > 2 each Lloyd step keeps or lowers Σ(v − v̂)². Sums are differences of float64
running sums over the sorted magnitudes, an order set by the values alone, so the codes and
table depend on the values only. B = 1 keeps only the sign (one centroid per sign).

``value_coding="ranked"`` (:func:`ranked_quantize`) also uses where a value sits in its
chunk's message. Rank each chunk's k kept entries by decreasing |v| (equal magnitudes by
ascending index): the top ranks of every chunk hold its largest magnitudes. Ranks are pooled
in G = ⌊log2(k + 1)⌋ groups that double in size,

    g(r) = min(⌊log2(r + 1)⌋, G − 1)      (k = 64: {0}, {1, 2}, {3…6}, {7…14}, {15…30}, {31…63})

and the message lists each chunk's entries group by group (g = 0 first), by ascending index
inside a group, so the position of an entry tells the receiver its group (the functions
here take the values in rank order, which gives the same groups, bins and codes). Each
group gets its own Lloyd–Max quantizer (:func:`lloyd_max`, as above) of the magnitudes of
all its values, both signs pooled:

    q = M·[v < 0] + m,   m = #{j : t_j^g ≤ |v|},   v̂ = ±table[g(r)·M + m]

so the table holds G·M magnitudes (k = 64, B = 2: 12 entries). They are stored as bfloat16,
24 bytes per tensor: each centroid stands for a bin whose values spread by tens of percent, so
rounding it to 8 significant bits (≤ 0.4 % relative) changes nothing measurable, and the
table then costs no more than uniform's 4 float32 entries (16 bytes) plus 8 bytes; a dense
tensor's 2 entries cost 4. Decoded values are float32.
A dense tensor sends no indices, hence no order: all its values form one group (G = 1). The
groups cost no bits with fixed-width packed indices, whose order is otherwise unused (a
sorted set of k indices needs log2(k!) fewer bits, 4.6 per entry at k = 64; the groups use
1.7 of them). With ``index_coding="rice"`` the indices go ascending, as Rice coding needs,
with codes in the same order, and the unary stream carries each entry's group after the
gaps: u = G − 1 − g in unary (u ones, then a zero), 1.9 bits per entry at k = 64 (33 entries
of the last group take 1 bit, 16 take 2, …).
"""

from __future__ import annotations

import itertools
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


LLOYD_ITERATIONS = 128


def signmag_quantize(
    values: torch.Tensor, bits: int, iterations: int = LLOYD_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign + Lloyd–Max magnitude codes of 1-D float32 ``values``: (int64 codes, float32 table).

    See the module docstring for the rule; ``iterations`` caps the Lloyd steps (0: the
    split start alone).
    """
    m_bins = 1 << (bits - 1)
    neg = values < 0
    mag = values.abs()
    mag64 = mag.to(torch.float64)
    codes = neg.to(torch.int64) * m_bins
    table = []
    for side in (~neg, neg):
        sorted_mag = torch.sort(mag[side]).values.to(torch.float64)
        edges, means = lloyd_max(sorted_mag, m_bins, iterations)
        codes += side * torch.searchsorted(edges, mag64, right=True)
        table.append(means)
    return codes, torch.cat([table[0], -table[1]]).to(torch.float32)


def lloyd_max(
    sorted_mag: torch.Tensor, m_bins: int, iterations: int = LLOYD_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M − 1 edges, M bin means) of ascending float64 magnitudes: best splits, then Lloyd.

    The bins start as repeated best splits (:func:`_split_bins`, exact for M = 2); Lloyd steps
    then refine them and stop early once a step leaves the bins as they were (a fixed point:
    every later step would too). The edges returned are those that made the bins. See the
    module docstring.
    """
    n = sorted_mag.numel()
    zero = sorted_mag.new_zeros(1)
    running = torch.cat([zero, torch.cumsum(sorted_mag, 0)])
    squares = torch.cat([zero, torch.cumsum(sorted_mag * sorted_mag, 0)])
    bounds = torch.tensor([0, n], device=sorted_mag.device)
    while bounds.numel() <= m_bins:
        bounds = _split_bins(sorted_mag, running, squares, bounds)
    edges = sorted_mag[bounds[1:-1]] if n else sorted_mag.new_zeros(m_bins - 1)
    means = _bin_means(running, bounds, edges)
    for _ in range(iterations if n else 0):
        new_edges = (means[1:] + means[:-1]) / 2
        new_bounds = _bin_bounds(sorted_mag, new_edges)
        if torch.equal(new_bounds, bounds):
            break
        edges, bounds = new_edges, new_bounds
        means = _bin_means(running, bounds, edges)
    return edges, means


def _split_bins(
    sorted_mag: torch.Tensor, running: torch.Tensor, squares: torch.Tensor, bounds: torch.Tensor
) -> torch.Tensor:
    """Each bin [i, j) of ``sorted_mag`` cut in two at the p that minimises

        SSE(i, p) + SSE(p, j),   SSE(i, j) = Σ a² − (Σ a)² / (j − i)   over a₍ᵢ₎ … a₍ⱼ₋₁₎,

    among the p with a₍ₚ₋₁₎ < a₍ₚ₎ (equal magnitudes stay together; the lowest p on a tie).
    A bin with no such p keeps all its values above the cut (p = i, an empty lower half).
    """

    def sse(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        total = running[j] - running[i]
        return squares[j] - squares[i] - total * total / (j - i).clamp_min(1)

    out = [bounds[:1]]
    for i, j in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        cut = torch.arange(i + 1, max(i + 1, j), device=sorted_mag.device)
        cut = cut[sorted_mag[cut - 1] < sorted_mag[cut]]
        best = cut[torch.argmin(sse(i, cut) + sse(cut, j))] if cut.numel() else cut.new_tensor(i)
        out += [best.view(1), cut.new_tensor([j])]
    return torch.cat(out)


def _bin_bounds(sorted_mag: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """[0, #{a < t_1}, …, #{a < t_{M−1}}, n]: where each bin starts and ends in ``sorted_mag``."""
    inner = torch.searchsorted(sorted_mag, edges)
    n = inner.new_full((1,), sorted_mag.numel())
    return torch.cat([inner.new_zeros(1), inner, n])


def _bin_means(running: torch.Tensor, bounds: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Mean of each bin from the running sum; an empty bin's mean is its lower edge."""
    counts = bounds[1:] - bounds[:-1]
    sums = running[bounds[1:]] - running[bounds[:-1]]
    lower = torch.cat([edges.new_zeros(1), edges])
    return torch.where(counts > 0, sums / counts.clamp_min(1), lower)


def rank_bounds(k: int, dense: bool = False) -> list[int]:
    """[0, 1, 3, 7, …, k]: group g holds the message positions bounds[g] ≤ r < bounds[g + 1]
    (one group [0, k) for a dense tensor)."""
    if dense or k == 0:
        return [0, k]
    groups = (k + 1).bit_length() - 1  # G = ⌊log2(k + 1)⌋
    return [(1 << g) - 1 for g in range(groups)] + [k]


def ranked_table_size(k: int, bits: int, dense: bool = False) -> int:
    """G·M: entries of a ranked decode table for chunks of k kept values."""
    return (len(rank_bounds(k, dense)) - 1) << (bits - 1)


def magnitude_order(values: torch.Tensor) -> torch.Tensor:
    """Per row of ``values``, the positions in order of decreasing |v| (ties keep their order)."""
    return torch.sort(values.abs(), dim=1, descending=True, stable=True).indices


def ranked_quantize(
    values: torch.Tensor, bits: int, dense: bool = False, iterations: int = LLOYD_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-group codes of float32 ``values`` ``(chunks, k)``, each row in message order:
    (int64 codes of the same shape, bfloat16 table of G·M magnitudes). See the module docstring.
    """
    m_bins = 1 << (bits - 1)
    bounds = rank_bounds(values.shape[1], dense)
    codes = (values < 0).to(torch.int64) * m_bins
    table = []
    for lo, hi in itertools.pairwise(bounds):
        mag = values[:, lo:hi].abs().to(torch.float64)
        edges, means = lloyd_max(torch.sort(mag.reshape(-1)).values, m_bins, iterations)
        codes[:, lo:hi] += torch.searchsorted(edges, mag.contiguous(), right=True)
        table.append(means)
    # A mean above bfloat16's largest finite value would round to Inf, which no receiver
    # accepts and which would poison the error buffer; the clamp keeps both finite.
    return codes, torch.cat(table).clamp_max(torch.finfo(torch.bfloat16).max).to(torch.bfloat16)


def rank_labels(t: torch.Tensor, k: int) -> torch.Tensor:
    """u = G − 1 − g, the Rice stream's label of rank group g for chunks of k kept entries;
    its own inverse (g = G − 1 − u)."""
    return len(rank_bounds(k)) - 2 - t


def rank_label_ones(k: int) -> int:
    """Σ_g |group g|·(G − 1 − g): the one-bits of one chunk's labels."""
    bounds = rank_bounds(k)
    return sum(
        (hi - lo) * (len(bounds) - 2 - g) for g, (lo, hi) in enumerate(itertools.pairwise(bounds))
    )


def rank_groups(k: int, dense: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """g(r) of each of the k message positions, int64 ``(k,)``."""
    sizes = torch.tensor(rank_bounds(k, dense), device=device).diff()
    return torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes)


def ranked_decode(
    codes: torch.Tensor,
    table: torch.Tensor,
    bits: int,
    dense: bool = False,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 v̂ of int64 ``codes`` ``(chunks, k)``: ±table[g·M + m], with g the group of each
    message position, or of each entry when ``groups`` ``(chunks, k)`` is given (Rice-coded
    indices: entries in index order, each with its rank group)."""
    m_bins = 1 << (bits - 1)
    if groups is None:
        groups = rank_groups(codes.shape[1], dense, codes.device)
    mags = table.to(torch.float32).view(-1, m_bins)
    signed = torch.cat([mags, -mags], dim=1).reshape(-1)
    return signed[groups * (2 * m_bins) + codes]


def encode_values(
    values: torch.Tensor, bits: int, coding: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, table) of 1-D float32 ``values`` under ``coding`` (``"uniform"``/``"signmag"``;
    ``"ranked"`` needs the chunk layout: :func:`ranked_quantize`)."""
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
