"""Gradient Equilibrium against two independent references: the literal forward with rescaled gradients (IMTA's
definition, rebuilt here with tensor hooks on a copy of the net) and the closed form
``∇θ_i = 1/(n−i) Σ_{j≥i} ∇θ_i L_j`` (stages), ``∇φ_i = ∇φ_i L_i`` (heads) from per-loss autograd."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from anytrain.nets import StagedNet, build_model
from anytrain.rules import GradientEquilibrium, backward


def linear_net(n: int = 3, d: int = 4) -> StagedNet:
    return StagedNet([nn.Linear(d, d) for _ in range(n)], [nn.Linear(d, 2) for _ in range(n)])


def rescaled(state, c: float):
    """Every tensor of a (pytree) state cloned, with a hook multiplying its gradient by ``c``."""

    def one(t: Tensor) -> Tensor:
        if not t.requires_grad:  # the input image, passed along in a nested net's state
            return t
        out = t.clone()
        out.register_hook(lambda g: g * c)
        return out

    return tree_map(one, state)


def literal_ge_grads(net: StagedNet, x: Tensor, loss_fn, last_only: bool = False) -> list[Tensor]:
    """IMTA's forward: s ← rescale(s, 1/(n−i)); logits_i = head_i(s); s ← rescale(s, n−i−1); backprop Σ L."""
    net = copy.deepcopy(net)
    n, s, losses = net.num_exits, x, []
    for i in range(n):
        s = net.stages[i](s)
        if last_only:
            s = [*s[:-1], rescaled(s[-1], 1.0 / (n - i))]
        else:
            s = rescaled(s, 1.0 / (n - i))
        losses.append(loss_fn(i, net.exits[i](s)))
        s = [*s[:-1], rescaled(s[-1], n - i - 1.0)] if last_only else rescaled(s, n - i - 1.0)
    torch.stack(losses).sum().backward()
    return [p.grad.clone() for p in net.parameters()]


def closed_form_grads(net: StagedNet, x: Tensor, loss_fn) -> list[Tensor]:
    """Per-loss autograd of a plain forward, combined by the formula."""
    net = copy.deepcopy(net)
    n = net.num_exits
    losses = [loss_fn(i, z) for i, z in enumerate(net(x))]
    out = {}
    for i in range(n):
        stage = list(net.stages[i].parameters())
        acc = [torch.zeros_like(p) for p in stage]
        for j in range(i, n):
            for a, g in zip(
                acc, torch.autograd.grad(losses[j], stage, retain_graph=True, allow_unused=True, materialize_grads=True)
            ):
                a += g / (n - i)
        out.update({id(p): a for p, a in zip(stage, acc)})
        head = list(net.exits[i].parameters())
        out.update({id(p): g for p, g in zip(head, torch.autograd.grad(losses[i], head, retain_graph=True))})
    return [out[id(p)] for p in net.parameters()]


def rule_grads(net: StagedNet, x: Tensor, loss_fn, **kw) -> list[Tensor]:
    rule = GradientEquilibrium(**kw)
    logits = rule.forward(net, x)
    rule.backward(net, [loss_fn(i, z) for i, z in enumerate(logits)])
    return [p.grad.clone() for p in net.parameters()]


def mse_to(targets: list[Tensor]):
    return lambda i, z: (z - targets[i]).square().mean()


def assert_all_close(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        tol = 1e-12 if u.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(u, v, rtol=10 * tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_three_exit_linear_model_matches_literal_forward_and_closed_form(dtype):
    net = linear_net().to(dtype)
    x = torch.randn(16, 4, dtype=dtype)
    loss = mse_to([torch.randn(16, 2, dtype=dtype) for _ in range(3)])
    ours = rule_grads(net, x, loss)
    assert_all_close(ours, literal_ge_grads(net, x, loss))
    assert_all_close(ours, closed_form_grads(net, x, loss))
    # and it is not joint: stage 0 gets a third of the summed gradient of the three losses
    joint = copy.deepcopy(net)
    sum(loss(i, z) for i, z in enumerate(joint(x))).backward()
    torch.testing.assert_close(ours[0], joint.stages[0].weight.grad / 3)
    torch.testing.assert_close(ours[-1], joint.exits[2].bias.grad)  # last head: its own loss, unscaled


def test_nested_net_whose_later_stages_reuse_earlier_activations():
    net = build_model("nested-width", in_shape=(1, 12), num_classes=3, stages=3, width=2, layers=2)
    x, y = torch.randn(8, 1, 12), torch.randint(0, 3, (8,))
    loss = lambda i, z: nn.functional.cross_entropy(z, y)  # noqa: E731
    ours = rule_grads(net, x, loss)
    assert_all_close(ours, closed_form_grads(net, x, loss))
    assert_all_close(ours, literal_ge_grads(net, x, loss))


def test_last_only_is_imtas_msdnet_rescaling_of_the_coarsest_map():
    net = build_model(
        "msdnet", in_shape=(1, 8, 8), num_classes=3, blocks=3, base=1, step=1, scales=2, channels=2, growth=2,
        head_channels=4,
    )  # fmt: skip
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    loss = lambda i, z: nn.functional.cross_entropy(z, y)  # noqa: E731
    ours = rule_grads(net, x, loss, last_only=True)
    assert_all_close(ours, literal_ge_grads(net, x, loss, last_only=True))
    net.zero_grad()
    whole = rule_grads(net, x, loss)
    assert_all_close(whole, closed_form_grads(net, x, loss))
    # the finer maps reach later exits unscaled under last_only, so the two differ on the early stages
    assert not all(torch.allclose(a, b) for a, b in zip(ours, whole))


def test_forward_values_unchanged_and_gradients_linear_in_the_batch():
    net = linear_net()
    x = torch.randn(8, 4)
    rule = GradientEquilibrium()
    for a, b in zip(rule.forward(net, x), net(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    rule._forwarded = False
    # data parallelism: the gradient on the whole batch is the mean of the gradients on its two halves
    t = [torch.randn(8, 2) for _ in range(3)]
    whole = rule_grads(copy.deepcopy(net), x, mse_to(t))
    halves = [rule_grads(copy.deepcopy(net), x[h], mse_to([u[h] for u in t])) for h in (slice(0, 4), slice(4, 8))]
    assert_all_close(whole, [(a + b) / 2 for a, b in zip(*halves)])


def test_one_exit_is_plain_backprop():
    net = linear_net(n=1)
    x, t = torch.randn(8, 4), [torch.randn(8, 2)]
    ref = copy.deepcopy(net)
    mse_to(t)(0, ref(x)[0]).backward()
    assert_all_close(rule_grads(net, x, mse_to(t)), [p.grad for p in ref.parameters()])


def test_refusals_name_the_api_that_works():
    net = linear_net()
    x = torch.randn(4, 4)
    losses = [z.square().mean() for z in net(x)]
    with pytest.raises(ValueError, match=r"rule\.forward\(net, x\)"):
        backward(losses, "gradient-equilibrium", shared=net.trunk_parameters())
    with pytest.raises(ValueError, match="must come from rule.forward"):
        GradientEquilibrium().backward(net, losses)
    with pytest.raises(ValueError, match="StagedNet"):
        GradientEquilibrium().bind(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="last_only"):
        GradientEquilibrium(last_only="yes")  # type: ignore[arg-type]


def test_docstring_example_runs():
    from anytrain.rules import _equilibrium as mod

    res = doctest.testmod(mod, extraglobs={"torch": torch, "nn": nn})
    assert res.attempted > 0 and res.failed == 0
