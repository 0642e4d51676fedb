"""SDN weighting: the weights over the schedule against SDN's formula, and the gradient it gives."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

from anytrain.nets import StagedNet
from anytrain.rules import SDN, backward, build_rule


def test_weights_over_the_schedule_follow_the_released_formula():
    # SDN's sdn_train: in epoch e = 1..E, tau_i = min(C_i, 0.01 + e·C_i/E); the final output keeps weight 1.
    E, caps = 5, [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]
    rule = build_rule("sdn", cap=caps)
    assert rule.weights(7) == [0.01] * 6 + [1.0]  # before the first epoch
    seen = []
    for epoch in range(E):
        rule.on_epoch_start(epoch, E)
        w = rule.weights(7)
        e = epoch + 1
        assert w[-1] == 1.0
        assert w[:-1] == pytest.approx([min(c, 0.01 + e * c / E) for c in caps], abs=1e-12)
        seen.append(w[:-1])
    assert seen[-1] == pytest.approx(caps)  # the cap is reached in the last epoch
    steps = torch.tensor(seen).diff(dim=0)
    # linear ramp: a constant increment C_i/E per epoch until the cap
    torch.testing.assert_close(steps[:-1], torch.tensor(caps).expand(E - 2, 6) / E)


def test_default_caps_grow_with_relative_depth_and_a_number_caps_every_exit():
    rule = SDN()
    assert rule.caps(4) == [0.25, 0.5, 0.75]
    rule.on_epoch_start(9, 10)
    assert rule.weights(4) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    flat = SDN(cap=0.4)
    flat.on_epoch_start(0, 2)
    assert flat.weights(3) == pytest.approx([0.21, 0.21, 1.0])
    assert SDN(cap=0.005).weights(2) == [0.005, 1.0]  # the start value never exceeds the cap


def test_gradient_is_the_weighted_sum_and_matches_functional_call():
    trunk, heads = nn.Linear(4, 4), [nn.Linear(4, 2) for _ in range(3)]
    x = torch.randn(8, 4)
    rule = SDN(cap=[0.2, 0.6])
    rule.on_epoch_start(1, 4)  # e = 2: weights 0.01 + 2·C/4
    w = [0.11, 0.31, 1.0]

    def losses():
        h = trunk(x).relu()
        return [head(h).square().mean() for head in heads]

    backward(losses(), rule, shared=trunk.parameters())
    got = [p.grad.clone() for p in trunk.parameters()]
    for p in trunk.parameters():
        p.grad = None
    sum(wk * l for wk, l in zip(w, losses())).backward()
    for a, p in zip(got, trunk.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_resume_state_and_bad_caps():
    a = SDN()
    a.on_epoch_start(2, 6)
    b = SDN()
    b.load_state_dict(a.state_dict())
    assert b.weights(3) == a.weights(3)
    net = StagedNet([nn.Linear(2, 2)] * 3, [nn.Linear(2, 2)] * 3)
    with pytest.raises(ValueError, match="caps given for 2 internal exits"):
        SDN(cap=[0.1, 0.2, 0.3]).bind(net)
    for bad in (-0.1, float("inf"), "high", [0.1, None]):
        with pytest.raises(ValueError, match="cap"):
            SDN(cap=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        SDN().on_epoch_start(3, 3)


def test_docstring_example_runs():
    from anytrain.rules import _sdn as mod

    res = doctest.testmod(mod, extraglobs={"torch": torch})
    assert res.attempted > 0 and res.failed == 0


def test_total_follows_the_schedule_from_epoch_to_epoch():
    rule = SDN(cap=0.6)
    losses = torch.tensor([1.0, 2.0, 3.0])
    for epoch in range(3):
        rule.on_epoch_start(epoch, 3)
        tau = min(0.6, 0.01 + (epoch + 1) * 0.6 / 3)
        for _ in range(2):  # the weights are cached within the epoch
            assert rule.total(losses, None).item() == pytest.approx(tau * 1.0 + tau * 2.0 + 3.0)
