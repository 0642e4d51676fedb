"""TorchJD aggregators as gradient rules over exits."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torchjd.aggregation as agg
from osgd_helpers import brute_force_grads, flat_grad, tiny_net
from torch import nn

from anytrain.registry import ConfigError
from anytrain.rules import TorchJDRule, aggregator_names, build_rule

F = nn.functional
HAS_QP = importlib.util.find_spec("quadprog") is not None
HAS_CVX = importlib.util.find_spec("cvxpy") is not None


def _setup(K=3, seed=0):
    torch.manual_seed(seed)
    net = tiny_net(K=K).double()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    return net, x, y


def _run(rule, net, x, y):
    rule.bind(net)
    return rule.backward(net, [F.cross_entropy(z, y) for z in rule.forward(net, x)])


@pytest.mark.parametrize(
    "name,factory",
    [
        ("PCGrad", None),
        ("MGDA", agg.MGDA),
        ("Mean", agg.Mean),
        ("IMTLG", agg.IMTLG),
        pytest.param("UPGrad", agg.UPGrad, marks=pytest.mark.skipif(not HAS_QP, reason="quadprog missing")),
        pytest.param("DualProj", agg.DualProj, marks=pytest.mark.skipif(not HAS_QP, reason="quadprog missing")),
    ],
)
def test_rule_equals_aggregator_on_reference_jacobian(name, factory):
    net, x, y = _setup()
    trunk, J, heads = brute_force_grads(net, x, y)
    rule = build_rule(f"torchjd:{name}")
    if factory is None:  # PCGrad draws random permutations: compare under the same seed
        torch.manual_seed(7)
        expect = agg.PCGrad()(J)
        torch.manual_seed(7)
    else:
        expect = factory()(J)
    _run(rule, net, x, y)
    torch.testing.assert_close(flat_grad(trunk), expect)
    for k in range(3):
        for p, g in zip(net.exit_parameters(k), heads[k]):
            torch.testing.assert_close(p.grad, g)


def test_sum_aggregator_equals_joint():
    net, x, y = _setup()
    _run(build_rule("torchjd:sum"), net, x, y)
    ours = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    _run(build_rule("joint"), net, x, y)
    for a, p in zip(ours, net.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_pcgrad_two_exits_by_hand():
    # conflicting gradients: PCGrad projects each onto the other's normal plane, then sums
    theta = nn.Linear(1, 2, bias=False)
    from anytrain.nets import StagedNet

    net = StagedNet([theta, nn.Identity()], [nn.Identity(), nn.Identity()])
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    h = net(torch.ones(1, 1))
    build_rule("torchjd:PCGrad").backward(net, [(h[0] @ a).sum(), (h[1] @ b).sum()])
    pa = a - (a @ b) / (b @ b) * b  # (0.5, 0.5)
    pb = b - (a @ b) / (a @ a) * a  # (0, 1)
    torch.testing.assert_close(theta.weight.grad.reshape(-1), pa + pb)


@pytest.mark.skipif(not HAS_CVX, reason="cvxpy missing")
def test_cagrad_c_and_nashmtl_n_tasks():
    rule = build_rule("torchjd:CAGrad", c=0.3)
    assert rule.aggregator.gramian_weighting.c == 0.3
    assert build_rule("torchjd:CAGrad").aggregator.gramian_weighting.c == 0.5
    net, x, y = _setup()
    _run(rule, net, x, y)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    nash = build_rule("torchjd:NashMTL")
    nash.bind(net)
    assert nash.aggregator.n_tasks == 3


def test_batched_grad_method_matches_loop():
    net, x, y = _setup()
    _run(build_rule("torchjd:MGDA", grad_method="batched"), net, x, y)
    a = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    _run(build_rule("torchjd:MGDA"), net, x, y)
    for g, p in zip(a, net.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_errors_and_listing():
    with pytest.raises(ConfigError, match="unknown TorchJD aggregator 'Nope'"):
        build_rule("torchjd:Nope")
    with pytest.raises(ConfigError, match="Krum"):
        build_rule("torchjd:Krum")  # missing required n_byzantine: a one-line config error
    names = aggregator_names()
    assert {"UPGrad", "PCGrad", "MGDA", "CAGrad", "NashMTL"} <= set(names)
    assert isinstance(build_rule("torchjd:upgrad", grad_method="loop"), TorchJDRule)
    with pytest.raises(ValueError, match="grad_method"):
        build_rule("torchjd:MGDA", grad_method="x")


def test_state_dict_round_trip():
    rule = build_rule("torchjd:MGDA")
    rule2 = build_rule("torchjd:MGDA")
    rule2.load_state_dict(rule.state_dict())
    assert repr(rule) == repr(rule2)
