"""SLBI with ``named_parameters()``: real names in its metrics and in the report of what it sparsifies."""

from __future__ import annotations

import torch
from torch import nn

from anytrain.optim import SLBI


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 2))


def test_named_parameters_label_metrics_and_sparsified():
    net = _net()
    opt = SLBI(net.named_parameters(), lr=0.1, nu=10.0)
    # conv weight: group lasso over output filters; linear weight: lasso; biases and BN: plain step
    assert opt.sparsified() == {"0.weight": "group/dim0", "3.weight": "lasso"}
    net(torch.randn(5, 1, 4)).pow(2).mean().backward()
    opt.step()
    assert set(opt.epoch_metrics()) == {"support/0.weight", "support/3.weight", "support/all"}
    again = SLBI(net.named_parameters(), lr=0.1, nu=10.0)
    again.load_state_dict(opt.state_dict())
    assert again.sparsified() == opt.sparsified()


def test_named_and_plain_parameters_take_the_same_steps():
    a, b = _net(), _net()
    oa = SLBI(a.named_parameters(), lr=0.1, nu=10.0)
    ob = SLBI(b.parameters(), lr=0.1, nu=10.0)
    x = torch.randn(5, 1, 4)
    for _ in range(3):
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert list(ob.sparsified()) == ["group0.param0", "group0.param4"]  # unnamed: positions
