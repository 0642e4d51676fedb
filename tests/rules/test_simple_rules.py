"""joint / weighted / adaloss gradients against hand computations on a tiny two-exit net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anytrain.nets import StagedNet
from anytrain.rules import build_rule


def two_exit_net() -> StagedNet:
    torch.manual_seed(1)
    return StagedNet([nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Linear(4, 4))], [nn.Linear(4, 2), nn.Linear(4, 2)])


def losses_of(net, x, y):
    return [nn.functional.cross_entropy(z, y) for z in net(x)]


def reference_grads(net, x, y, weights):
    """Gradient of Σ w_k L_k by autograd over an explicitly written forward pass (independent of the rule)."""
    params = list(net.parameters())
    W1, b1 = net.stages[0].weight, net.stages[0].bias
    W2, b2 = net.stages[1][1].weight, net.stages[1][1].bias
    h1 = x @ W1.T + b1
    h2 = torch.tanh(h1) @ W2.T + b2
    z0 = h1 @ net.exits[0].weight.T + net.exits[0].bias
    z1 = h2 @ net.exits[1].weight.T + net.exits[1].bias
    lse = lambda z: torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0]  # noqa: E731
    total = weights[0] * lse(z0).mean() + weights[1] * lse(z1).mean()
    return torch.autograd.grad(total, params)


@pytest.mark.parametrize(
    "rule,kw,weights",
    [
        ("joint", {}, (1.0, 1.0)),
        ("weighted", {"weights": [0.3, 2.0]}, (0.3, 2.0)),
        ("joint", {"last_only": True}, (0.0, 1.0)),
    ],
)
def test_fixed_weight_rules_match_reference(rule, kw, weights):
    net = two_exit_net()
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    r = build_rule(rule, **kw)
    r.bind(net)
    r.backward(net, losses_of(net, x, y))
    ref = reference_grads(net, x, y, weights)
    for p, g in zip(net.parameters(), ref):
        pg = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(pg, g)


def test_adaloss_weights_are_inverse_running_average():
    net = two_exit_net()
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    r = build_rule("adaloss", beta=0.5)
    ls = losses_of(net, x, y)
    l = torch.stack(ls).detach()
    r.backward(net, ls)
    # after one step the bias-corrected average equals the loss itself
    w = (1 / l) * (2 / (1 / l).sum())
    torch.testing.assert_close(r.weights(), w)
    ref = reference_grads(net, x, y, w.tolist())
    for p, g in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad, g)
    # second step: Ē = (0.5·0.5 L1 + 0.5 L2) / (1 - 0.25)
    net.zero_grad()
    ls2 = [2 * v for v in losses_of(net, x, y)]
    r.backward(net, ls2)
    avg = (0.25 * l + 0.5 * torch.stack(ls2).detach()) / 0.75
    inv = 1 / avg
    torch.testing.assert_close(r.weights(), inv * 2 / inv.sum())
    st = r.state_dict()
    r2 = build_rule("adaloss", beta=0.5)
    r2.load_state_dict(st)
    torch.testing.assert_close(r2.weights(), r.weights())


def test_weighted_rule_rejects_wrong_count():
    with pytest.raises(ValueError, match="2 weights but the network has 3"):
        build_rule("weighted", weights=[1, 1]).bind(StagedNet([nn.Identity()] * 3, [nn.Identity()] * 3))


def test_weighted_rule_builds_its_weight_tensor_once(monkeypatch):
    """No host-to-device copy per step: the weights become a tensor on the first step only (and again only
    when the losses move to another device or dtype)."""
    net = two_exit_net()
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    r = build_rule("weighted", weights=[0.3, 2.0])
    r.bind(net)
    made = []
    real = torch.tensor

    def counting(*a, **k):
        made.append(a)
        return real(*a, **k)

    monkeypatch.setattr(torch, "tensor", counting)
    for _ in range(3):
        net.zero_grad()
        r.backward(net, losses_of(net, x, y))
    assert len(made) == 1
    ref = reference_grads(net, x, y, (0.3, 2.0))
    for p, g in zip(net.parameters(), ref):
        torch.testing.assert_close(p.grad, g)
    w64 = r.weight_tensor(torch.zeros((), dtype=torch.float64))  # another dtype: built again, then kept
    assert w64.dtype == torch.float64 and w64.tolist() == [0.3, 2.0] and len(made) == 2
    assert r.weight_tensor(torch.ones(2, dtype=torch.float64)) is w64 and len(made) == 2


@pytest.mark.parametrize(
    "rule,kw,trained",
    [
        ("joint", {}, [0, 1, 2]),
        ("joint", {"last_only": True}, [2]),  # backprop: only the last exit is trained
        ("weighted", {"weights": [0.0, 2.0, 1.0]}, [1, 2]),
        ("adaloss", {}, [0, 1, 2]),
        ("osgd", {}, [0, 1, 2]),
    ],
)
def test_trained_exits_are_those_with_a_loss_in_the_update(rule, kw, trained):
    assert build_rule(rule, **kw).trained_exits(3) == trained
