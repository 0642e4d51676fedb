"""StagedNet contract and FLOPs counting against hand-computed multiply-adds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anytrain.nets import StagedNet, build_model, macs_of


def tiny_net() -> StagedNet:
    return StagedNet(
        [
            nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv1d(4, 6, 3, stride=2, padding=1)),
        ],
        [nn.Sequential(nn.Flatten(), nn.Linear(4 * 10, 3)), nn.Sequential(nn.Flatten(), nn.Linear(6 * 5, 3))],
    )


def test_forward_returns_one_logit_per_exit_and_upto_runs_a_prefix():
    net = tiny_net()
    x = torch.randn(5, 1, 10)
    out = net(x)
    assert len(out) == net.num_exits == 2
    assert all(o.shape == (5, 3) for o in out)
    first = net(x, upto=0)
    assert len(first) == 1 and torch.equal(first[0], out[0])
    assert torch.equal(net.forward_exit(x, 1), out[1])
    with pytest.raises(ValueError, match="out of range"):
        net(x, upto=2)


def test_continue_from_reuses_state_and_matches_full_forward():
    net = tiny_net()
    x = torch.randn(2, 1, 10)
    s0 = net.states(x, upto=0)[-1]
    assert torch.equal(net.continue_from(s0, 1)[0], net(x)[1])


def test_flops_match_hand_count():
    net = tiny_net()
    # conv1: 4 out ch × 10 positions × (1 in ch × 3) = 120 MACs; head0: 40×3 = 120
    # conv2: 6 × 5 positions × (4 × 3) = 360; head1: 30×3 = 90
    stage, head = net.flops_breakdown((1, 10))
    assert stage == [120, 360] and head == [120, 90]
    assert net.flops_per_exit((1, 10)) == [240, 120 + 360 + 90]


def test_macs_of_linear_and_conv2d_brute_force():
    lin = nn.Linear(7, 5)
    assert macs_of(lin, torch.zeros(1, 7)) == 35
    conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
    # brute force: count multiply-adds by looping over every output element's receptive field
    x = torch.zeros(1, 3, 9, 9)
    out = conv(x)
    brute = 0
    for _ in range(out.shape[1]):
        for _ in range(out.shape[2] * out.shape[3]):
            brute += 3 * 3 * 3
    assert macs_of(conv, x) == brute


@pytest.mark.parametrize(
    "name,shape,kw",
    [
        ("cnn1d-exits", (1, 40), {"exits": 4}),
        ("cnn2d-exits", (1, 8, 8), {"exits": 3}),
        ("vgg11-exits", (3, 32, 32), {"width_mult": 0.125}),
        ("preresnet20-exits", (3, 32, 32), {"width_mult": 0.5}),
        ("preresnet18-exits", (3, 32, 32), {"width_mult": 0.125, "exits_after": [2, 4, 6, 8]}),
    ],
)
def test_branched_builders(name, shape, kw):
    net = build_model(name, in_shape=shape, num_classes=7, **kw)
    x = torch.randn(2, *shape)
    out = net(x)
    assert len(out) == net.num_exits >= 3
    assert all(o.shape == (2, 7) for o in out)
    f = net.flops_per_exit(shape)
    stage, _ = net.flops_breakdown(shape)
    assert all(s > 0 for s in stage)
    # cumulative trunk cost is increasing; exit k's cost never includes later stages
    assert all(sum(stage[: k + 1]) <= f[k] for k in range(len(f)))
    # exit k does not depend on later stages: perturbing stage k+1 leaves exits ≤ k unchanged
    net.eval()
    before = [o.detach().clone() for o in net(x)]
    with torch.no_grad():
        for p in net.stages[-1].parameters():
            p.add_(1.0)
    after = net(x)
    for k in range(net.num_exits - 1):
        assert torch.equal(before[k], after[k])


def test_unknown_model_lists_known_names():
    from anytrain.registry import ConfigError

    with pytest.raises(ConfigError, match="known: .*cnn1d-exits"):
        build_model("resnet-does-not-exist")


def test_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="needs inputs of shape"):
        build_model("cnn2d-exits", in_shape=(1, 40), num_classes=10)
