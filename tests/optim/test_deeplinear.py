"""Deep linear networks: exact Gauss–Newton factors, GD balance conservation, optimizer ↔ closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import jacrev

from anytrain.optim import CurvatureCorrected
from anytrain.optim import deeplinear as dl


def test_whitened_inputs_and_teacher() -> None:
    x = dl.whitened_inputs(50, 6, seed=1)
    torch.testing.assert_close(x.T @ x / 50, torch.eye(6, dtype=torch.float64))
    t = dl.make_teacher(5, 6, [3.0, 1.0])
    torch.testing.assert_close(torch.linalg.svdvals(t.M)[:3], torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_gradients_match_autograd(depth: int) -> None:
    dims = [5, 4, 6, 3, 4][: depth + 1]
    ws = [w.requires_grad_() for w in dl.init_student(dims, 1.0, seed=depth)]
    M = dl.make_teacher(dims[-1], dims[0], [2.0]).M
    loss = 0.5 * ((dl.product(ws, 0, depth) - M) ** 2).sum()
    auto = torch.autograd.grad(loss, ws)
    for a, b in zip(auto, dl.gradients([w.detach() for w in ws], M)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_exact_gn_factors_match_explicit_jacobian(depth: int) -> None:
    """GN diagonal block of layer l from an explicit per-sample Jacobian equals A_l ⊗ G_l (row-major: G ⊗ A)."""
    dims = [4, 5, 3, 4, 2][: depth + 1]
    ws = dl.init_student(dims, 1.0, seed=10 + depth)
    n = 12
    x = dl.whitened_inputs(n, dims[0], seed=2)

    def outputs(*w: torch.Tensor) -> torch.Tensor:
        return x @ dl.product(list(w), 0, depth).T  # (n, d_out)

    jac = jacrev(outputs, argnums=tuple(range(depth)))(*ws)
    full = torch.cat([j.reshape(n * dims[-1], -1) for j in jac], dim=1)
    gn = full.T @ full / n  # E_x[Jᵀ J] for ½‖z − y‖² averaged over samples
    offset = 0
    for l, (A, G) in enumerate(dl.gn_factors(ws)):
        size = ws[l].numel()
        block = gn[offset : offset + size, offset : offset + size]
        torch.testing.assert_close(block, torch.kron(G, A))
        offset += size
    # and the whole-network Jacobian used by full NGD
    torch.testing.assert_close(gn, dl.full_gn_jacobian(ws).T @ dl.full_gn_jacobian(ws))


def test_gd_step_changes_balance_by_exactly_lr_squared_term() -> None:
    ws = dl.init_student([4, 5, 5, 3], 0.8, seed=3)
    M = dl.make_teacher(3, 4, [2.0, 1.0]).M
    lr = 0.07
    grads = dl.gradients(ws, M)
    new = dl.step(ws, M, "gd", lr)
    for l in range(len(ws) - 1):
        before = ws[l + 1].T @ ws[l + 1] - ws[l] @ ws[l].T
        after = new[l + 1].T @ new[l + 1] - new[l] @ new[l].T
        expected = lr**2 * (grads[l + 1].T @ grads[l + 1] - grads[l] @ grads[l].T)
        torch.testing.assert_close(after - before, expected, rtol=1e-9, atol=1e-12)


def test_gd_balance_drift_is_first_order_in_lr_at_fixed_time() -> None:
    """O(η²) per step × (time/η) steps = O(η): halving η halves the drift at the same time η·t."""
    ws0 = dl.init_student([4, 4, 4], 0.5, seed=4)
    teacher = dl.make_teacher(4, 4, [2.0, 1.0])
    drift = []
    for lr in (0.02, 0.01):
        hist = dl.simulate([w.clone() for w in ws0], teacher, "gd", lr, int(round(2.0 / lr)), record_every=10**6)
        drift.append(abs(hist.balance[-1][0] - hist.balance[0][0]))
    assert drift[1] < 0.6 * drift[0]
    assert drift[0] < 1e-2 * hist.balance[0][0] + 1e-3


def first_below(hist: dl.History, fraction: float) -> int:
    return next(t for t, loss in zip(hist.steps, hist.loss) if loss < fraction * hist.loss[0])


def test_ngd_d_breaks_balance_and_half_keeps_it() -> None:
    teacher = dl.make_teacher(6, 6, [3.0, 1.5])
    ws0 = dl.init_student([6, 6, 6, 6], 0.1, seed=5)
    runs = {
        a: dl.simulate(
            [w.clone() for w in ws0], teacher, "fractional", 0.05, 400, alpha=a, damping=1e-4, record_every=5
        )
        for a in (0.5, 1.0)
    }
    gd = dl.simulate([w.clone() for w in ws0], teacher, "gd", 0.05, 400, record_every=5)
    init = max(gd.balance[0])
    assert max(gd.balance[-1]) < 1.1 * init  # GD conserves balance (up to the O(η) drift)
    assert max(runs[1.0].balance[-1]) > 100 * max(runs[0.5].balance[-1])  # NGD-d destroys it
    assert max(runs[0.5].balance[-1]) < 20 * init  # α = ½ stays near balanced
    assert 3 * first_below(runs[0.5], 1e-3) < first_below(gd, 1e-3)  # ... and converges much faster


def test_full_ngd_moves_the_product_along_the_error_to_first_order() -> None:
    ws = dl.init_student([3, 4, 3], 1.0, seed=6)
    M = dl.make_teacher(3, 3, [1.0, 0.5]).M
    lr = 1e-5
    new = dl.step(ws, M, "ngd", lr)
    moved = (dl.product(new, 0, 2) - dl.product(ws, 0, 2)) / lr
    torch.testing.assert_close(moved, -(dl.product(ws, 0, 2) - M), rtol=1e-3, atol=1e-4)


def test_optimizer_gn_mse_mode_reproduces_the_closed_form_step() -> None:
    """nn.Linear stack + CurvatureCorrected(curvature='gn_mse') == deeplinear.step('fractional') on whitened data."""
    dims, n = [4, 5, 3], 16
    ws = dl.init_student(dims, 1.0, seed=7)
    teacher = dl.make_teacher(3, 4, [2.0, 1.0])
    x = dl.whitened_inputs(n, 4, seed=8)
    y = x @ teacher.M.T
    net = nn.Sequential(*(nn.Linear(i, o, bias=False) for i, o in zip(dims[:-1], dims[1:]))).double()
    with torch.no_grad():
        for layer, w in zip(net, ws):
            layer.weight.copy_(w)
    lr, alpha, lam = 0.1, 0.5, 1e-3
    opt = CurvatureCorrected(
        net,
        lr=lr,
        alpha=alpha,
        damping=lam,
        curvature="gn_mse",
        factor_every=1,
        inverse_every=1,
        factor_decay=0.0,
        eigh_dtype="float64",
    )
    loss = 0.5 * ((net(x) - y) ** 2).sum(1).mean()
    loss.backward()
    opt.step()
    for layer, (A, G) in zip(net, dl.gn_factors(ws)):
        torch.testing.assert_close(opt.state[layer.weight]["A"].double(), A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[layer.weight]["G"].double(), G, rtol=1e-5, atol=1e-6)
    expected = dl.step(ws, teacher.M, "fractional", lr, alpha=alpha, damping=lam)
    for layer, w in zip(net, expected):
        torch.testing.assert_close(layer.weight.detach(), w, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The flows: which rules conserve balance in continuous time, and the ODE integration against closed forms


@pytest.mark.parametrize("rule,alpha,damping", [("gd", 0.0, 0.0), ("ngd", 0.0, 0.0), ("ngd", 0.0, 1e-3)])
def test_gd_and_full_ngd_flows_conserve_balance_and_blockwise_rules_do_not(rule, alpha, damping) -> None:
    ws = dl.init_student([4, 5, 5, 4], 0.7, seed=11)
    M = dl.make_teacher(4, 4, [2.0, 1.0]).M

    def D(w: list[torch.Tensor]) -> list[torch.Tensor]:
        return [b.T @ b - a @ a.T for a, b in zip(w[:-1], w[1:])]

    def fd_rate(dirs: list[torch.Tensor], h: float = 1e-6) -> list[torch.Tensor]:
        # central difference of D along the flow dW/dt = −dirs (independent of balance_rate)
        plus = D([w - h * d for w, d in zip(ws, dirs)])
        minus = D([w + h * d for w, d in zip(ws, dirs)])
        return [(p - m) / (2 * h) for p, m in zip(plus, minus)]

    dirs = dl.direction(ws, M, rule, alpha, damping)
    for rate, ref in zip(dl.balance_rate(ws, dirs), fd_rate(dirs)):
        torch.testing.assert_close(rate, ref, rtol=1e-6, atol=1e-8)
        scale = max(float(d.abs().max()) for d in dirs) * max(float(w.abs().max()) for w in ws)
        assert float(rate.abs().max()) < 1e-10 * scale  # exactly conserved: zero up to round-off
    for a in (0.5, 1.0):  # block-diagonal preconditioning breaks the conservation
        fdirs = dl.direction(ws, M, "fractional", a, 1e-4)
        rates = dl.balance_rate(ws, fdirs)
        for rate, ref in zip(rates, fd_rate(fdirs)):
            torch.testing.assert_close(rate, ref, rtol=1e-6, atol=1e-8)
        assert max(float(r.abs().max()) for r in rates) > 1e-2


def test_full_ngd_flow_follows_the_closed_form_and_conserves_balance() -> None:
    # With J of full row rank, dW_tot/dt = −J J⁺ vec(E) = −E, so E(t) = e^{−t} E(0) and loss(t) = e^{−2t} loss(0).
    teacher = dl.make_teacher(3, 3, [2.0, 1.0], seed=2)
    ws0 = dl.init_student([3, 3, 3, 3], 0.5, seed=3)
    h = dl.integrate([w.clone() for w in ws0], teacher, "ngd", 3.0, stop_below=None, rtol=1e-10, atol=1e-12)
    assert h.times[-1] == pytest.approx(3.0) and len(h.times) > 5
    for t, loss in zip(h.times, h.loss):
        assert loss == pytest.approx(h.loss[0] * torch.exp(torch.tensor(-2.0 * t)).item(), rel=1e-6)
    b0 = h.balance[0]
    for b in h.balance:
        assert b == pytest.approx(b0, rel=1e-7)
    e0 = dl.product(ws0, 0, 3) - teacher.M
    torch.testing.assert_close(dl.product(h.weights, 0, 3) - teacher.M, e0 * math.exp(-3.0), rtol=1e-6, atol=1e-9)


def test_integrated_gd_flow_is_the_limit_of_small_steps() -> None:
    # Euler steps of size η are first order: the distance to the flow at a fixed time halves with η.
    teacher = dl.make_teacher(3, 3, [2.0, 1.0], seed=4)
    ws0 = dl.init_student([3, 4, 3], 0.6, seed=5)
    T = 1.0
    flow = dl.integrate([w.clone() for w in ws0], teacher, "gd", T, stop_below=None, rtol=1e-11, atol=1e-13)
    errs = []
    for lr in (0.01, 0.005):
        run = dl.simulate([w.clone() for w in ws0], teacher, "gd", lr, int(round(T / lr)), record_every=10**6)
        errs.append(max(float((a - b).abs().max()) for a, b in zip(run.weights, flow.weights)))
    assert errs[1] == pytest.approx(errs[0] / 2, rel=0.1)
    assert max(flow.balance[-1]) == pytest.approx(max(flow.balance[0]), rel=1e-8)  # and the flow conserves balance
