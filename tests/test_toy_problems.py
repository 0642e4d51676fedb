"""Optax-style table: every registered rule × every registered optimizer on toy problems of known optimum.

* least squares (one exit): the effective linear map of a two-layer linear net reaches ``lstsq``'s solution;
* a separable quadratic ``Σ a_i (θ_i − c_i)²`` (one exit): θ reaches ``c``;
* a realizable two-exit linear model: both exit losses reach their optimum, zero.

And one step of OSGD + SGD on a two-exit linear model equals the Gram–Schmidt direction computed here by hand in
float64. The tables list one row per registered name and a test checks that they cover the registries, so a new
rule or optimizer must be added here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from anytrain.greedy import GreedyProcedure
from anytrain.nets import StagedNet
from anytrain.optim import OPTIMIZERS, build_optimizer
from anytrain.rules import RULES, build_rule
from anytrain.train.trainer import optimizer_for

RULE_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "joint": ("joint", {}),
    "weighted": ("weighted", {}),  # weights filled in per problem: one per exit
    "adaloss": ("adaloss", {}),
    "sdn": ("sdn", {}),
    "gradient-equilibrium": ("gradient-equilibrium", {}),
    "osgd": ("osgd", {}),
    "dgl": ("dgl", {}),
    "sgl": ("sgl", {}),
    "torchjd:": ("torchjd:MGDA", {}),
}
OPT_ROWS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.05, "momentum": 0.5},
    "adam": {"lr": 0.03},
    "adamw": {"lr": 0.03, "weight_decay": 0.0},
    "slbi": {"lr": 0.05, "kappa": 1.0, "nu": 1e4},  # large ν: W barely pulled towards the sparse Γ
    "curvature": {"lr": 0.05, "alpha": 0.5, "damping": 0.1},
}


def test_tables_cover_the_registries() -> None:
    assert set(RULE_ROWS) == set(RULES), "add a row for every registered rule"
    assert set(OPT_ROWS) == set(OPTIMIZERS), "add a row for every registered optimizer"


def _train(
    net: StagedNet, x: Tensor, criteria: list[Callable[[Tensor], Tensor]], rule_row: str, opt: str, steps: int
) -> None:
    """``criteria[k]``: exit ``k``'s loss from its output."""
    name, kw = RULE_ROWS[rule_row]
    if rule_row == "weighted":
        kw = {"weights": [1.0] * net.num_exits}
    rule = build_rule(name, **kw)
    rule.bind(net)
    optimizer = optimizer_for(rule, net, lambda m, ps: build_optimizer(opt, m, ps, **OPT_ROWS[opt]))
    per_exit = [lambda z, _, c=c: c(z) for c in criteria]  # a greedy procedure's loss_fn(logits, y), per exit
    epochs = net.num_exits  # SGL: one phase per module; the others ignore the epochs
    for epoch in range(epochs):
        rule.on_epoch_start(epoch, epochs)
        for _ in range(steps // epochs):
            if isinstance(rule, GreedyProcedure):
                rule.step(net, x, None, optimizer, loss_fn=per_exit)
                continue
            optimizer.zero_grad()
            rule.backward(net, [c(z) for c, z in zip(criteria, rule.forward(net, x))])
            optimizer.step()


def _linear(i: int, o: int, w: Tensor | None = None) -> nn.Linear:
    m = nn.Linear(i, o, bias=False)
    if w is not None:
        with torch.no_grad():
            m.weight.copy_(w)
    return m


ALL = [(r, o) for r in RULE_ROWS for o in OPT_ROWS]


@pytest.mark.parametrize("rule,opt", ALL)
def test_least_squares(rule: str, opt: str) -> None:
    g = torch.Generator().manual_seed(1)
    n, d = 64, 4
    x = torch.randn(n, d, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.3 * torch.randn(n, generator=g)
    w_star = torch.linalg.lstsq(x.double(), y.double().unsqueeze(1)).solution.squeeze(1)
    net = StagedNet([_linear(d, d, torch.eye(d))], [_linear(d, 1, torch.zeros(1, d))])
    _train(net, x, [lambda o: ((o.squeeze(1) - y) ** 2).mean()], rule, opt, steps=150)
    w = (net.exits[0].weight @ net.stages[0].weight).squeeze(0).double()
    assert torch.linalg.vector_norm(w - w_star) < 0.05 * torch.linalg.vector_norm(w_star), (w, w_star)


@pytest.mark.parametrize("rule,opt", ALL)
def test_separable_quadratic(rule: str, opt: str) -> None:
    a = torch.tensor([0.5, 1.0, 2.0, 4.0])
    c = torch.tensor([1.0, -1.0, 2.0, 0.5])
    # θ is the weight of Linear(1, 4) applied to the input 1; the exit passes θ through
    net = StagedNet([_linear(1, 4, torch.zeros(4, 1))], [nn.Identity()])
    _train(net, torch.ones(1, 1), [lambda o: (a * (o.squeeze(0) - c) ** 2).sum()], rule, opt, steps=150)
    theta = net.stages[0].weight.detach().squeeze(1)
    assert torch.linalg.vector_norm(theta - c) < 0.05 * torch.linalg.vector_norm(c), (theta, c)


@pytest.mark.slow
@pytest.mark.parametrize("rule,opt", ALL)
def test_two_exit_realizable_linear_model_reaches_zero_loss(rule: str, opt: str) -> None:
    g = torch.Generator().manual_seed(2)
    n, d = 64, 4
    x = torch.randn(n, d, generator=g)
    targets = [x @ torch.randn(d, generator=g), x @ torch.randn(d, generator=g)]
    net = StagedNet(
        [_linear(d, d, torch.eye(d)), _linear(d, d, torch.eye(d))],
        [_linear(d, 1, torch.zeros(1, d)), _linear(d, 1, torch.zeros(1, d))],
    )

    criteria = [lambda o, t=t: ((o.squeeze(1) - t) ** 2).mean() for t in targets]
    with torch.no_grad():
        start = [float(c(o)) for c, o in zip(criteria, net(x))]
    _train(net, x, criteria, rule, opt, steps=400)
    with torch.no_grad():
        end = [float(c(o)) for c, o in zip(criteria, net(x))]
    assert all(e < 0.02 * s for s, e in zip(start, end)), (start, end)


def test_one_osgd_sgd_step_equals_the_gram_schmidt_direction() -> None:
    torch.manual_seed(3)
    n, d, lr = 16, 3, 0.1
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(2, n, dtype=torch.float64)
    net = StagedNet([_linear(d, d), _linear(d, d)], [_linear(d, 1), _linear(d, 1)]).double()

    def losses() -> list[Tensor]:
        return [((o.squeeze(1) - t) ** 2).mean() for o, t in zip(net(x), y)]

    # by hand: the trunk (stage 0) is reached by both exits; its direction is g1 + (g2 − proj_{g1} g2); every
    # other parameter gets the plain gradient of the losses that reach it
    params = list(net.parameters())
    trunk = net.stages[0].weight
    l1, l2 = losses()
    g1 = torch.autograd.grad(l1, params, allow_unused=True, retain_graph=True)
    g2 = torch.autograd.grad(l2, params, allow_unused=True)
    expected = []
    for p, a, b in zip(params, g1, g2):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        if p is trunk:
            b = b - (a * b).sum() / (a * a).sum() * a
        expected.append(p.detach() - lr * (a + b))

    rule = build_rule("osgd")
    rule.bind(net)
    opt = build_optimizer("sgd", net, list(net.parameters()), lr=lr)
    opt.zero_grad()
    rule.backward(net, losses())
    opt.step()
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
