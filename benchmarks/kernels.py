"""Benchmark of the codec kernels on a CUDA device: compress and decode + aggregate.

For Llama-like models of about 1e8 and 1e9 parameters (bf16 pseudo-gradients, fp32 error
buffers, the covenant-72b codec: 64×64 chunks, k=64, 2-bit values, 12-bit indices) it times

* compress: the Triton path, the PyTorch reference on the GPU, and a torch-op pipeline like
  Templar's (abs, topk, gather, quantize, scatter back);
* decode + aggregate of 20 peers (mean over the peers that selected, median-norm clip):
  the Triton kernel and the PyTorch reference;

and, in the same run, the device's copy bandwidth (``dst.copy_(src)`` of 2 GiB, counting
read + write). Effective bandwidth is taken over the *minimal bytes* each operation must
move:

* compress: read Δ (2 B/entry) + read and write e (8 B/entry) + the message;
* aggregate: per peer read indices and values as decoded (8 + 4 B per kept entry) + write
  the fp32 result (4 B/entry).

Peak extra device memory is what a call allocates beyond its inputs and its outputs, as a
fraction of the tensor's bytes (bf16 Δ for compress, the fp32 result for aggregate; target
≤ 5 %), worst tensor reported. Before timing, every tensor of the 1e8
model is checked bit for bit against the reference on the GPU.

Usage: ``python benchmarks/kernels.py [--params 1e8 1e9] [--reps 5]``. Prints a table and
writes ``benchmarks/results/kernels.json``. Exits with code 2 when no CUDA device is present
and with code 1 when a tensor's parity check fails.

``--dry-run`` runs every step of the script on the CPU under Triton's interpreter, on a few
small tensors (wall-clock timings, no memory figures, targets not judged), so the script is
known to work before a GPU's limited time is spent on it; CI runs it
(``tests/kernels/test_benchmark_dry_run.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from sparseloco.chunking import ChunkLayout
from sparseloco.config import CodecConfig
from sparseloco.kernels import reference, resolve_backend

PEERS = 20
TARGET_BW_FRACTION = 0.60
TARGET_SPEEDUP_VS_TEMPLAR = 10.0
TARGET_EXTRA_MEMORY = 0.05
RESULTS = Path(__file__).parent / "results" / "kernels.json"
# --dry-run: a square, an odd-sized matrix, a tall one and a 1-D tensor (sent densely)
DRY_RUN_SHAPES = {"embed": (256, 128), "l0.q": (128, 128), "l0.odd": (100, 70), "l0.norm": (128,)}


def llama_shapes(params: float) -> dict[str, tuple[int, ...]]:
    """Weight shapes of a Llama-like decoder with about ``params`` parameters."""
    if params <= 3e8:
        dim, ffn, layers, vocab = 768, 2048, 8, 32000
    else:
        dim, ffn, layers, vocab = 2048, 5632, 17, 32000
    shapes: dict[str, tuple[int, ...]] = {"embed": (vocab, dim), "lm_head": (vocab, dim)}
    for i in range(layers):
        for name in ("q", "k", "v", "o"):
            shapes[f"l{i}.{name}"] = (dim, dim)
        shapes[f"l{i}.gate"] = (ffn, dim)
        shapes[f"l{i}.up"] = (ffn, dim)
        shapes[f"l{i}.down"] = (dim, ffn)
        shapes[f"l{i}.norm1"] = (dim,)
        shapes[f"l{i}.norm2"] = (dim,)
    return shapes


def device_time(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, reps: int, numel: int = 1 << 29) -> float:
    """Bytes per second of a device-to-device copy, read + write counted."""
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = device_time(lambda: dst.copy_(src), reps, device)
    return 2 * src.numel() * 4 / seconds


def templar_compress(
    delta: torch.Tensor, error: torch.Tensor, layout: ChunkLayout, config: CodecConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A torch-op pipeline like Templar's: EF update, abs, topk, gather, quantize, scatter."""
    work = error.view(-1, layout.tiles_across, layout.tile_rows, layout.tile_cols)
    work.mul_(config.error_decay).add_(layout.tile_view(delta).float())
    k = layout.k(config.topk)
    idx = error.abs().topk(k, dim=1, sorted=False).indices
    vals = error.gather(1, idx)
    mu, sigma = vals.mean(), vals.std()
    scale = sigma * (6.0 / config.levels)
    codes = ((vals - mu) / scale + config.levels // 2).round().clamp(0, config.levels - 1)
    decoded = (codes - config.levels // 2) * scale + mu
    error.scatter_(1, idx, vals - decoded)
    return idx, codes.to(torch.uint8), decoded


def run_compress(shapes, device, reps, delta_dtype=torch.bfloat16) -> dict:
    from sparseloco.kernels import triton_codec

    config = CodecConfig.from_preset("covenant-72b")
    layouts = {n: ChunkLayout.for_shape(s, config.chunk_size) for n, s in shapes.items()}
    g = torch.Generator(device=device).manual_seed(0)
    deltas = {
        n: torch.randn(s, generator=g, device=device, dtype=torch.float32).to(delta_dtype)
        for n, s in shapes.items()
    }
    errors = {n: torch.zeros(layouts[n].buffer_shape, device=device) for n in shapes}
    numel = sum(l_.numel for l_ in layouts.values())

    def each(fn):
        return lambda: [fn(deltas[n], errors[n], layouts[n], config) for n in shapes]

    out = {
        name: {"seconds": device_time(each(fn), reps, device)}
        for name, fn in (
            ("triton", triton_codec.compress),
            ("torch_reference", reference.compress),
            ("torch_templar_ops", templar_compress),
        )
    }
    msg = sum(
        triton_codec.compress(deltas[n], errors[n], layouts[n], config).nbytes for n in shapes
    )
    minimal = numel * (torch.finfo(delta_dtype).bits // 8 + 8) + msg
    extra = peak_extra(
        lambda n: triton_codec.compress(deltas[n], errors[n], layouts[n], config),
        shapes,
        lambda n, ct: ct.nbytes,
        lambda n: deltas[n].numel() * deltas[n].element_size(),
        device,
    )
    return {"numel": numel, "minimal_bytes": minimal, "paths": out, "triton_peak_extra": extra}


def make_peers(layout: ChunkLayout, k: int, device, num_sets: int = 4):
    """20 peers' decoded records; index sets cycle over ``num_sets`` random draws."""
    g = torch.Generator(device=device).manual_seed(1)
    sets = [
        torch.rand(layout.buffer_shape, generator=g, device=device)
        .topk(k, dim=1, sorted=False)
        .indices.sort(dim=1)
        .values
        for _ in range(num_sets)
    ]
    return [
        (sets[p % num_sets], torch.randn(layout.num_chunks, k, generator=g, device=device))
        for p in range(PEERS)
    ]


def run_aggregate(shapes, device, reps) -> dict:
    from sparseloco.kernels import triton_codec

    config = CodecConfig.from_preset("covenant-72b")
    layouts = {n: ChunkLayout.for_shape(s, config.chunk_size) for n, s in shapes.items()}
    peers = {}
    for n, layout in layouts.items():
        records = make_peers(layout, layout.k(config.topk), device)
        dense = layout.is_dense(config.topk)
        peers[n] = [(None, v) for _, v in records] if dense else records
    numel = sum(layout.numel for layout in layouts.values())
    kept = sum(layout.num_chunks * layout.k(config.topk) for layout in layouts.values())
    minimal = PEERS * kept * 12 + numel * 4

    def each(fn):
        return lambda: [
            fn(layouts[n], peers[n], reducer="mean_selected", clip_to_median=True) for n in shapes
        ]

    out = {
        name: {"seconds": device_time(each(fn), reps, device)}
        for name, fn in (
            ("triton", triton_codec.aggregate_sparse),
            ("torch_reference", reference.aggregate_sparse),
        )
    }
    extra = peak_extra(
        lambda n: triton_codec.aggregate_sparse(
            layouts[n], peers[n], reducer="mean_selected", clip_to_median=True
        ),
        shapes,
        lambda n, t: t.numel() * 4,
        lambda n: layouts[n].numel * 4,
        device,
    )
    return {
        "numel": numel,
        "minimal_bytes": minimal,
        "peers": PEERS,
        "paths": out,
        "triton_peak_extra": extra,
    }


def peak_extra(call, shapes, output_bytes, tensor_bytes, device: torch.device) -> dict:
    """Largest (peak − before − outputs) / tensor bytes over the tensors, with its name."""
    if device.type != "cuda":
        return {"fraction": None, "bytes": None, "tensor": None}  # no allocator stats on CPU
    worst = {"fraction": 0.0, "bytes": 0, "tensor": None}
    for n in shapes:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = call(n)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - output_bytes(n, result)
        frac = extra / tensor_bytes(n)
        if frac > worst["fraction"]:
            worst = {"fraction": frac, "bytes": int(extra), "tensor": n}
        del result
    return worst


def verify_exact(shapes, device) -> dict:
    """Bit-for-bit parity of the Triton path against the reference, on this device."""
    from sparseloco.kernels import triton_codec

    config = CodecConfig.from_preset("covenant-72b")
    g = torch.Generator(device=device).manual_seed(2)
    bad = []
    for n, s in shapes.items():
        layout = ChunkLayout.for_shape(s, config.chunk_size)
        delta = torch.randn(s, generator=g, device=device).to(torch.bfloat16)
        e_ref = torch.randn(layout.buffer_shape, generator=g, device=device)
        e_tri = e_ref.clone()
        a = reference.compress(delta, e_ref, layout, config)
        b = triton_codec.compress(delta, e_tri, layout, config)
        pairs = zip(a.buffers().values(), b.buffers().values(), strict=True)
        same = all(torch.equal(x, y) for x, y in pairs)
        same = same and torch.equal(e_ref.view(torch.int32), e_tri.view(torch.int32))
        peers = make_peers(layout, layout.k(config.topk), device, num_sets=2)
        if layout.is_dense(config.topk):
            peers = [(None, v) for _, v in peers]
        for reducer in ("mean", "mean_selected"):
            x = reference.aggregate_sparse(layout, peers, reducer=reducer, clip_to_median=True)
            y = triton_codec.aggregate_sparse(layout, peers, reducer=reducer, clip_to_median=True)
            same = same and torch.equal(x.view(torch.int32), y.view(torch.int32))
        if not same:
            bad.append(n)
    return {"tensors": len(shapes), "mismatched": bad}


def main() -> int:
    # no abbreviations: "--dry-run" is looked for in sys.argv before argparse runs
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--params", type=float, nargs="+", default=[1e8, 1e9])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--dry-run", action="store_true", help="small tensors on the CPU, Triton interpreter"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS})")
    args = parser.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        all_shapes = {"dry-run": DRY_RUN_SHAPES}
        parity_shapes = DRY_RUN_SHAPES
        args.reps = 1
    elif not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA device; none is available here.", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        all_shapes = {p: llama_shapes(p) for p in args.params}
        parity_shapes = llama_shapes(1e8)
    out_path = args.out or (None if args.dry_run else RESULTS)
    choice = resolve_backend("triton", device)
    bandwidth = copy_bandwidth(device, args.reps, 1 << 20 if args.dry_run else 1 << 29)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "backend": {"name": choice.name, "reason": choice.reason},
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "parity": verify_exact(parity_shapes, device),
        "models": {},
    }
    for name, shapes in all_shapes.items():
        comp = run_compress(shapes, device, args.reps)
        agg = run_aggregate(shapes, device, args.reps)
        for block in (comp, agg):
            for path in block["paths"].values():
                gbps = block["minimal_bytes"] / path["seconds"]
                path["effective_GBps"] = gbps / 1e9
                path["fraction_of_copy"] = gbps / bandwidth
        tri, tem = comp["paths"]["triton"], comp["paths"]["torch_templar_ops"]
        comp["speedup_vs_templar"] = tem["seconds"] / tri["seconds"]
        label = name if args.dry_run else f"{comp['numel'] / 1e9:.2f}B"
        results["models"][label] = {"compress": comp, "aggregate": agg}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # a dry run's timings are the interpreter's: the targets say nothing about them
    results["targets"] = {} if args.dry_run else judge_targets(results["models"])
    print_table(results)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"wrote {out_path}")
    return 1 if results["parity"]["mismatched"] else 0


def judge_targets(models: dict) -> dict[str, bool]:
    """Each issue target, met or not, per model size."""
    targets = []
    for key, model in models.items():
        c, a = model["compress"], model["aggregate"]
        targets += [
            (
                f"{key} compress >= 60% copy BW",
                c["paths"]["triton"]["fraction_of_copy"] >= TARGET_BW_FRACTION,
            ),
            (
                f"{key} compress >= 10x Templar ops",
                c["speedup_vs_templar"] >= TARGET_SPEEDUP_VS_TEMPLAR,
            ),
            (
                f"{key} aggregate >= 60% copy BW",
                a["paths"]["triton"]["fraction_of_copy"] >= TARGET_BW_FRACTION,
            ),
            (
                f"{key} compress extra memory <= 5%",
                c["triton_peak_extra"]["fraction"] <= TARGET_EXTRA_MEMORY,
            ),
            (
                f"{key} aggregate extra memory <= 5%",
                a["triton_peak_extra"]["fraction"] <= TARGET_EXTRA_MEMORY,
            ),
        ]
    return dict(targets)


def print_table(results: dict) -> None:
    print(f"device: {results['device']}  torch {results['torch']}  triton {results['triton']}")
    print(f"backend: {results['backend']['name']} ({results['backend']['reason']})")
    print(f"copy bandwidth: {results['copy_bandwidth_GBps']:.0f} GB/s")
    parity = results["parity"]
    print(f"parity on this device: {parity['tensors']} tensors, mismatched: {parity['mismatched']}")
    header = f"{'model':>6} {'op':<10} {'path':<18} {'ms':>10} {'GB/s':>8} {'of copy':>8}"
    print(header)
    print("-" * len(header))
    for key, model in results["models"].items():
        for op in ("compress", "aggregate"):
            block = model[op]
            for path, r in block["paths"].items():
                print(
                    f"{key:>6} {op:<10} {path:<18} {r['seconds'] * 1e3:>10.2f} "
                    f"{r['effective_GBps']:>8.0f} {r['fraction_of_copy']:>8.1%}"
                )
            extra = block["triton_peak_extra"]
            if extra["fraction"] is not None:
                print(
                    f"{'':>6} {op:<10} triton peak extra memory {extra['fraction']:.1%} "
                    f"({extra['bytes'] / 2**20:.1f} MiB on {extra['tensor']})"
                )
        print(
            f"{key:>6} compress speed-up vs Templar ops: "
            f"{model['compress']['speedup_vs_templar']:.1f}x"
        )
    for name, ok in results["targets"].items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"total {time.time() - t0:.0f} s", file=sys.stderr)
    sys.exit(code)
