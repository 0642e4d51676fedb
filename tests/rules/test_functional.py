"""``anytrain.rules.backward(losses, rule, shared=...)`` on models anytrain did not build, against references
computed here (per-exit gradients by autograd, Gram–Schmidt in float64), and every bad call failing in one line."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

import anytrain.rules as R
from anytrain.greedy import DGL, SGL, build_module_optimizers
from anytrain.nets import StagedNet
from anytrain.rules import OSGD, AdaLoss, backward, build_rule

F = nn.functional


class MyNet(nn.Module):
    """A user's own multi-exit CNN: blocks and heads, ``forward`` returns the list of logits."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.Tanh()),
                nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.Tanh()),
                nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.Tanh()),
            ]
        )
        self.heads = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(c * 8, 3)) for c in (4, 4, 6)])

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for block, head in zip(self.blocks, self.heads):
            x = block(x)
            out.append(head(x))
        return out

    def trunk(self) -> list[nn.Parameter]:
        return list(self.blocks.parameters())


def _data(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 1, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)


def _net(seed: int = 0) -> MyNet:
    torch.manual_seed(seed)
    return MyNet().double()


def _losses(net: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    return [F.cross_entropy(z, y) for z in net(x)]


def _ref_per_exit(losses: list[Tensor], params: list[Tensor]) -> Tensor:
    """K×P per-exit gradients by plain autograd, zeros where a loss does not reach a parameter."""
    rows = []
    for L in losses:
        gs = torch.autograd.grad(L, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    return torch.stack(rows).double()


def _ref_gram_schmidt(G: Tensor) -> Tensor:
    """Modified Gram–Schmidt in float64, rows in order; a row (numerically) in the span becomes zero."""
    G = G.double()
    U = torch.zeros_like(G)
    for k in range(G.shape[0]):
        r = G[k].clone()
        for j in range(k):
            if U[j].norm() > 0:
                r -= (U[j] @ r) / (U[j] @ U[j]) * U[j]
        U[k] = r if r.norm() > 1e-7 * G[k].norm() else 0.0
    return U


def _flat_grads(params: list[Tensor]) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def test_joint_equals_sum_backward_exactly():
    x, y = _data()
    a = _net()
    b = copy.deepcopy(a)
    sum(_losses(a, x, y)).backward()  # type: ignore[union-attr]
    stats = backward(_losses(b, x, y), "joint", shared=b.trunk())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    assert set(stats) == {"loss"}


def test_osgd_equals_gram_schmidt_of_per_exit_trunk_grads_and_heads_get_their_own():
    x, y = _data(1)
    net = _net(1)
    trunk = net.trunk()
    losses = _losses(net, x, y)
    G = _ref_per_exit(losses, trunk)
    head_ref = [torch.autograd.grad(L, list(h.parameters()), retain_graph=True) for L, h in zip(losses, net.heads)]
    stats = backward(losses, "osgd", shared=net.trunk())
    torch.testing.assert_close(_flat_grads(trunk), _ref_gram_schmidt(G).sum(0), rtol=1e-9, atol=1e-12)
    for h, ref in zip(net.heads, head_ref):
        for p, g in zip(h.parameters(), ref):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=0)
    assert int(stats["osgd/kept"]) == 3


def test_osgd_functional_equals_staged_net_wrapping_the_same_modules():
    x, y = _data(2)
    a = _net(2)
    b = copy.deepcopy(a)
    backward(_losses(a, x, y), OSGD(), shared=a.trunk())
    staged = StagedNet(list(b.blocks), list(b.heads))
    assert all(s is blk for s, blk in zip(staged.stages, b.blocks))  # wrapped, not copied
    rule = OSGD()
    rule.backward(staged, [F.cross_entropy(z, y) for z in rule.forward(staged, x)])
    for pa, pb in zip(a.parameters(), b.parameters()):  # b's own modules got the gradients
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-12, atol=1e-15)


def test_accumulates_into_existing_grad():
    x, y = _data(3)
    a = _net(3)
    b = copy.deepcopy(a)
    backward(_losses(a, x, y), "osgd", shared=a.trunk())
    backward(_losses(b, x, y), "osgd", shared=b.trunk())
    backward(_losses(b, x, y), "osgd", shared=b.trunk())
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(2 * pa.grad, pb.grad)


@pytest.mark.parametrize("grad_method", ["loop", "batched"])
def test_multi_task_reach_and_shared_head_sum(grad_method):
    """Non-nested reach: task 1 uses shared A and B, task 2 uses A and C (both shared); a private tensor used by
    both tasks gets the sum of both tasks' gradients."""
    g = torch.Generator().manual_seed(4)
    A, B, C, priv = (torch.randn(5, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    h = torch.tanh(x @ A)
    losses = [(torch.tanh(h @ B) @ priv).pow(2).mean(), (torch.tanh(h @ C) @ priv).sin().sum()]
    shared = [A, C, B]  # any order
    G = _ref_per_exit(losses, shared)
    priv_ref = torch.autograd.grad(losses[0] + losses[1], priv, retain_graph=True)[0]
    backward(losses, OSGD(grad_method=grad_method), shared=shared)
    torch.testing.assert_close(_flat_grads(shared), _ref_gram_schmidt(G).sum(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(priv.grad, priv_ref, rtol=1e-12, atol=1e-14)


def test_torchjd_rule_equals_aggregator_on_reference_jacobian():
    from torchjd.aggregation import UPGrad

    x, y = _data(5)
    net = _net(5)
    trunk = net.trunk()
    losses = _losses(net, x, y)
    J = _ref_per_exit(losses, trunk)
    backward(losses, "torchjd:UPGrad", shared=trunk)
    torch.testing.assert_close(_flat_grads(trunk), UPGrad()(J), rtol=1e-6, atol=1e-9)


def test_a_torchjd_aggregator_object_plugs_in_like_a_rule():
    x, y = _data(5)
    a = _net(5)
    b = copy.deepcopy(a)
    backward(_losses(a, x, y), "osgd", shared=a.trunk())
    backward(_losses(b, x, y), R.OSGDAggregator(), shared=b.trunk())
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="rule must be"):
        backward(_losses(a, x, y), 3, shared=a.trunk())


def test_adaloss_object_keeps_state_across_calls():
    x, y = _data(6)
    net = _net(6)
    rule = AdaLoss(beta=0.5)
    seen = []
    for _ in range(3):
        net.zero_grad()
        losses = _losses(net, x, y)
        seen.append(torch.stack(losses).detach())
        backward(losses, rule, shared=net.trunk())
    avg = torch.zeros(3, dtype=torch.float64)
    for v in seen:
        avg = 0.5 * avg + 0.5 * v
    inv = 1.0 / (avg / (1 - 0.5**3) + 1e-8)
    w = inv * 3 / inv.sum()
    net2 = copy.deepcopy(net)
    net2.zero_grad()
    (w * torch.stack(_losses(net2, x, y))).sum().backward()
    for p, q in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("rule", ["joint", "osgd"])
def test_one_backward_per_exit_through_the_trunk(rule):
    """Hooks on the first block's weight (shared, reached by every exit) and on the last head's weight count
    the backward passes that reach them: joint one, osgd one per exit; a head only once either way."""
    x, y = _data(7)
    net = _net(7)
    calls = {"trunk": 0, "head": 0}
    net.blocks[0][0].weight.register_hook(lambda g: calls.__setitem__("trunk", calls["trunk"] + 1))
    net.heads[2][1].weight.register_hook(lambda g: calls.__setitem__("head", calls["head"] + 1))
    backward(_losses(net, x, y), rule, shared=net.trunk())
    assert calls == {"trunk": 1 if rule == "joint" else 3, "head": 1}


@pytest.mark.parametrize("rule", ["joint", "osgd", "adaloss"])
def test_reduce_is_one_call_for_the_gradients(rule):
    x, y = _data(8)
    a = _net(8)
    b = copy.deepcopy(a)
    n = {"calls": 0}

    def halve(t: Tensor) -> Tensor:  # stands in for an average over 2 ranks, the other holding zeros
        n["calls"] += 1
        return t.mul_(0.5)

    backward(_losses(a, x, y), rule, shared=a.trunk())
    backward(_losses(b, x, y), rule, shared=b.trunk(), reduce=halve)
    assert n["calls"] == (2 if rule == "adaloss" else 1)  # adaloss also averages the losses it weights by
    if rule == "joint":  # linear: exactly half
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(0.5 * pa.grad, pb.grad)


# ---- bad calls: one line each ----------------------------------------------------------------------------
def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_functional_calls():
    x, y = _data()
    net = _net()
    with pytest.raises(ValueError) as e:
        backward([F.cross_entropy(z, y, reduction="none") for z in net(x)], "osgd", shared=net.trunk())
    assert "scalar" in _one_line(e)
    with pytest.raises(ValueError) as e:
        backward(_losses(net, x, y), "osgd", shared=[])
    assert "shared is empty" in _one_line(e)
    with pytest.raises(ValueError) as e:
        backward(_losses(net, x, y), "joint", shared=iter(()))
    assert "shared is empty" in _one_line(e)
    unused = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError) as e:
        backward(_losses(net, x, y), "osgd", shared=[*net.trunk(), unused])
    assert "not reached by any loss" in _one_line(e)
    with pytest.raises(ValueError) as e:
        backward(_losses(net, x, y), "osgd", shared=[net(x)[0]])  # not a leaf
    assert "leaf" in _one_line(e)
    for rule, api in [
        ("dgl", "anytrain.greedy.DGL().step"),
        ("SGL", "anytrain.greedy.SGL().step"),
        (DGL(), "anytrain.greedy.DGL().step"),
        (OSGD(amortize=3), "rule.forward"),
    ]:
        with pytest.raises(ValueError) as e:
            backward(_losses(net, x, y), rule, shared=net.trunk())
        msg = _one_line(e)
        assert api in msg and "StagedNet" in msg
    # by name, also where anytrain.greedy (which registers the procedures) was never imported
    code = "import anytrain.rules as R\ntry:\n    R.build_rule('dgl')\nexcept ValueError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "not a gradient rule" in out and "anytrain.greedy.DGL().step" in out and len(out.splitlines()) == 1
    assert all(p.grad is None for p in net.parameters())  # nothing was written by any bad call


def test_bad_rule_backward_calls():
    x, y = _data()
    net = _net()
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError) as e:
        OSGD().backward([w], [w.sum(), (w**2).sum()])  # type: ignore[arg-type]
    assert "anytrain.rules.backward" in _one_line(e)
    for rule in (OSGD(), build_rule("torchjd:UPGrad")):
        with pytest.raises(ValueError) as e:  # a plain module: which parameters are shared is not known
            rule.backward(net, _losses(net, x, y))
        msg = _one_line(e)
        assert "shared=" in msg and "StagedNet" in msg
    staged = StagedNet(list(net.blocks), list(net.heads))
    for rule in (OSGD(), build_rule("joint"), build_rule("torchjd:UPGrad")):
        with pytest.raises(ValueError) as e:
            rule.backward(staged, _losses(staged, x, y)[:2])
        assert "2 losses" in _one_line(e)
    assert all(p.grad is None for p in net.parameters())


def test_procedures_refuse_a_plain_module_or_other_optimizers():
    x, y = _data()
    net = _net()
    sgd = lambda n, ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    for proc in (DGL(), SGL()):
        with pytest.raises(ValueError) as e:
            proc.step(net, x, y, [])
        assert "StagedNet" in _one_line(e)
    with pytest.raises(ValueError) as e:
        OSGD(amortize=2).forward(net, x)
    assert "StagedNet" in _one_line(e)
    staged = StagedNet(list(net.blocks), list(net.heads))
    for proc in (DGL(), SGL()):
        with pytest.raises(ValueError) as e:  # one optimizer over everything would train end to end
            proc.step(staged, x, y, [torch.optim.SGD(staged.parameters(), lr=0.1)])
        assert "build_module_optimizers" in _one_line(e)
        proc.step(staged, x, y, build_module_optimizers(staged, proc.bind(staged), sgd))  # the right way works


def test_dgl_on_wrapped_user_modules_gives_each_block_its_own_exit_gradient():
    x, y = _data(9)
    net = _net(9)
    ref = copy.deepcopy(net)
    staged = StagedNet(list(net.blocks), list(net.heads))
    rule = DGL()
    rule.step(staged, x, y, build_module_optimizers(staged, rule.bind(staged), lambda n, ps: torch.optim.SGD(ps, lr=0)))
    h = x
    for block, head in zip(ref.blocks, ref.heads):  # reference: detach between blocks, by hand
        h = block(h.detach())
        F.cross_entropy(head(h), y).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)


def test_import_is_cheap_and_lazy():
    code = "import sys, anytrain.rules; assert 'torchjd' not in sys.modules and 'cvxpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    subprocess.run([sys.executable, "-c", "import sys, anytrain; assert 'torch' not in sys.modules"], check=True)
    assert R.TorchJDRule.__name__ == "TorchJDRule"  # the lazy names resolve
    import anytrain

    assert anytrain.backward is backward and anytrain.StagedNet is StagedNet
    with pytest.raises(AttributeError):
        anytrain.no_such_thing  # noqa: B018
