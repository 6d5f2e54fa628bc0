"""Compile every Triton kernel for sm_90 without a GPU and report registers and spills.

Run as ``python tests/kernels/sm90_build.py`` (TRITON_INTERPRET must be unset): for each
kernel variant the codec launches, ``triton.compile`` targets ``GPUTarget("cuda", 90, 32)``
with the launch's options, then the bundled ``ptxas -v`` (with Triton's ``--fmad=false``)
reports the register count and the spill bytes, and the PTX is searched for fused
multiply-adds (the kernels launch with fp fusion off, which exactness needs). Prints one
JSON line per variant; exits 1 if any variant spills or contains an FMA.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from sparseloco.kernels import TRITON_MAX_CHUNK_NUMEL, triton_aggregate, triton_compress
from sparseloco.kernels.triton_codec import num_warps_for

TARGET = GPUTarget("cuda", 90, 32)

_I32 = "i32"
_SELECT_NAMES = [
    "delta_ptr",
    "err_ptr",
    "idx_ptr",
    "val_ptr",
    "num_chunks",
    "n",
    "k",
    "tiles_across",
    "tile_rows",
    "tile_cols",
    "cols",
    "beta",
]


def _select(delta: str, err: str, block: int) -> tuple:
    types = [delta, err, "*i16", "*fp32"] + [_I32] * 7 + ["fp32"]
    sig = dict(zip(_SELECT_NAMES, types, strict=True))
    const = {"DELTA_BF16": delta == "*i16", "ERR_BF16": err == "*i16", "ROWS": 1, "BLOCK": block}
    return ("select_kernel", sig, const, num_warps_for(block), 3)


def _codes(bits: int) -> tuple:
    names = ["val_ptr", "stats_ptr", "codes_ptr", "packed_ptr", "count", "nbytes"]
    sig = dict(zip(names, ["*fp32", "*fp32", "*u8", "*u8", _I32, _I32], strict=True))
    return ("codes_kernel", sig, {"LEVELS": 1 << bits, "BITS": bits, "BLOCK": 1024}, 4, 3)


def _scatter(index_bits: int, err: str) -> tuple:
    names = ["idx_ptr", "val_ptr", "codes_ptr", "table_ptr", "err_ptr", "packed_ptr"]
    names += ["count", "k", "n"]
    types = ["*i16", "*fp32", "*u8", "*fp32", err, "*u8", _I32, _I32, _I32]
    const = {"ERR_BF16": err == "*i16", "INDEX_BITS": index_bits, "BLOCK": 1024}
    return ("scatter_pack_kernel", dict(zip(names, types, strict=True)), const, 4, 3)


def _aggregate(mean_selected: bool, dense: bool, block: int, kblock: int) -> tuple:
    names = ["out_ptr", "count_ptr", "idx_addrs", "val_addrs", "factors_ptr", "num_peers"]
    names += ["num_chunks", "n", "k", "tiles_across", "tile_rows", "tile_cols", "cols"]
    types = ["*fp32", "*fp32", "*i64", "*i64", "*fp32"] + [_I32] * 8
    const = {
        "MEAN_SELECTED": mean_selected,
        "DENSE": dense,
        "ROWS": 1,
        "BLOCK": block,
        "KBLOCK": kblock,
    }
    sig = dict(zip(names, types, strict=True))
    return ("aggregate_kernel", sig, const, num_warps_for(block), 1)


VARIANTS = [
    _select("*fp32", "*fp32", 4096),
    _select("*i16", "*i16", 4096),
    _select("*fp16", "*fp32", 4096),
    _select("*i16", "*fp32", TRITON_MAX_CHUNK_NUMEL),
    _codes(2),
    _codes(4),
    _codes(8),
    _scatter(12, "*fp32"),
    _scatter(16, "*i16"),
    _scatter(0, "*fp32"),
    _aggregate(True, False, 4096, 64),
    _aggregate(False, False, 4096, 128),
    _aggregate(True, True, 64, 64),
    _aggregate(True, False, TRITON_MAX_CHUNK_NUMEL, 256),
]

_KERNELS = {
    "select_kernel": triton_compress.select_kernel,
    "codes_kernel": triton_compress.codes_kernel,
    "scatter_pack_kernel": triton_compress.scatter_pack_kernel,
    "aggregate_kernel": triton_aggregate.aggregate_kernel,
}


def build(variant: tuple) -> dict:
    """Compile one variant; registers and spill bytes from ``ptxas -v`` on its PTX."""
    name, sig, const, num_warps, num_stages = variant
    fn = _KERNELS[name]
    src = ASTSource(fn=fn, signature={**sig, **dict.fromkeys(const, "constexpr")}, constexprs=const)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": False}
    compiled = triton.compile(src, target=TARGET, options=options)
    ptxas, arch = get_ptxas(TARGET.arch).path, sm_arch_from_capability(TARGET.arch)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run(
            [ptxas, "--fmad=false", "-v", f"--gpu-name={arch}", str(ptx), "-o", str(ptx) + ".o"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {
        "kernel": name,
        "constexprs": const,
        "num_warps": num_warps,
        "registers": regs,
        "spill_bytes": sum(spills),
        "fma_in_ptx": bool(re.search(r"\bfma\.rn", compiled.asm["ptx"])),
    }


def main() -> int:
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(build, VARIANTS))
    for r in results:
        print(json.dumps(r, sort_keys=True))
    return 1 if any(r["spill_bytes"] or r["fma_in_ptx"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
