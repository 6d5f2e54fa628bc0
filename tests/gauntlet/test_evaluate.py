"""Evaluation: the update step, clip factors, gains, and the exact restore of the model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gauntlet import (
    EvalConfig,
    Evaluator,
    reference_factors,
    relative_gain,
    update_norms,
    window_reference,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.lin(x)))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def make() -> tuple[Net, list, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    batches = [(torch.randn(8, 4), torch.randn(8, 3)) for _ in range(2)]
    net.train()
    mse(net, batches[0]).backward()
    opt.step()  # optimizer state and .grad exist and must survive evaluation
    return net, batches, opt


def test_model_optimizer_and_rng_restored_bit_for_bit():
    net, batches, opt = make()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt_state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state.items()}
    update = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    rng = torch.get_rng_state()
    ev = Evaluator(net, mse, EvalConfig(eval_mode=False), optimizer=opt)
    norms = update_norms({"a": update})
    factors = reference_factors(norms, window_reference(norms, ["a"]))
    base = ev.baseline(batches, {"a": batches[:1]})
    res = ev.evaluate("a", update, factors["a"], base, batches, batches[:1])
    assert res.loss_random_after != res.loss_random_before
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in net.named_parameters():
        assert torch.equal(p.grad, grads[n])
    for k, v in opt.state.items():
        for kk, vv in v.items():
            assert torch.equal(vv, opt_state[k][kk])
    assert torch.equal(torch.get_rng_state(), rng)


def test_step_is_clipped_scaled_and_matches_manual():
    net, batches, _ = make()
    cfg = EvalConfig(outer_lr=0.5, step_scale=0.2)
    ev = Evaluator(net, mse, cfg)
    small = {n: 0.01 * torch.ones_like(p) for n, p in net.named_parameters()}
    big = {n: 100.0 * torch.ones_like(p) for n, p in net.named_parameters()}
    mid = {n: 0.02 * torch.ones_like(p) for n, p in net.named_parameters()}
    norms = update_norms({"big": big, "mid": mid, "small": small})
    factors = reference_factors(norms, window_reference(norms, ["big", "mid"]))
    # every update is applied at the smallest norm of the reference set (mid's)
    assert factors["mid"]["lin.weight"] == 1.0
    assert factors["small"]["lin.weight"] == pytest.approx(2.0)
    assert factors["big"]["lin.weight"] == pytest.approx(0.02 / 100.0)
    base = ev.baseline(batches, {"big": batches})
    res = ev.evaluate("big", big, factors["big"], base, batches, batches)
    manual = Net()
    manual.load_state_dict(net.state_dict())
    with torch.no_grad():
        for n, p in manual.named_parameters():
            p.sub_(big[n], alpha=cfg.step * factors["big"][n])
    manual.eval()
    expect = sum(float(mse(manual, b).detach()) for b in batches) / len(batches)
    assert res.loss_random_after == pytest.approx(expect, rel=1e-6)
    assert res.gain_random == pytest.approx((base.random - expect) / base.random, rel=1e-6)


def test_zero_update_has_zero_gain_and_negative_indicator():
    net, batches, _ = make()
    ev = Evaluator(net, mse)
    zero = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    base = ev.baseline(batches, {"z": batches[:1]})
    res = ev.evaluate("z", zero, {}, base, batches, batches[:1])
    assert res.gain_random == 0.0 and res.gain_assigned == 0.0 and res.indicator == -1


def test_huge_update_yields_nonfinite_flag():
    net, batches, _ = make()
    ev = Evaluator(net, mse)
    huge = {n: torch.full_like(p, 3e38) for n, p in net.named_parameters()}
    base = ev.baseline(batches, {"h": batches})
    res = ev.evaluate("h", huge, {}, base, batches, batches)
    assert not res.finite and res.indicator == -1


def test_relative_gain():
    assert relative_gain(2.0, 1.0) == 0.5
    assert relative_gain(0.0, -1.0, floor=0.5) == 2.0
    assert math.isnan(relative_gain(1.0, math.inf))
