"""Shared set-up of the interpreter parity modules (``interp_*.py``).

They run only in a child process started by ``test_interpreter.py`` with TRITON_INTERPRET=1
set before anything imports triton; importing this module anywhere else fails loudly.
"""

from __future__ import annotations

import os

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("interp_* modules need TRITON_INTERPRET=1 (see test_interpreter.py)")

from sparseloco.kernels import triton_codec

if not triton_codec.interpreted():
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 took effect")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so equality also separates -0.0 from 0.0."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    if a.is_floating_point():
        a, b = bits(a), bits(b)
    if not torch.equal(a, b):
        diff = (a != b).nonzero()
        first = diff[:3].tolist()
        raise AssertionError(f"{what}: {diff.shape[0]} entries differ, first at {first}")
