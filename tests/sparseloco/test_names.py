"""Canonical parameter names: wrapped and plain peers of one model interoperate."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from sparseloco import ConfigError, InProcessHub, SparseLoCo, canonical_name


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("h.0.attn.weight", "h.0.attn.weight"),
        ("_orig_mod.h.0.attn.weight", "h.0.attn.weight"),
        ("module.h.0.attn.weight", "h.0.attn.weight"),
        ("module._orig_mod.h.0.weight", "h.0.weight"),
        ("_orig_mod.module.h.0.weight", "h.0.weight"),
        ("_fsdp_wrapped_module.h.0._fsdp_wrapped_module.weight", "h.0.weight"),
        ("h.0._checkpoint_wrapped_module.mlp.weight", "h.0.mlp.weight"),
        ("h._orig_mod.0.weight", "h.0.weight"),  # a compiled submodule
        ("encoder.module.weight", "encoder.module.weight"),  # a real submodule named module
        ("module", "module"),
    ],
)
def test_canonical_name_drops_wrapper_components(raw, canonical):
    assert canonical_name(raw) == canonical


def test_a_name_of_wrappers_only_and_a_collision_raise():
    with pytest.raises(ConfigError, match="only of wrapper"):
        canonical_name("_orig_mod")
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match="twice"):
        SparseLoCo([("module.w", a), ("w", b)], InProcessHub().connect("x"))


def _model():
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 70), torch.nn.Tanh(), torch.nn.Linear(70, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def _wrapped(kind):
    """(the module the peer trains, the module its optimizer is built from)."""
    m = _model()
    if kind == "compiled":
        return m, torch.compile(m)  # no forward pass: nothing is compiled, names are real
    if kind == "data-parallel":  # DDP's prefix, without a process group
        return m, torch.nn.DataParallel(m)
    if kind == "checkpointed-compiled-dp":
        m[0] = checkpoint_wrapper(m[0])
        return m, torch.nn.DataParallel(torch.compile(m))
    return m, m


def test_compiled_wrapped_and_plain_peers_interoperate_and_end_identical():
    kinds = ["plain", "compiled", "data-parallel", "checkpointed-compiled-dp"]
    hub = InProcessHub(kinds, timeout=10)
    models, outers = {}, {}
    for kind in kinds:
        models[kind], wrapper = _wrapped(kind)
        raw = [n for n, _ in wrapper.named_parameters()]
        assert kind == "plain" or raw != ["0.weight", "0.bias", "2.weight", "2.bias"]
        outers[kind] = SparseLoCo(wrapper.named_parameters(), hub.connect(kind), codec={"topk": 8})
    for rnd in range(2):
        for i, kind in enumerate(kinds):
            g = torch.Generator().manual_seed(10 * rnd + i)
            with torch.no_grad():
                for p in models[kind].parameters():
                    p.add_(torch.randn(p.shape, generator=g), alpha=0.05)
        threads = [threading.Thread(target=o.step) for o in outers.values()]
        [t.start() for t in threads]
        [t.join() for t in threads]
    for kind, outer in outers.items():
        report = outer.last_report
        assert report.peers == sorted(kinds), (kind, report.statuses)
        assert outer.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    flats = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models.values()]
    assert all(torch.equal(flats[0], f) for f in flats[1:])
