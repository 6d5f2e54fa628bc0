"""Helpers shared by the benchmark scripts: model shapes, timing, tables, JSON output."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).with_name("results")


def llama_shapes(
    layers: int = 16,
    dim: int = 2048,
    ffn: int = 8192,
    kv_dim: int = 512,
    vocab: int = 128256,
) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a Llama-3.2-1B-like model (tied embeddings): ~1.24e9 parameters."""
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, dim)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attn.q.weight": (dim, dim),
            p + "attn.k.weight": (kv_dim, dim),
            p + "attn.v.weight": (kv_dim, dim),
            p + "attn.o.weight": (dim, dim),
            p + "mlp.gate.weight": (ffn, dim),
            p + "mlp.up.weight": (ffn, dim),
            p + "mlp.down.weight": (dim, ffn),
            p + "attn_norm.weight": (dim,),
            p + "mlp_norm.weight": (dim,),
        }
    shapes["norm.weight"] = (dim,)
    return shapes


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls (seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def cpu_seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    """CPU seconds of one call on one torch thread (``time.thread_time``) and its result. On a
    shared machine this is the steadier figure: it leaves out the time other processes held
    the core (and the spin-waits of idle worker threads, which process time would count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.thread_time()
        out = fn()
        return time.thread_time() - start, out
    finally:
        torch.set_num_threads(threads)


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path
