"""Compute backends for the codec: an exact PyTorch reference and Triton kernels for CUDA.

:func:`resolve_backend` turns a requested backend (``"auto"``, ``"torch"``, ``"triton"``) and a
device into the backend that will run plus a sentence saying why, so callers can report it.
Asking for ``"triton"`` where it cannot run raises :class:`BackendUnavailableError`; ``"auto"``
picks Triton only on CUDA tensors with Triton importable and says which it chose; it never
falls back silently after choosing.

For tests, ``backend="triton"`` also runs on CPU tensors when ``TRITON_INTERPRET=1`` was set
before the kernel modules were imported (Triton's CPU interpreter: exact, but slow, so
``"auto"`` never picks it).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparseloco.chunking import ChunkLayout
from sparseloco.codec import CompressedTensor
from sparseloco.config import CodecConfig
from sparseloco.errors import BackendUnavailableError
from sparseloco.kernels import reference

logger = logging.getLogger(__name__)

# Largest chunk the Triton kernels take: a program holds a whole chunk in registers, and
# beyond 8192 entries they spill on sm_90 (16384 spills at 16 and 32 warps; the 8192 variant
# is checked by tests/kernels/sm90_build.py).
TRITON_MAX_CHUNK_NUMEL = 8192


@dataclass(frozen=True)
class BackendChoice:
    """The backend that runs and the reason it was chosen."""

    name: str
    reason: str


def triton_status(device: torch.device, chunk_numel: int | None = None) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device`` (for chunks of ``chunk_numel``
    entries, when given), and why not if they cannot."""
    if chunk_numel is not None and chunk_numel > TRITON_MAX_CHUNK_NUMEL:
        return False, (
            f"chunks of {chunk_numel} entries exceed the Triton kernels' limit of "
            f"{TRITON_MAX_CHUNK_NUMEL} (chunk_size <= 90)"
        )
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (device.type == "cpu" and interpret):
        return False, (
            f"tensors are on {device.type}, the Triton kernels need CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1 for Triton's interpreter)"
        )
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'sparseloco[triton]')"
    if importlib.util.find_spec("sparseloco.kernels.triton_codec") is None:
        return False, "this build of sparseloco ships no Triton kernels"
    if device.type == "cpu":
        from sparseloco.kernels import triton_codec

        if not triton_codec.interpreted():
            return False, (
                "TRITON_INTERPRET=1 was set after the kernels were imported; set it before "
                "importing sparseloco.kernels.triton_codec"
            )
        return True, "CPU tensors under TRITON_INTERPRET=1 (Triton interpreter)"
    return True, "CUDA tensors and triton importable"


def resolve_backend(
    requested: str,
    device: torch.device,
    chunk_numel: int | None = None,
    value_coding: str = "uniform",
) -> BackendChoice:
    """The backend that runs for ``requested`` on ``device``, with the reason.

    Raises :class:`BackendUnavailableError` when ``"triton"`` is asked for and cannot run.
    The Triton compress kernel implements only ``value_coding="uniform"``.
    """
    ok, why = triton_status(device, chunk_numel)
    if value_coding != "uniform":
        ok, why = False, f"value_coding={value_coding!r} has no Triton kernel (torch reference)"
    if requested == "torch":
        return BackendChoice("torch", "torch backend requested")
    if requested == "triton":
        if not ok:
            raise BackendUnavailableError(f"backend='triton' cannot run: {why}")
        return BackendChoice("triton", "triton backend requested")
    if ok and device.type == "cuda":
        return BackendChoice("triton", f"auto: {why}")
    if ok:
        return BackendChoice("torch", "auto: the Triton interpreter runs only when asked for")
    return BackendChoice("torch", f"auto: {why}")


def compress(
    delta: torch.Tensor, error: torch.Tensor, layout: ChunkLayout, config: CodecConfig
) -> CompressedTensor:
    """Fused error-feedback update, exact top-k, quantization and packing of one tensor."""
    choice = resolve_backend(config.backend, error.device, layout.chunk_numel, config.value_coding)
    logger.debug("compress %s: %s backend (%s)", tuple(layout.shape), choice.name, choice.reason)
    if choice.name == "triton":
        from sparseloco.kernels import triton_codec

        return triton_codec.compress(delta, error, layout, config)
    return reference.compress(delta, error, layout, config)


def aggregate_sparse(
    layout: ChunkLayout,
    peers: Sequence[tuple[torch.Tensor | None, torch.Tensor]],
    *,
    reducer: str,
    clip_to_median: bool,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode + aggregate of many peers' records for one tensor (see the reference)."""
    choice = resolve_backend(backend, peers[0][1].device, layout.chunk_numel)
    logger.debug("aggregate %s: %s backend (%s)", tuple(layout.shape), choice.name, choice.reason)
    if choice.name == "triton":
        from sparseloco.kernels import triton_codec

        return triton_codec.aggregate_sparse(
            layout, peers, reducer=reducer, clip_to_median=clip_to_median
        )
    return reference.aggregate_sparse(layout, peers, reducer=reducer, clip_to_median=clip_to_median)


__all__ = [
    "TRITON_MAX_CHUNK_NUMEL",
    "BackendChoice",
    "aggregate_sparse",
    "compress",
    "resolve_backend",
    "triton_status",
]
