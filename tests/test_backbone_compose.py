"""Every rule and optimizer on nets made by attach_exits (issue 23, item 4): OSGD / TorchJD with the trunk as
``shared``, DGL on a split ResNet, CurvatureCorrected's coverage of a ViT, SLBI's export refusal on a ViT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anytrain.config import load_config
from anytrain.nets import build_model
from anytrain.optim import CurvatureCorrected
from anytrain.rules import backward, orthogonalize
from anytrain.train import build_components


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18-exits", in_shape=(1, 12, 12), num_classes=3, width=2)


def _per_exit_grads(net, x, y) -> torch.Tensor:
    trunk = net.trunk_parameters()
    rows = []
    for out in net(x):
        gs = torch.autograd.grad(F.cross_entropy(out, y), trunk, allow_unused=True, retain_graph=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, trunk)]))
    return torch.stack(rows)


@pytest.mark.parametrize("rule", ["osgd", "torchjd:UPGrad"])
def test_rules_with_trunk_as_shared_match_the_rule_on_per_exit_gradients(rule: str) -> None:
    net = _resnet().eval()  # eval: the per-exit reference passes see the same BatchNorm statistics
    x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 3, (6,))
    G = _per_exit_grads(net, x, y)
    if rule == "osgd":
        want = orthogonalize(G).sum(0)
    else:
        from torchjd.aggregation import UPGrad

        want = UPGrad()(G)
    trunk = net.trunk_parameters()
    backward([F.cross_entropy(o, y) for o in net(x)], rule, shared=trunk)
    got = torch.cat([p.grad.flatten() for p in trunk])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # an exit head gets its own exit's gradient only
    head = net.exits[0].head[-1].weight
    ref = torch.autograd.grad(F.cross_entropy(net(x)[0], y), head)[0]
    torch.testing.assert_close(head.grad, ref)


def test_backward_refuses_a_single_summed_loss() -> None:
    net = _resnet()
    loss = sum(F.cross_entropy(o, torch.zeros(2, dtype=torch.long)) for o in net(torch.randn(2, 1, 12, 12)))
    with pytest.raises(ValueError, match="one loss per exit") as e:
        backward(loss, "osgd", shared=net.trunk_parameters())
    assert "\n" not in str(e.value)


def test_dgl_on_split_resnet_each_stage_learns_from_its_own_exit() -> None:
    cfg = load_config(
        None,
        [
            "data.name=synthetic",
            "data.options={shape: [1, 12, 12], num_classes: 3}",
            "model.name=resnet18-exits",
            "model.width=2",
            "rule.name=dgl",
            "optimizer.name=sgd",
            "optimizer.lr=1.0",
            "optimizer.momentum=0.0",
            "optimizer.weight_decay=0.0",
            "train.progress=false",
        ],
    )
    c = build_components(cfg)
    net, rule, opt = c["net"], c["rule"], c["optimizer"]
    net.eval()  # BatchNorm in eval: the reference below sees the same statistics as the step
    x, y = torch.randn(5, 1, 12, 12), torch.randint(0, 3, (5,))
    # reference: stage k's gradient from exit k's loss on the detached state before it
    want = []
    state = x
    for k in range(net.num_exits):
        params = list(net.stages[k].parameters())
        s = net.stages[k](state)
        want.append(torch.autograd.grad(F.cross_entropy(net.exits[k](s), y), params, allow_unused=True))
        state = tuple(t.detach() for t in s)
    before = [[p.detach().clone() for p in st.parameters()] for st in net.stages]
    rule.step(net, x, y, opt, loss_fn=F.cross_entropy)
    for k, st in enumerate(net.stages):
        for p, p0, g in zip(st.parameters(), before[k], want[k]):
            torch.testing.assert_close(
                p0 - p.detach(), g if g is not None else torch.zeros_like(p), rtol=1e-4, atol=1e-6
            )


def test_curvature_covers_the_vit_projections_and_reports_layernorm() -> None:
    torch.manual_seed(0)
    net = build_model("vit-exits", in_shape=(1, 8, 8), num_classes=3, width=8, depth=2, heads=2, exits=2)
    opt = CurvatureCorrected(net, lr=0.1, alpha=0.5, damping=1e-3)
    cov = opt.coverage()
    pre = cov["preconditioned"]
    for proj in ["q", "k", "v", "o"]:
        assert f"backbone.blocks.0.attn.{proj}" in pre
    assert "backbone.blocks.1.fc1" in pre and "backbone.patch" in pre and "exits.0.head.fc" in pre
    plain = cov["plain"]
    assert "backbone.blocks.0.norm1" in plain and "LayerNorm" in plain["backbone.blocks.0.norm1"]
    # the hooks fire through the split stages: a step moves the projections differently from plain SGD
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    w0 = net.backbone.blocks[0].attn.q.weight.detach().clone()
    opt.zero_grad()
    sum(F.cross_entropy(o, y) for o in net(x)).backward()
    g = net.backbone.blocks[0].attn.q.weight.grad.clone()
    opt.step()
    delta = w0 - net.backbone.blocks[0].attn.q.weight.detach()
    assert delta.abs().sum() > 0
    cos = F.cosine_similarity(delta.flatten(), g.flatten(), dim=0)
    assert cos < 0.9999  # preconditioned, not the plain gradient direction


def test_slbi_export_of_a_vit_is_refused_in_one_line() -> None:
    from anytrain.sparsity.prune import export_pruned

    net = build_model("vit-exits", in_shape=(1, 8, 8), num_classes=3, width=8, depth=2, heads=2, exits=2).eval()
    with pytest.raises(ValueError, match="cannot export .* exactly") as e:
        export_pruned(net, torch.randn(2, 1, 8, 8))
    assert "\n" not in str(e.value)
