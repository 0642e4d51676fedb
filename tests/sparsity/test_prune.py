"""Pruning/export with Torch-Pruning: the exported model is physically smaller and equals W*."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anytrain.nets import build_model
from anytrain.optim import build_optimizer
from anytrain.sparsity import (
    count_macs,
    count_params,
    export_pruned,
    magnitude_plan,
    make_ticket,
    plot_path,
    random_plan,
    support_path,
    zero_channel_plan,
)

NETS = [
    ("vgg11-exits", dict(width_mult=0.125, exits_after=[1, 3]), (3, 16, 16)),
    ("preresnet20-exits", dict(width_mult=0.5), (3, 16, 16)),
    ("cnn1d-exits", dict(width=8), (1, 40)),
    ("cnn2d-exits", dict(width=8, head="conv1x1"), (1, 8, 8)),
    ("cnn2d-exits", dict(width=8, head="mlp-sr", last_head="cnn"), (1, 8, 8)),
    ("nested-width", dict(), (1, 40)),
    ("nested-depth", dict(), (1, 40)),
]


def _randomise_norms_and_zero_filters(net: nn.Module, frac: float = 0.5) -> None:
    """Non-trivial BN statistics (so zero filters leave non-zero constants) and random zero filters."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.modules.conv._ConvNd):
                m.weight[torch.rand(m.out_channels) < frac] = 0


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


@pytest.mark.parametrize("name,kw,shape", NETS)
def test_export_removes_zero_filters_and_keeps_outputs(name: str, kw: dict, shape: tuple) -> None:
    net = build_model(name, in_shape=shape, num_classes=5, **kw)
    _randomise_norms_and_zero_filters(net)
    net.eval()
    x = torch.randn(3, *shape)
    small, plan = export_pruned(net, x[:1])
    assert plan.removed > 0
    assert count_params(small) < count_params(net)
    assert count_macs(small, x) < count_macs(net, x)
    with torch.no_grad():
        assert _max_diff(net(x), small(x)) < 1e-4
    # the exported model has no zero filter left among the removed groups: removal is physical
    assert sum(m.out_channels for m in small.modules() if isinstance(m, nn.modules.conv._ConvNd)) < sum(
        m.out_channels for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)
    )


def test_residual_channel_is_removed_only_when_every_coupled_filter_is_zero() -> None:
    net = build_model("preresnet20-exits", in_shape=(3, 8, 8), num_classes=3, width_mult=0.5)
    stream = [m for n, m in net.named_modules() if n == "stages.0.0" or n.endswith("conv2")][:4]  # group 0 writers
    with torch.no_grad():
        for m in stream:
            m.weight[2] = 0  # channel 2 written by nobody in group 0 -> removable
        stream[0].weight[5] = 0  # channel 5 zero in the stem only -> kept
    plan = zero_channel_plan(net.eval(), torch.randn(1, 3, 8, 8))
    removed = dict(plan.groups)
    assert any(2 in ix and 5 not in ix for ix in removed.values())


def test_export_of_slbi_w_star_equals_w_star() -> None:
    torch.manual_seed(0)
    net = build_model("cnn1d-exits", num_classes=4, width=8, exits=2)
    opt = build_optimizer("slbi", net, lr=0.1, kappa=1.0, mu=1.0)
    x = torch.randn(64, 1, 40)
    y = (x[:, 0, :20].sum(1) > 0).long() + 2 * (x[:, 0, 20:].sum(1) > 0).long()
    for _ in range(40):
        opt.zero_grad()
        sum(nn.functional.cross_entropy(z, y) for z in net(x)).backward()
        opt.step()
    frac = opt.epoch_metrics()["support/all"]
    assert 0.0 < frac < 1.0
    star = opt.projected_model(net).eval()
    small, plan = export_pruned(star, x[:1])
    assert plan.removed > 0
    with torch.no_grad():
        assert _max_diff(star(x), small(x)) < 1e-4
    with opt.projected(), torch.no_grad():  # the context manager gives the same W*
        assert _max_diff(net.eval()(x), star(x)) == 0.0


def test_ticket_baselines_have_equal_sparsity_and_rewind_keeps_initial_weights() -> None:
    init = build_model("cnn2d-exits", in_shape=(1, 8, 8), num_classes=3, width=8, exits=2)
    trained = build_model("cnn2d-exits", in_shape=(1, 8, 8), num_classes=3, width=8, exits=2)
    trained.load_state_dict(init.state_dict())
    _randomise_norms_and_zero_filters(trained, 0.4)
    first = "stages.0.0.0.0"  # the first conv: its input (the image) is never pruned
    with torch.no_grad():
        trained.get_submodule(first).weight[1] = 0
    x = torch.randn(1, 1, 8, 8)
    plan = zero_channel_plan(trained.eval(), x)
    mag = magnitude_plan(trained, plan, x)
    rnd = random_plan(plan, seed=1)
    for other in (mag, rnd):
        assert [(n, len(i)) for n, i in other.groups] == [(n, len(i)) for n, i in plan.groups]
    # magnitude picks the smallest filters: on this net the zero filters themselves
    assert [sorted(i) for _, i in mag.groups] == [sorted(i) for _, i in plan.groups]
    ticket = make_ticket(init, plan, x, rewind=True)
    name, idxs = next((n, i) for n, i in plan.groups if n == first)
    kept = [c for c in range(plan.channels[name]) if c not in idxs]
    w0 = init.get_submodule(name).weight
    assert torch.equal(ticket.get_submodule(name).weight, w0[kept])
    fresh = make_ticket(init, plan, x, rewind=False)
    assert count_params(fresh) == count_params(ticket)
    assert not torch.equal(fresh.get_submodule(name).weight, ticket.get_submodule(name).weight)


def test_support_path_and_plot(tmp_path) -> None:
    hist = [{"epoch": e, "opt/support/a": 0.1 * e, "opt/support/all": 0.05 * e, "rule/x": 1.0} for e in range(4)]
    path = support_path(hist)
    assert path == {"a": [0.0, 0.1, 0.2, 0.30000000000000004], "all": [0.0, 0.05, 0.1, 0.15000000000000002]}
    f = plot_path(path, tmp_path / "path.png", accuracy=[0.1, 0.2, 0.3, 0.4])
    assert f.stat().st_size > 0


def test_channel_ignored_by_every_consumer_is_removed_exactly() -> None:
    """group_by="in": a zero input-channel group of the only consumer makes the producer's filter removable."""
    net = build_model("cnn1d-exits", num_classes=3, width=8, exits=1)
    _randomise_norms_and_zero_filters(net, frac=0.0)
    first, second = [m for m in net.stages.modules() if isinstance(m, nn.Conv1d)][:2]
    with torch.no_grad():
        second.weight[:, 3] = 0  # channel 3 of the first conv is read by nobody
    net.eval()
    x = torch.randn(4, 1, 40)
    small, plan = export_pruned(net, x[:1])
    assert plan.removed == 1
    assert [m for m in small.stages.modules() if isinstance(m, nn.Conv1d)][0].out_channels == first.out_channels - 1
    with torch.no_grad():
        assert _max_diff(net(x), small(x)) < 1e-5


def _token_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(8 * 5, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        net[2].weight[[1, 4]] = 0  # two neurons whose output is the constant relu(bias): removed, compensated
        net[2].bias.uniform_(0.5, 1.0)
    return net.eval()


@pytest.mark.parametrize("given_probe", [False, True])
def test_export_takes_integer_token_inputs(given_probe: bool) -> None:
    net = _token_net()
    x = torch.randint(0, 20, (6, 5))
    probe = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(1)) if given_probe else None
    small, plan = export_pruned(net, x[:1], probe_inputs=probe)
    assert plan.removed == 2 and small[2].out_features == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_layer_norm_up_front_naming_it() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        net[0].weight[2] = 0
    with pytest.raises(ValueError) as e:
        export_pruned(net, torch.randn(1, 4))
    msg = str(e.value)
    assert "'1'" in msg and "LayerNorm" in msg and "\n" not in msg
