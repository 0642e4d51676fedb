"""DessiLBI / SLBI: formulas against hand computation, prox operators against brute force, the path,
degenerate-case equivalence with SGD, state round-trip, stability condition."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from anytrain.config import load_config
from anytrain.optim import SLBI, build_optimizer
from anytrain.optim.slbi import group_soft_threshold, slbi, slbi_param_groups, soft_threshold
from anytrain.sparsity import support_path
from anytrain.train import Trainer

# ---------------------------------------------------------------------------------------------------------
# Hand computation on a 2×3 weight: plain Python loops over entries, nothing shared with the implementation.


def _hand_prox(z: list[list[float]], kappa: float, mode: str) -> list[list[float]]:
    rows, cols = len(z), len(z[0])
    if mode == "lasso":
        return [[kappa * math.copysign(max(abs(v) - 1.0, 0.0), v) for v in row] for row in z]
    if mode == "rows":  # groups = rows (output neurons)
        out = []
        for row in z:
            n = math.sqrt(sum(v * v for v in row))
            s = max(0.0, 1.0 - 1.0 / n) if n > 0 else 0.0
            out.append([kappa * s * v for v in row])
        return out
    # groups = columns (input features)
    out = [[0.0] * cols for _ in range(rows)]
    for j in range(cols):
        n = math.sqrt(sum(z[i][j] ** 2 for i in range(rows)))
        s = max(0.0, 1.0 - 1.0 / n) if n > 0 else 0.0
        for i in range(rows):
            out[i][j] = kappa * s * z[i][j]
    return out


def _hand_slbi(w0, grads, *, lr, kappa, nu, momentum, wd, mode):
    w = [list(r) for r in w0]
    z = [[0.0] * 3 for _ in range(2)]
    g = [[0.0] * 3 for _ in range(2)]
    buf = None
    for t, grad in enumerate(grads):
        d = [[grad[i][j] + wd * w[i][j] for j in range(3)] for i in range(2)]
        if momentum:
            buf = d if t == 0 else [[momentum * buf[i][j] + d[i][j] for j in range(3)] for i in range(2)]
            d = buf
        e = [[w[i][j] - g[i][j] for j in range(3)] for i in range(2)]
        w = [[w[i][j] - lr * kappa * (d[i][j] + e[i][j] / nu) for j in range(3)] for i in range(2)]
        z = [[z[i][j] + lr * e[i][j] / nu for j in range(3)] for i in range(2)]
        g = _hand_prox(z, kappa, mode)
    return w, z, g


W0 = [[1.5, -2.0, 0.25], [0.2, 0.3, -0.1]]
GRADS = [
    [[0.3, -0.1, 0.2], [-0.4, 0.5, 0.0]],
    [[0.1, 0.2, -0.3], [0.2, -0.1, 0.4]],
    [[-0.2, 0.0, 0.1], [0.3, 0.3, -0.2]],
    [[0.05, -0.15, 0.25], [-0.1, 0.2, 0.1]],
]


@pytest.mark.parametrize(
    "mode,penalty,group_by", [("lasso", "lasso", "out"), ("rows", "group", "out"), ("cols", "group", "in")]
)
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.01)])
def test_step_matches_hand_computation(mode: str, penalty: str, group_by: str, momentum: float, wd: float) -> None:
    # lr·κ/ν is large here (0.75) so that Z crosses the threshold within four steps
    lr, kappa, nu = 1.0, 1.2, 1.6
    w_ref, z_ref, g_ref = _hand_slbi(W0, GRADS, lr=lr, kappa=kappa, nu=nu, momentum=momentum, wd=wd, mode=mode)
    p = nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = SLBI([p], lr=lr, kappa=kappa, nu=nu, momentum=momentum, weight_decay=wd, penalty=penalty, group_by=group_by)
    for grad in GRADS:
        p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
    st = opt.state[p]
    torch.testing.assert_close(p.detach(), torch.tensor(w_ref, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(st["z"], torch.tensor(z_ref, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(st["gamma"], torch.tensor(g_ref, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (st["gamma"] != 0).any(), "the test must reach the support to check the prox"


def test_plain_parameters_take_sgd_step_scaled_by_kappa() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))  # a vector: not sparsified under "auto"
    opt = SLBI([p], lr=0.1, kappa=3.0, nu=10.0, momentum=0.0)
    p.grad = torch.tensor([0.5, 1.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0 - 0.15, -2.0 - 0.3], dtype=torch.float64))
    assert "z" not in opt.state[p]


# ---------------------------------------------------------------------------------------------------------
# prox operators = argmin of ½‖x − z‖² + penalty(x), checked by brute force


def test_soft_threshold_is_lasso_prox_by_grid_search() -> None:
    grid = np.linspace(-5, 5, 200001)
    for z in [-3.2, -1.0, -0.4, 0.0, 0.7, 1.0, 2.5]:
        obj = 0.5 * (grid - z) ** 2 + np.abs(grid)
        brute = grid[np.argmin(obj)]
        got = float(soft_threshold(torch.tensor([z], dtype=torch.float64))[0])
        assert abs(got - brute) < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_soft_threshold_is_group_lasso_prox_by_minimisation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(4, 3)) * np.array([[0.2], [0.8], [1.5], [3.0]])  # some groups below, some above 1
    for dim in (0, 1):
        zz = z if dim == 0 else z.T  # rows of zz are the groups
        brute = np.zeros_like(zz)
        for gi, zg in enumerate(zz):  # the objective separates over groups: minimise each from several starts

            def obj(x: np.ndarray, zg: np.ndarray = zg) -> float:
                return 0.5 * float(((x - zg) ** 2).sum()) + float(np.linalg.norm(x))

            starts = [np.zeros_like(zg), zg, 0.5 * zg, rng.normal(size=zg.shape)]
            runs = [
                minimize(obj, s0, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000})
                for s0 in starts
            ]
            best = min(runs, key=lambda r: r.fun).x
            brute[gi] = best if obj(best) < obj(np.zeros_like(zg)) else 0.0
        got = group_soft_threshold(torch.tensor(z), dim=dim).numpy()
        np.testing.assert_allclose(got if dim == 0 else got.T, brute, atol=1e-4)


def test_group_soft_threshold_on_conv_weight_groups_filters_and_zero_group_gives_no_nan() -> None:
    z = torch.randn(5, 3, 3, 3)
    z[2] = 0.0
    out = group_soft_threshold(z, dim=0)
    assert torch.isfinite(out).all() and (out[2] == 0).all()
    for f in range(5):  # per filter: the closed form max(0, 1 − 1/‖z_f‖)·z_f
        n = z[f].norm()
        exp = z[f] * max(0.0, 1 - 1 / float(n)) if n > 0 else torch.zeros_like(z[f])
        torch.testing.assert_close(out[f], exp)
    for c in range(3):  # per input channel
        n = z[:, c].norm()
        torch.testing.assert_close(group_soft_threshold(z, dim=1)[:, c], z[:, c] * max(0.0, 1 - 1 / float(n)))


# ---------------------------------------------------------------------------------------------------------
# The path, W*, metrics


def _toy_net() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 3))


def _toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, 6, generator=g)
    y = (x[:, 0].sum(1) > 0).long() + (x[:, 1].sum(1) > 1).long()
    return x, y


def test_gamma_starts_at_zero_and_support_grows() -> None:
    net = _toy_net()
    opt = SLBI(net.parameters(), lr=0.1, kappa=1.0, nu=2.0)
    x, y = _toy_batch()
    path = [opt.epoch_metrics()["support/all"]]
    assert path[0] == 0.0
    for step in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if step % 30 == 29:
            path.append(opt.epoch_metrics()["support/all"])
    assert path[1] < 1.0 and path[-1] > path[1] and max(path) > 0.3
    # the path is (nearly) monotone: Γ's support grows
    assert sum(b < a for a, b in zip(path, path[1:])) <= 2
    m = opt.epoch_metrics()
    assert set(m) == {"support/group0.param0", "support/group0.param2", "support/all"}


def test_projected_and_projected_model_give_w_star() -> None:
    net = _toy_net()
    opt = SLBI(net.parameters(), lr=0.1, kappa=1.0, nu=2.0)
    x, y = _toy_batch()
    for _ in range(60):  # part of the conv filters are in Γ's support by now
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    conv = net[0].weight
    gamma = opt.state[conv]["gamma"]
    filt_on = gamma.flatten(1).norm(dim=1) > 0
    assert filt_on.any() and not filt_on.all()
    before = conv.detach().clone()
    star = opt.projected_model(net)
    torch.testing.assert_close(star[0].weight, before * filt_on[:, None, None])
    torch.testing.assert_close(star[0].bias, net[0].bias)  # not sparsified
    torch.testing.assert_close(star[3].weight, net[3].weight * (opt.state[net[3].weight]["gamma"] != 0))
    with opt.projected():
        torch.testing.assert_close(net[0].weight, star[0].weight)
        out_star = net(x)
    assert torch.equal(conv, before)
    torch.testing.assert_close(out_star, star(x))


# ---------------------------------------------------------------------------------------------------------
# degenerate case: ν → ∞ is SGD with step lr·κ


@pytest.mark.parametrize("nesterov", [False, True])
def test_nu_infinite_equals_sgd_exactly_and_large_nu_is_close(nesterov: bool) -> None:
    torch.manual_seed(0)
    ref = _toy_net()
    nets = [copy.deepcopy(ref) for _ in range(3)]
    kw = dict(momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    opts = [
        torch.optim.SGD(nets[0].parameters(), lr=0.05 * 2.0, **kw),
        SLBI(nets[1].parameters(), lr=0.05, kappa=2.0, nu=math.inf, **kw),
        SLBI(nets[2].parameters(), lr=0.05, kappa=2.0, nu=1e9, **kw),
    ]
    x, y = _toy_batch()
    for _ in range(10):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b, c in zip(nets[0].parameters(), nets[1].parameters(), nets[2].parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert all((opts[1].state[p].get("gamma", torch.zeros(1)) == 0).all() for p in nets[1].parameters())


# ---------------------------------------------------------------------------------------------------------
# state_dict round trip


def test_state_dict_round_trip_is_exact() -> None:
    x, y = _toy_batch()
    net = _toy_net()
    # heads=True: the output layer 3 is sparsified too (lasso), so both penalty kinds round-trip
    opt = SLBI(slbi_param_groups(net, heads=True), lr=0.1, kappa=1.0, mu=2.0, weight_decay=1e-4)

    def run(n: nn.Module, o: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            o.zero_grad()
            nn.functional.cross_entropy(n(x), y).backward()
            o.step()

    run(net, opt, 60)
    blob = copy.deepcopy(opt.state_dict())
    net2 = copy.deepcopy(net)
    opt2 = SLBI(slbi_param_groups(net2, heads=True), lr=0.5, kappa=1.0, nu=3.0)  # other values: must be overwritten
    opt2.load_state_dict(blob)
    assert opt2.param_groups[0]["nu"] == 2.0 and opt2.param_groups[1]["names"] == ["3.weight"]
    run(net, opt, 40)
    run(net2, opt2, 40)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(net.parameters(), net2.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k])
    assert opt.epoch_metrics() == opt2.epoch_metrics()


# ---------------------------------------------------------------------------------------------------------
# stability condition and argument checks


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(kappa=0.0), "kappa"),
        (dict(nu=-1.0), "nu"),
        (dict(lr=1.0, kappa=10.0, nu=10.0), "unstable"),
        (dict(lr=0.5, kappa=10.0, mu=4.0), "unstable"),
        (dict(nu=5.0, mu=6.0), "not both"),
        (dict(momentum=1.0), "momentum"),
        (dict(penalty="l0"), "penalty"),
        (dict(group_by="diag"), "group_by"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(decay="adamw"), "decay"),
        (dict(decay="authors", nesterov=True), "Nesterov"),
    ],
)
def test_bad_hyper_parameters_raise_one_line_value_error(kw: dict, match: str) -> None:
    args = dict(lr=0.1, kappa=1.0, nu=10.0)
    if "mu" in kw:
        args.pop("nu")
    args.update(kw)
    with pytest.raises(ValueError, match=match) as e:
        SLBI([nn.Parameter(torch.zeros(2, 2))], **args)
    assert "\n" not in str(e.value)


def test_scheduler_pushing_lr_past_the_condition_is_caught_at_step() -> None:
    p = nn.Parameter(torch.ones(2, 2))
    opt = SLBI([p], lr=0.1, kappa=1.0, nu=1.0)
    opt.param_groups[0]["lr"] = 2.0
    p.grad = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="unstable"):
        opt.step()


@pytest.mark.parametrize("group_dim", [None, 0])
def test_coupling_dynamics_stable_below_and_unstable_above_the_bound(group_dim: int | None) -> None:
    """On Γ's support the coupling error e = W − Γ evolves as e ← (1 − 2·lr·κ/ν)·e: it decays for
    lr·κ/ν < 1 and blows up above. Checked with the functional core (zero loss gradient)."""

    def error_after(r: float, steps: int = 40) -> float:
        kappa, nu = 1.0, 1.0
        lr = r * nu / kappa
        z = torch.full((3, 4), 50.0, dtype=torch.float64)  # deep inside the support
        gamma = torch.empty_like(z)
        gamma.copy_(kappa * (soft_threshold(z) if group_dim is None else group_soft_threshold(z, group_dim)))
        w = gamma + 0.01 * torch.randn(3, 4, dtype=torch.float64)
        e0 = float((w - gamma).norm())
        for _ in range(steps):
            slbi([w], [torch.zeros_like(w)], [None], [z], [gamma], lr=lr, kappa=kappa, nu=nu, group_dims=[group_dim])
        return float((w - gamma).norm()) / e0

    assert error_after(0.5) < 1e-6
    assert error_after(0.9) < 1e-2
    assert error_after(1.1) > 10.0


def test_slbi_factory_sparsifies_trunk_not_heads_biases_norms() -> None:
    from anytrain.nets import build_model

    net = build_model("cnn1d-exits", width=8, exits=2)
    opt = build_optimizer("slbi", net, lr=0.1, mu=20.0)
    sparse = {id(p) for g in opt.param_groups if g["penalty"] != "none" for p in g["params"]}
    trunk_convs = [m.weight for m in net.stages.modules() if isinstance(m, nn.Conv1d)]
    assert {id(w) for w in trunk_convs} == sparse
    assert opt.param_groups[0]["nu"] == 20.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


# ---------------------------------------------------------------------------------------------------------
# decay="authors": the released DessiLBI optimizer's weight-decay convention, against a hand-written loop


def _authors_reference(net: nn.Module, grads: list[dict[str, torch.Tensor]], *, lr, kappa, mu, momentum, damp, wd):
    """The released optimizer's step written out per tensor: momentum on the raw gradient, then wd·W added to
    the buffer itself (not dampened) for every tensor that is not 1-D; conv weights (4-D): group lasso per
    output filter; linear weights (2-D): lasso; everything else a plain step. Heads are not sparsified."""
    w = {k: v.detach().clone() for k, v in net.named_parameters()}
    sparse = {k for k, v in w.items() if k.startswith("stages") and k.endswith("weight") and v.dim() in (2, 4)}
    buf: dict[str, torch.Tensor] = {}
    z = {k: torch.zeros_like(w[k]) for k in sparse}
    gamma = {k: torch.zeros_like(w[k]) for k in sparse}
    for step in grads:
        for k, g in step.items():
            if momentum:
                buf[k] = g.clone() if k not in buf else momentum * buf[k] + (1 - damp) * g
                d = buf[k]
            else:
                d = g.clone()
            if wd and w[k].dim() != 1:
                d += wd * w[k]  # in place: with momentum this is the buffer
            if k in sparse:
                last = w[k].clone()
                w[k] = w[k] - lr * kappa * d - lr * kappa / mu * (w[k] - gamma[k])
                z[k] = z[k] + lr / mu * (last - gamma[k])
                if w[k].dim() == 2:
                    gamma[k] = kappa * z[k].sign() * (z[k].abs() - 1).clamp(min=0)
                else:
                    flat = z[k].reshape(z[k].shape[0], -1)
                    norms = flat.norm(dim=1, keepdim=True)
                    gamma[k] = kappa * ((1 - 1 / norms).clamp(min=0) * flat).reshape(z[k].shape)
            else:
                w[k] = w[k] - lr * kappa * d
    return w, gamma


@pytest.mark.parametrize("momentum,damp", [(0.9, 0.0), (0.9, 0.3), (0.0, 0.0)])
def test_authors_decay_matches_hand_written_released_update(momentum: float, damp: float) -> None:
    from anytrain.nets import StagedNet

    torch.manual_seed(0)
    stages = nn.ModuleList(
        [
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
            nn.Sequential(nn.Flatten(1), nn.Linear(4 * 5 * 5, 6), nn.ReLU()),
        ]
    )
    exits = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 3)), nn.Linear(6, 3)])
    net = StagedNet(stages, exits).double()
    names = [k for k, _ in net.named_parameters()]
    # large κ·lr/ν and gradients so Γ leaves zero within the run, and a large decay so the conventions differ
    hp = dict(lr=0.5, kappa=1.0, mu=1.0, momentum=momentum, damp=damp, wd=0.05)
    gen = torch.Generator().manual_seed(1)
    grads = [
        {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in net.named_parameters()}
        for _ in range(12)
    ]
    w_ref, gamma_ref = _authors_reference(net, grads, **hp)

    def run(decay: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        m = copy.deepcopy(net)
        opt = build_optimizer(
            "slbi",
            m,
            lr=hp["lr"],
            kappa=hp["kappa"],
            mu=hp["mu"],
            momentum=momentum,
            dampening=damp,
            weight_decay=hp["wd"],
            decay=decay,
        )
        params = dict(m.named_parameters())
        for step in grads:
            for k in names:
                params[k].grad = step[k].clone()
            opt.step()
        return m, opt

    m, opt = run("authors")
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), w_ref[k], rtol=0, atol=1e-10, msg=k)
        if k in gamma_ref:
            torch.testing.assert_close(opt.state[p]["gamma"], gamma_ref[k], rtol=0, atol=1e-10, msg=k)
    assert any((g != 0).any() for g in gamma_ref.values()), "the test must reach Γ's support"
    # the torch convention decays biases and BN too: it must differ (else this test could not fail)
    m_torch, _ = run("torch")
    assert any(not torch.allclose(a, b) for a, b in zip(m.parameters(), m_torch.parameters()))


def test_docstring_examples_run() -> None:
    import doctest

    import anytrain.optim.slbi as mod

    res = doctest.testmod(mod, extraglobs={"torch": torch, "nn": nn}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 8 and res.failed == 0


# ---------------------------------------------------------------------------------------------------------
# through the trainer: the path is logged each epoch and --resume reaches the same weights and Γ

TRAINER_FAST = [
    "data.name=synthetic",
    "data.batch_size=32",
    "model.name=cnn1d-exits",
    "model.width=8",
    "model.exits=2",
    "train.epochs=3",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
    "optimizer.name=slbi",
    "optimizer.lr=0.1",
    "optimizer.mu=1.0",
    "optimizer.kappa=1.0",
]


class Stop(Exception):
    pass


def test_slbi_path_logged_and_resume_exact(tmp_path) -> None:
    cfg = load_config(None, TRAINER_FAST)
    full = Trainer(cfg, tmp_path / "full")
    full.fit()
    hist = json.loads((tmp_path / "full" / "history.json").read_text())
    path = support_path(hist)
    assert "all" in path and len(path["all"]) == 3
    assert all(0.0 <= v <= 1.0 for v in path["all"])
    from anytrain.eval.plots import plot_run

    assert tmp_path / "full" / "sparsity_path.png" in plot_run(tmp_path / "full")

    part = Trainer(cfg, tmp_path / "part")
    orig = part._end_epoch

    def end_epoch(epoch, loss):
        orig(epoch, loss)
        if epoch + 1 == 2:
            raise Stop

    part._end_epoch = end_epoch
    with pytest.raises(Stop):
        part.fit()
    resumed = Trainer(cfg, tmp_path / "part", resume=True)
    assert resumed.start_epoch == 2
    resumed.fit()
    for (k, a), (_, b) in zip(full.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), k
    for p, q in zip(full.net.parameters(), resumed.net.parameters()):
        for key, v in full.optimizer.state[p].items():
            assert torch.equal(v, resumed.optimizer.state[q][key]), key
