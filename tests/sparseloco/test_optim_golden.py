"""Golden numbers: the outer optimizers' results are pinned bit for bit.

``golden_optim.json`` holds SHA-256 digests of every parameter, every state tensor and every
published payload after each round of a few 2-peer runs, captured before the optimizer was
restructured (atomic rounds, pluggable outer optimizer). Regenerate only for an intended
numerical change: ``python tests/sparseloco/test_optim_golden.py --write``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from sparseloco import DataParallel, DiLoCo, InProcessHub, SparseLoCo
from sparseloco.serialization import dump_safetensors

FIXTURE = Path(__file__).with_name("golden_optim.json")
ROUNDS = 3

SCENARIOS = {
    "covenant-72b": lambda ps, ex: SparseLoCo(ps, ex, "covenant-72b"),
    "sparseloco-512m-nesterov": lambda ps, ex: SparseLoCo(
        ps, ex, "sparseloco-512m", momentum=0.5, nesterov=True, lr=0.7
    ),
    "covenant-72b-momentum-offload-bf16err": lambda ps, ex: SparseLoCo(
        ps, ex, "covenant-72b", momentum=0.9, offload=True, error_dtype="bfloat16"
    ),
    "covenant-72b-rice-topk8": lambda ps, ex: SparseLoCo(
        ps, ex, "covenant-72b-rice", codec={"topk": 8}
    ),
    "covenant-72b-bf16-model": lambda ps, ex: SparseLoCo(ps, ex, "covenant-72b"),
    "diloco": lambda ps, ex: DiLoCo(ps, ex),
    "diloco-bf16-wire-offload": lambda ps, ex: DiLoCo(
        ps, ex, lr=0.4, wire_dtype="bfloat16", offload=True
    ),
    "data-parallel": lambda ps, ex: DataParallel(ps, ex),
}


def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def _model(scenario: str) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(72, 130), torch.nn.Tanh(), torch.nn.Linear(130, 6))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m.to(torch.bfloat16) if "bf16-model" in scenario else m


class _Recorder:
    """An exchange that records the digest of every payload it publishes."""

    def __init__(self, inner):
        self.inner = inner
        self.published: list[str] = []

    @property
    def peer_id(self):
        return self.inner.peer_id

    def publish(self, window, payload):
        blob = dump_safetensors(*payload.to_tensors())
        self.published.append(hashlib.sha256(blob).hexdigest()[:16])
        return self.inner.publish(window, payload)

    def gather(self, window):
        return self.inner.gather(window)


def _perturb(model, outer, peer: int, rnd: int) -> None:
    g = torch.Generator().manual_seed(1000 * peer + rnd)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if isinstance(outer, DataParallel):
                p.grad = noise
            else:
                p.add_(noise, alpha=0.05)


def _snapshot(model, outer) -> dict[str, str]:
    out = {f"param/{n}": _digest(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        target = p.grad if isinstance(outer, DataParallel) else None
        if target is not None:
            out[f"grad/{n}"] = _digest(target)
        for key, value in sorted(outer.state[p].items()):
            out[f"{key}/{n}"] = _digest(value)
    return out


def run_scenario(scenario: str) -> dict[str, object]:
    hub = InProcessHub(["p0", "p1"], timeout=30)
    models = [_model(scenario) for _ in range(2)]
    exchanges = [_Recorder(hub.connect(f"p{i}")) for i in range(2)]
    outers = [
        SCENARIOS[scenario](m.named_parameters(), ex)
        for m, ex in zip(models, exchanges, strict=True)
    ]
    rounds: list[list[dict[str, str]]] = []
    for rnd in range(ROUNDS):
        for i in range(2):
            _perturb(models[i], outers[i], i, rnd)
        threads = [threading.Thread(target=o.step) for o in outers]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert all(o.window == rnd + 1 for o in outers)
        rounds.append([_snapshot(m, o) for m, o in zip(models, outers, strict=True)])
    return {"rounds": rounds, "published": [ex.published for ex in exchanges]}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_outer_optimizers_match_golden_digests(scenario):
    expected = json.loads(FIXTURE.read_text())[scenario]
    got = run_scenario(scenario)
    assert got["published"] == expected["published"]
    for rnd, (g, e) in enumerate(zip(got["rounds"], expected["rounds"], strict=True)):
        assert g == e, f"round {rnd} differs"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    FIXTURE.write_text(
        json.dumps({s: run_scenario(s) for s in sorted(SCENARIOS)}, indent=1, sort_keys=True) + "\n"
    )
