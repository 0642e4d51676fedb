"""CurvatureCorrected and its functional core, checked against independent references."""

from __future__ import annotations

import doctest
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import fractional_matrix_power
from torch import nn

import anytrain.optim._precondition as curv_core
import anytrain.optim.curvature as curv
from anytrain.nets.staged import StagedNet
from anytrain.optim import CurvatureCorrected, build_optimizer
from anytrain.optim.curvature import eig_factor, precondition


def random_spd(n: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    m = torch.randn(n, rank or n, generator=gen, dtype=torch.float64)
    return m @ m.T / n


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(36, 5)
    )


def cnn_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, 8, 8), torch.randint(0, 5, (n,))


def train(net: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


# ---- the functional core ----------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 1.5])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_precondition_matches_scipy_fractional_powers(alpha: float, damping: float) -> None:
    gen = torch.Generator().manual_seed(1)
    A, G = random_spd(5, gen), random_spd(3, gen)
    grad = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    ref = (
        fractional_matrix_power(G.numpy() + damping * np.eye(3), -alpha)
        @ grad.numpy()
        @ fractional_matrix_power(A.numpy() + damping * np.eye(5), -alpha)
    )
    out = precondition(grad, A, G, alpha, damping)
    np.testing.assert_allclose(out.numpy(), np.real(ref), rtol=1e-8, atol=1e-10)


def test_precondition_alpha_one_is_inverse_and_batched() -> None:
    gen = torch.Generator().manual_seed(2)
    A = torch.stack([random_spd(4, gen) for _ in range(3)])
    G = torch.stack([random_spd(2, gen) for _ in range(3)])
    grad = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    lam = 0.1
    out = precondition(grad, A, G, 1.0, lam)
    for i in range(3):
        ref = torch.linalg.solve(G[i] + lam * torch.eye(2, dtype=torch.float64), grad[i])
        ref = torch.linalg.solve(A[i] + lam * torch.eye(4, dtype=torch.float64), ref.T).T
        torch.testing.assert_close(out[i], ref)


def test_precondition_rank_deficient_is_finite_and_pseudo_inverse() -> None:
    gen = torch.Generator().manual_seed(3)
    A, G = random_spd(6, gen, rank=2), random_spd(4, gen, rank=1)
    grad = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    for lam in (0.0, 1e-12, 1e-3):
        assert torch.isfinite(precondition(grad.float(), A.float(), G.float(), 1.0, lam)).all()
    # damping 0: pseudo-inverse convention, as torch.linalg.pinv
    out = precondition(grad, A, G, 1.0, 0.0)
    ref = torch.linalg.pinv(G, hermitian=True) @ grad @ torch.linalg.pinv(A, hermitian=True)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-8)


def test_eig_factor_clamps_negative_rounding() -> None:
    v = torch.randn(5, 1)
    d, q = eig_factor(v @ v.T - 1e-7 * torch.eye(5))
    assert (d >= 0).all()
    torch.testing.assert_close(q @ torch.diag(d) @ q.T, v @ v.T, atol=1e-5, rtol=1e-5)


def test_precondition_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        precondition(torch.ones(1, 1), torch.eye(1), torch.eye(1), -1.0, 0.1)
    with pytest.raises(ValueError, match="damping"):
        precondition(torch.ones(1, 1), torch.eye(1), torch.eye(1), 1.0, -0.1)


@pytest.mark.parametrize("module", [curv, curv_core])
def test_docstring_examples(module) -> None:
    res = doctest.testmod(module, extraglobs={"torch": torch, "nn": nn, "F": F}, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 2 and res.failed == 0


# ---- degenerate case: alpha = 0 is SGD ----------------------------------------------------------------------
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 5e-4)])
def test_alpha_zero_equals_sgd_bit_for_bit(momentum: float, wd: float) -> None:
    torch.manual_seed(0)
    net_a = small_cnn()
    net_b = small_cnn()
    net_b.load_state_dict(net_a.state_dict())
    batches = [cnn_batch() for _ in range(4)]
    opt_a = CurvatureCorrected(
        net_a, lr=0.1, alpha=0.0, damping=1e-3, momentum=momentum, weight_decay=wd, factor_every=1, inverse_every=1
    )
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.1, momentum=momentum, weight_decay=wd)
    train(net_a, opt_a, batches)
    train(net_b, opt_b, batches)
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa, pb)


# ---- alpha = 1 with exact factors is the natural gradient of the Kronecker Fisher -------------------------
def test_alpha_one_equals_explicit_kronecker_natural_gradient() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    lam = 0.05
    opt = CurvatureCorrected(layer, lr=1.0, alpha=1.0, damping=lam, factor_every=1, inverse_every=1)
    w0 = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).clone()
    F.cross_entropy(layer(x), y).backward()
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).clone()
    opt.step()
    w1 = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)

    # independent factors: per-sample output gradients of the per-sample losses, inputs with a 1 appended
    with torch.no_grad():
        z = x @ w0[:, :4].T + w0[:, 4]
        delta = torch.softmax(z, 1) - F.one_hot(y, 3).float()  # ∂ℓ_b/∂z_b
    a = torch.cat([x, torch.ones(6, 1)], 1)
    A = a.T @ a / 6
    G = delta.T @ delta / 6
    # Fisher ≈ A ⊗ G acting on vec(∇W) (column-major vec), damped factor by factor
    fisher = torch.kron(A + lam * torch.eye(5), G + lam * torch.eye(3)).double()
    vec_g = grad.T.reshape(-1).double()
    nat = torch.linalg.solve(fisher, vec_g).reshape(5, 3).T
    torch.testing.assert_close((w0 - w1).double(), nat, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_step_is_the_functional_core_applied_to_the_stored_factors(alpha: float) -> None:
    # the optimizer's cached powers (eigen path at α = ½, Cholesky at α = 1) give precondition(∇, A, G)
    torch.manual_seed(21)
    net = small_cnn().double()
    lam = 1e-2
    opt = CurvatureCorrected(net, lr=1.0, alpha=alpha, damping=lam, factor_every=1, inverse_every=1)
    x, y = cnn_batch()
    F.cross_entropy(net(x.double()), y).backward()
    before = {p: p.detach().clone() for p in net.parameters()}
    opt.step()
    for layer in opt.layers:
        w, b, st = layer.weight, layer.bias, opt.state[layer.weight]
        grad = torch.cat([w.grad.reshape(w.shape[0], -1), b.grad[:, None]], 1)
        expected = precondition(grad, st["A"], st["G"], alpha, lam)
        moved = torch.cat([(before[w] - w.detach()).reshape(w.shape[0], -1), (before[b] - b.detach())[:, None]], 1)
        torch.testing.assert_close(moved, expected, rtol=1e-9, atol=1e-12)


# ---- convolution factors ------------------------------------------------------------------------------------
def brute_force_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Receptive fields gathered by explicit loops: ``(B, positions, C_in·k...)``."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if isinstance(conv, nn.Conv1d):
        (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
        pad = conv._reversed_padding_repeated_twice
        xp = F.pad(x, pad, mode=mode)
        length = (xp.shape[-1] - d * (k - 1) - 1) // s + 1
        rows = [xp[:, :, t * s : t * s + d * (k - 1) + 1 : d].reshape(x.shape[0], -1) for t in range(length)]
        return torch.stack(rows, 1)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    oh = (xp.shape[-2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            rows.append(patch.reshape(x.shape[0], -1))
    return torch.stack(rows, 1)


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2)),
        lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect", bias=False),
        lambda: nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2),
        lambda: nn.Conv1d(2, 4, 5, padding="same", padding_mode="circular"),
    ],
)
def test_conv_factors_match_brute_force_unfolding(conv) -> None:
    torch.manual_seed(2)
    conv = conv()
    shape = (5, 2, 7, 6) if isinstance(conv, nn.Conv2d) else (5, 2, 11)
    x = torch.randn(*shape)
    opt = CurvatureCorrected(conv, lr=0.1, alpha=1.0, damping=1e-2, factor_every=1, inverse_every=1)
    out = conv(x)
    weights = torch.randn_like(out)
    (out * weights).mean(0).sum().backward()  # a batch-mean loss
    g_out = weights / x.shape[0]  # ∂L/∂z
    grad_w = conv.weight.grad.clone()
    opt.step()
    st = opt.state[conv.weight]

    patches = brute_force_patches(conv, x)  # (B, T, C·k)
    if conv.bias is not None:
        patches = torch.cat([patches, torch.ones(*patches.shape[:2], 1)], -1)
    B, T = patches.shape[:2]
    A_ref = torch.einsum("bti,btj->ij", patches, patches) / (B * T)
    delta = (B * g_out).reshape(B, conv.out_channels, T).transpose(1, 2)  # per-sample δ, (B, T, C_out)
    G_ref = torch.einsum("bti,btj->ij", delta, delta) / B
    torch.testing.assert_close(st["A"], A_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["G"], G_ref, rtol=1e-5, atol=1e-6)
    # the patch ordering is the weight's: Σ_t δ_t a_tᵀ reproduces autograd's weight gradient
    recon = torch.einsum("bto,bti->oi", delta, patches) / B
    torch.testing.assert_close(recon[:, : grad_w[0].numel()].reshape(grad_w.shape), grad_w, rtol=1e-4, atol=1e-6)


# ---- robustness ---------------------------------------------------------------------------------------------
def test_rank_deficient_factors_no_nan() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
    opt = CurvatureCorrected(
        net, lr=0.05, alpha=1.0, damping=1e-8, factor_every=1, inverse_every=1, eigh_dtype="float64"
    )
    for _ in range(5):
        x = torch.zeros(2, 10)
        x[:, 0] = torch.randn(2)  # rank-1 inputs, batch of 2: A and G have many zero eigenvalues
        opt.zero_grad()
        F.cross_entropy(net(x), torch.randint(0, 4, (2,))).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_inplace_activation_after_layer_gives_same_factors() -> None:
    torch.manual_seed(4)
    a = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    b = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    opts = [CurvatureCorrected(n, lr=0.1, factor_every=1, inverse_every=1) for n in (a, b)]
    for n, o in zip((a, b), opts):
        F.cross_entropy(n(x), y).backward()
        o.step()
    for la, lb in zip(opts[0].layers, opts[1].layers):
        torch.testing.assert_close(opts[0].state[la.weight]["G"], opts[1].state[lb.weight]["G"])


# ---- several backward passes per step (OSGD-like rules) -----------------------------------------------------
def two_exit_net() -> StagedNet:
    return StagedNet([nn.Linear(4, 6), nn.Sequential(nn.Tanh(), nn.Linear(6, 6))], [nn.Linear(6, 3), nn.Linear(6, 3)])


def test_two_backward_passes_equal_one_backward_of_the_sum() -> None:
    torch.manual_seed(5)
    net_a, net_b = two_exit_net(), two_exit_net()
    net_b.load_state_dict(net_a.state_dict())
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    opt_a = CurvatureCorrected(net_a, lr=0.1, alpha=1.0, damping=1e-2, factor_every=1, inverse_every=1)
    opt_b = CurvatureCorrected(net_b, lr=0.1, alpha=1.0, damping=1e-2, factor_every=1, inverse_every=1)
    l1, l2 = (F.cross_entropy(z, y) for z in net_a(x))
    l1.backward(retain_graph=True)  # one pass per exit, as OSGD does
    l2.backward()
    opt_a.step()
    sum(F.cross_entropy(z, y) for z in net_b(x)).backward()
    opt_b.step()
    for la, lb in zip(opt_a.layers, opt_b.layers):
        for key in ("A", "G"):
            torch.testing.assert_close(opt_a.state[la.weight][key], opt_b.state[lb.weight][key])
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_param_subset_only_preconditions_owned_layers() -> None:
    net = two_exit_net()
    params = list(net.stage_parameters(1)) + list(net.exit_parameters(1))
    opt = build_optimizer("curvature", net, params, lr=0.1, factor_every=1, inverse_every=1)
    owned = {id(p) for p in params}
    assert len(opt.layers) == 2 and all(id(layer.weight) in owned for layer in opt.layers)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    before = [p.detach().clone() for p in net.stage_parameters(0)]
    F.cross_entropy(net(x)[1], y).backward()
    opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, net.stage_parameters(0)))
    assert all("A" in opt.state[layer.weight] for layer in opt.layers)


# ---- curvature modes -------------------------------------------------------------------------------------
def test_mc_fisher_samples_labels_from_the_model() -> None:
    torch.manual_seed(6)
    layer = nn.Linear(3, 4)
    x = torch.randn(1, 3).repeat(4000, 1)  # one input: true Fisher G = diag(p) − p pᵀ
    opt = CurvatureCorrected(layer, lr=0.1, alpha=1.0, factor_every=1, inverse_every=1, curvature="mc_fisher")
    logits = layer(x)  # the model hook runs the sampled-label backward
    F.cross_entropy(logits, torch.zeros(4000, dtype=torch.long)).backward()
    opt.step()
    p = torch.softmax(logits[0].detach(), 0)
    torch.testing.assert_close(opt.state[layer.weight]["G"], torch.diag(p) - torch.outer(p, p), atol=0.02, rtol=0)
    assert opt.epoch_metrics()["curv_fallbacks"] == 0


def test_sampled_mode_falls_back_to_empirical_when_net_is_called_in_pieces() -> None:
    net = two_exit_net()
    opt = CurvatureCorrected(net, lr=0.1, factor_every=1, inverse_every=1, curvature="mc_fisher")
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    z = net.exits[0](net.stages[0](x))  # the model's forward never runs
    F.cross_entropy(z, y).backward()
    opt.step()
    assert opt.epoch_metrics()["curv_fallbacks"] == 2
    assert "G" in opt.state[net.stages[0].weight]


# ---- knobs -------------------------------------------------------------------------------------------------
def test_factor_and_inverse_periods() -> None:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = CurvatureCorrected(net, lr=0.1, factor_every=2, inverse_every=4, factor_decay=0.5)
    w = net[0].weight
    seen_a, seen_q = [], []
    for t in range(6):
        opt.zero_grad()
        out = net(torch.randn(8, 4))
        assert bool(opt.layers[0].captures) == (t % 2 == 0)  # hooks record only on factor steps
        F.cross_entropy(out, torch.randint(0, 2, (8,))).backward()
        opt.step()
        seen_a.append(opt.state[w]["A"].clone())
        seen_q.append(opt.state[w]["QA"].clone())
    assert torch.equal(seen_a[0], seen_a[1]) and not torch.equal(seen_a[1], seen_a[2])
    assert torch.equal(seen_q[0], seen_q[3]) and not torch.equal(seen_q[3], seen_q[4])


def test_running_average_decay() -> None:
    layer = nn.Linear(2, 1, bias=False)
    opt = CurvatureCorrected(layer, lr=0.0, factor_every=1, inverse_every=1, factor_decay=0.75)
    xs = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    for x in xs:
        layer(x).sum().backward()
        opt.step()
    expected = 0.75 * torch.diag(torch.tensor([1.0, 0.0])) + 0.25 * torch.diag(torch.tensor([0.0, 4.0]))
    torch.testing.assert_close(opt.state[layer.weight]["A"], expected)


def test_adaptive_damping_alpha_half_is_invariant_to_loss_scale() -> None:
    # G scales with c² when the loss scales with c, the gradient with c: Δ ∝ c^(1−2α) = 1 at α = ½
    torch.manual_seed(8)
    nets = [nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    for net, c in zip(nets, (1.0, 100.0)):
        opt = CurvatureCorrected(
            net, lr=0.1, alpha=0.5, damping=1e-3, adaptive_damping=True, factor_every=1, inverse_every=1
        )
        (c * F.cross_entropy(net(x), y)).backward()
        opt.step()
    for pa, pb in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_kl_clip_caps_the_update() -> None:
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    ref = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    ref.load_state_dict(net.state_dict())
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    kappa, lr = 1e-6, 0.5
    outs = []
    for n, clip in ((net, kappa), (ref, None)):
        opt = CurvatureCorrected(n, lr=lr, alpha=1.0, damping=1e-2, factor_every=1, inverse_every=1, kl_clip=clip)
        before = [p.detach().clone() for p in n.parameters()]
        F.cross_entropy(n(x), y).backward()
        grads = [p.grad.clone() for p in n.parameters()]
        opt.step()
        outs.append(([b - p.detach() for b, p in zip(before, n.parameters())], grads, opt))
    (d_clip, g, opt_clip), (d_ref, _, _) = outs
    nu = float(opt_clip.epoch_metrics()["curv_kl_scale"])
    assert nu < 1
    for a, b in zip(d_clip, d_ref):
        torch.testing.assert_close(a, nu * b, rtol=1e-4, atol=1e-8)
    # after clipping, (ην)² Σ⟨Δ, g⟩ = κ: the step d = ηνΔ, so ην Σ⟨d, g⟩ = κ
    kl = sum((d * gg).sum() for d, gg in zip(d_clip, g)) * lr * nu
    assert kl.item() == pytest.approx(kappa, rel=1e-3)


def test_schedules_and_weights_only_state_dict() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = CurvatureCorrected(
        net,
        lr=0.1,
        alpha=lambda t: min(1.0, 0.25 * t),
        damping=lambda t: 0.1 / (1 + t),
        factor_every=1,
        inverse_every=1,
    )
    for t in range(3):
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
        opt.step()
        assert opt.param_groups[0]["alpha"] == min(1.0, 0.25 * t)
        assert opt.param_groups[0]["damping"] == pytest.approx(0.1 / (1 + t))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    "kw",
    [
        {"lr": -1.0},
        {"alpha": -0.5},
        {"damping": 0.0},
        {"momentum": 1.0},
        {"factor_decay": 1.0},
        {"factor_every": 0},
        {"inverse_every": 2.5},
        {"curvature": "hessian"},
        {"kl_clip": 0.0},
        {"eigh_dtype": "float16"},
    ],
)
def test_invalid_hyper_parameters(kw: dict) -> None:
    args = {"lr": 0.1, **kw}
    with pytest.raises(ValueError, match="Invalid"):
        CurvatureCorrected(nn.Linear(2, 2), **args)


# ---- exact resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature,alpha", [("empirical", 0.5), ("mc_fisher", 0.5), ("empirical", 1.0)])
def test_state_dict_round_trip_is_exact(curvature: str, alpha: float) -> None:
    torch.manual_seed(10)
    batches = [cnn_batch() for _ in range(8)]
    kw = dict(
        lr=0.05,
        alpha=alpha,
        damping=1e-2,
        momentum=0.9,
        weight_decay=1e-4,
        factor_every=2,
        inverse_every=3,
        curvature=curvature,
        kl_clip=1e-2,
    )
    net = small_cnn()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    opt = CurvatureCorrected(net, **kw)
    train(net, opt, batches)

    net2 = small_cnn()
    net2.load_state_dict(init)
    opt2 = CurvatureCorrected(net2, **kw)
    train(net2, opt2, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": net2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    net3 = small_cnn()
    net3.load_state_dict(ck["model"])
    opt3 = CurvatureCorrected(net3, **kw)
    opt3.load_state_dict(ck["opt"])
    train(net3, opt3, batches[5:])
    for pa, pb in zip(net.parameters(), net3.parameters()):
        assert torch.equal(pa, pb)


# ---- agreement with a reference K-FAC implementation (benchmark-only dependency) ---------------------------
def test_factors_agree_with_curvlinops_kfac() -> None:
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(11)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4))
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 4, (16,))
    ref = curvlinops.KFACLinearOperator(
        net,
        nn.CrossEntropyLoss(),
        list(net.parameters()),
        [(x, y)],
        fisher_type="empirical",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    ref.compute_kronecker_factors()
    opt = CurvatureCorrected(net, lr=0.0, factor_every=1, inverse_every=1)
    F.cross_entropy(net(x), y).backward()
    opt.step()
    for key, layer in zip(("0", "3"), opt.layers):
        torch.testing.assert_close(opt.state[layer.weight]["A"], ref._input_covariances[key])
        torch.testing.assert_close(opt.state[layer.weight]["G"], ref._gradient_covariances[key])


# ---- composition with the gradient rules --------------------------------------------------------------
@pytest.mark.parametrize("rule_name", ["joint", "osgd", "dgl"])
def test_composes_with_gradient_rules(rule_name: str) -> None:
    from anytrain.greedy import GreedyProcedure
    from anytrain.rules import build_rule
    from anytrain.train.trainer import optimizer_for

    torch.manual_seed(12)
    net = StagedNet(
        [nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU()), nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU())],
        [nn.Sequential(nn.Flatten(), nn.Linear(4 * 12, 3)), nn.Sequential(nn.Flatten(), nn.Linear(4 * 10, 3))],
    )
    rule = build_rule(rule_name)
    opt = optimizer_for(
        rule, net, lambda n, ps: build_optimizer("curvature", n, ps, lr=0.05, factor_every=1, inverse_every=1)
    )
    for _ in range(3):
        x, y = torch.randn(8, 1, 12), torch.randint(0, 3, (8,))
        if isinstance(rule, GreedyProcedure):
            rule.step(net, x, y, opt)
            continue
        opt.zero_grad(set_to_none=True)
        losses = [F.cross_entropy(z, y) for z in rule.forward(net, x)]
        rule.backward(net, losses)
        opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    # every Linear/Conv layer got factors from some optimizer, none twice
    opts = getattr(opt, "optimizers", None) or [opt]
    convs = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
    owners = [o for o in opts for layer in getattr(o, "layers", []) if "G" in o.state[layer.weight]]
    assert len(owners) == len(convs)


# ---- coverage (issue 13) -----------------------------------------------------------------------------------
class EveryKind(nn.Module):
    """A user model with each layer kind: what is preconditioned and what is reported."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv = nn.Conv2d(1, 4, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.conv1d = nn.Conv1d(8, 4, 3, stride=2)
        self.head = nn.Linear(6 * 16 + 4 * 2, 3)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        e = self.emb(tokens)  # (B, 6, 8)
        e, _ = self.mha(e, e, e)
        s = self.conv1d(e.transpose(1, 2)).flatten(1)
        v = self.bn(self.grouped(torch.relu(self.conv(image)))).flatten(1)
        return self.head(torch.cat([v, s], 1))


def every_kind_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randint(0, 10, (n, 6)), torch.randn(n, 1, 4, 4), torch.randint(0, 3, (n,))


def test_coverage_reports_every_module_and_logs_one_line(caplog) -> None:
    torch.manual_seed(13)
    net = EveryKind()
    with caplog.at_level("INFO", logger="anytrain.optim.curvature"):
        opt = CurvatureCorrected(net, lr=0.05, factor_every=1, inverse_every=1)
    assert len(caplog.records) == 1 and "plain steps for 4" in caplog.records[0].getMessage()
    cov = opt.coverage()
    assert cov["preconditioned"] == {
        "conv": "Conv2d",
        "grouped": "Conv2d, block-diagonal over 2 groups",
        "conv1d": "Conv1d",
        "head": "Linear",
    }
    assert set(cov["plain"]) == {"emb", "mha", "mha.out_proj", "bn"}
    assert "functionally" in cov["plain"]["mha.out_proj"] and "in_proj" in cov["plain"]["mha"]
    for _ in range(3):  # every covered hook fires; every parameter moves and stays finite
        tokens, image, y = every_kind_batch()
        opt.zero_grad()
        F.cross_entropy(net(tokens, image), y).backward()
        opt.step()
    assert all("A" in opt.state[layer.weight] for layer in opt.layers)
    assert opt.state[net.grouped.weight]["A"].shape == (2, 2 * 9 + 1, 2 * 9 + 1)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    with pytest.raises(ValueError, match="strict=True.*emb.*mha.out_proj"):
        CurvatureCorrected(net, lr=0.05, strict=True)
    CurvatureCorrected(nn.Sequential(nn.Linear(2, 3), nn.Conv1d(3, 2, 1)), lr=0.1, strict=True)  # all covered


def test_hook_that_never_fires_is_an_error_naming_the_module() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.lin = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(torch.tanh(self.first(x)), self.lin.weight, self.lin.bias)  # bypasses lin's hooks

    net = Functional()
    opt = CurvatureCorrected(net, lr=0.1)
    F.cross_entropy(net(torch.randn(5, 3)), torch.randint(0, 2, (5,))).backward()
    with pytest.raises(RuntimeError, match="'lin' never fired"):
        opt.step()


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_grouped_dilated_conv_equals_one_conv_per_group(alpha: float) -> None:
    # the untied equivalent of a grouped conv: one ordinary conv per channel group, outputs concatenated
    torch.manual_seed(14)
    grouped = nn.Conv2d(4, 6, 3, padding=2, dilation=2, stride=(1, 2), groups=2)
    parts = nn.ModuleList([nn.Conv2d(2, 3, 3, padding=2, dilation=2, stride=(1, 2)) for _ in range(2)])
    with torch.no_grad():
        for i, p in enumerate(parts):
            p.weight.copy_(grouped.weight[3 * i : 3 * i + 3])
            p.bias.copy_(grouped.bias[3 * i : 3 * i + 3])
    split = lambda x: torch.cat([p(x[:, 2 * i : 2 * i + 2]) for i, p in enumerate(parts)], 1)  # noqa: E731
    kw = dict(lr=0.1, alpha=alpha, damping=1e-2, momentum=0.9, factor_every=1, inverse_every=1, kl_clip=1e-2)
    opt_g, opt_p = CurvatureCorrected(grouped, **kw), CurvatureCorrected(parts, **kw)
    for _ in range(3):
        x, target = torch.randn(5, 4, 6, 7), torch.randn(5, 6, 6, 4)
        for f, opt in ((grouped, opt_g), (split, opt_p)):
            opt.zero_grad()
            ((f(x) - target) ** 2).mean().backward()
            opt.step()
    for i, p in enumerate(parts):
        for key in ("A", "G"):
            torch.testing.assert_close(opt_g.state[grouped.weight][key][i], opt_p.state[p.weight][key])
        torch.testing.assert_close(grouped.weight[3 * i : 3 * i + 3], p.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grouped.bias[3 * i : 3 * i + 3], p.bias, rtol=1e-5, atol=1e-6)


class Tied(nn.Module):
    """Two Linears sharing weight and bias, applied to two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.a(x[:, 0]) + 2 * self.b(x[:, 1])))


class Untied(nn.Module):
    """The same function with one Linear applied at two positions."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.out = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # (B, 2, 5)
        return self.out(torch.tanh(h[:, 0] + 2 * h[:, 1]))


def test_tied_weights_equal_the_untied_equivalent() -> None:
    torch.manual_seed(15)
    tied, untied = Tied(), Untied()
    untied.a.load_state_dict(tied.a.state_dict())
    untied.out.load_state_dict(tied.out.state_dict())
    kw = dict(lr=0.1, alpha=0.5, damping=1e-2, factor_every=1, inverse_every=1)
    opt_t, opt_u = CurvatureCorrected(tied, **kw), CurvatureCorrected(untied, **kw)
    assert opt_t.coverage()["preconditioned"] == {"a = b": "Linear", "out": "Linear"}
    for _ in range(3):
        x, y = torch.randn(6, 2, 4), torch.randint(0, 3, (6,))
        for net, opt in ((tied, opt_t), (untied, opt_u)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for key in ("A", "G"):
        torch.testing.assert_close(opt_t.state[tied.a.weight][key], opt_u.state[untied.a.weight][key])
    for pt, pu in (
        (tied.a.weight, untied.a.weight),
        (tied.a.bias, untied.a.bias),
        (tied.out.weight, untied.out.weight),
    ):
        torch.testing.assert_close(pt, pu)


def test_weight_tied_to_an_embedding_is_reported_not_preconditioned() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mid, self.dec = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 7, bias=False)
            self.dec.weight = self.emb.weight

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.dec(torch.tanh(self.mid(self.emb(t))))

    net = LM()
    opt = CurvatureCorrected(net, lr=0.1, factor_every=1, inverse_every=1)
    cov = opt.coverage()
    assert list(cov["preconditioned"]) == ["mid"]
    assert "tied to 'emb'" in cov["plain"]["dec"]
    w0 = net.emb.weight.detach().clone()
    F.cross_entropy(net(torch.randint(0, 7, (5,))), torch.randint(0, 7, (5,))).backward()
    grad = net.emb.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(net.emb.weight, w0 - 0.1 * grad)  # the tied weight takes the plain step


# ---- mixed precision ---------------------------------------------------------------------------------------
def test_bf16_autocast_on_cpu_matches_float32() -> None:
    torch.manual_seed(16)
    nets = [small_cnn() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    batches = [cnn_batch(16) for _ in range(4)]
    opts = [
        CurvatureCorrected(n, lr=0.05, alpha=a, damping=0.1, adaptive_damping=True, factor_every=1, inverse_every=2)
        for n, a in ((nets[0], 0.5), (nets[1], 0.5))
    ]
    for x, y in batches:
        for i, (net, opt) in enumerate(zip(nets, opts)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=i == 1):
                F.cross_entropy(net(x).float(), y).backward()
                opt.step()  # inside autocast too: the step must not run in bf16
    for la, lb in zip(opts[0].layers, opts[1].layers):
        sa, sb = opts[0].state[la.weight], opts[1].state[lb.weight]
        for key in ("A", "G", "QA", "dG"):
            assert sb[key].dtype == torch.float32
        for key in ("A", "G"):
            assert float((sa[key] - sb[key]).norm() / sa[key].norm()) < 3e-2
    for pa, pb in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=2e-2)


# ---- gradient accumulation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("capture", ["hook", "functional"])
def test_micro_batches_give_the_step_of_the_whole_batch(capture: str) -> None:
    torch.manual_seed(17)
    nets = [small_cnn().double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    k = 3
    kw = dict(lr=0.1, alpha=0.5, damping=1e-3, momentum=0.9, kl_clip=1e-2, factor_every=1, inverse_every=1)
    whole = CurvatureCorrected(nets[0], **kw, capture=capture)
    micro = CurvatureCorrected(nets[1], **kw, micro_batches=k, capture=capture)
    for _ in range(3):
        x, y = cnn_batch(4 * k)
        x = x.double()
        whole.zero_grad()
        F.cross_entropy(nets[0](x), y).backward()
        whole.step()
        micro.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (F.cross_entropy(nets[1](xs), ys) / k).backward()
        micro.step()
    for la, lb in zip(whole.layers, micro.layers):
        for key in ("A", "G"):
            torch.testing.assert_close(whole.state[la.weight][key], micro.state[lb.weight][key], rtol=0, atol=1e-6)
    for pa, pb in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


# ---- capture modes, torch.compile ---------------------------------------------------------------------------
def test_functional_capture_equals_hook_capture_and_rejects_several_backward_passes() -> None:
    torch.manual_seed(18)
    nets = [small_cnn() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    kw = dict(lr=0.05, alpha=1.0, damping=1e-2, factor_every=2, inverse_every=2)
    opts = [CurvatureCorrected(n, **kw, capture=c) for n, c in zip(nets, ("hook", "functional"))]
    batches = [cnn_batch() for _ in range(4)]
    for net, opt in zip(nets, opts):
        train(net, opt, batches)
    for pa, pb in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(pa, pb)
    net = two_exit_net()
    opt = CurvatureCorrected(net, lr=0.1, capture="functional")
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    l1, l2 = (F.cross_entropy(z, y) for z in net(x))
    l1.backward(retain_graph=True)
    l2.backward()
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        opt.step()


@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")  # raised inside dynamo
def test_functional_capture_has_no_graph_break_on_the_default_nets() -> None:
    from anytrain.nets import build_model

    for name, shape, kw in (("nested-width", (1, 40), {"stages": 2, "width": 8}),):
        net = build_model(name, in_shape=shape, num_classes=10, **kw)
        opt = CurvatureCorrected(net, lr=0.1, capture="functional")
        for capturing in (True, False):
            opt._capturing = capturing
            explained = torch._dynamo.explain(net)(torch.randn(4, *shape))
            assert explained.graph_break_count == 0, (name, capturing, explained.break_reasons)
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")  # raised inside dynamo
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.* is deprecated:DeprecationWarning")  # inductor
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_trains_to_the_eager_weights(backend: str) -> None:
    torch.manual_seed(19)
    nets = [small_cnn() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    kw = dict(lr=0.05, alpha=0.5, damping=1e-2, momentum=0.9, factor_every=2, inverse_every=4, capture="functional")
    opts = [CurvatureCorrected(n, **kw) for n in nets]
    compiled = torch.compile(nets[1], backend=backend)
    for _ in range(6):
        x, y = cnn_batch(16)
        for f, opt in ((nets[0], opts[0]), (compiled, opts[1])):
            opt.zero_grad()
            F.cross_entropy(f(x), y).backward()
            opt.step()
    for pa, pb in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_cholesky_at_alpha_one_equals_the_eigendecomposition() -> None:
    torch.manual_seed(20)
    nets = [small_cnn().double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    kw = dict(lr=0.05, damping=1e-2, adaptive_damping=True, factor_every=1, inverse_every=2)
    chol = CurvatureCorrected(nets[0], alpha=1.0, **kw)
    eig = CurvatureCorrected(nets[1], alpha=lambda t: 1.0, **kw)  # a schedule keeps the eigendecomposition
    batches = [(x.double(), y) for x, y in (cnn_batch() for _ in range(4))]
    train(nets[0], chol, batches)
    train(nets[1], eig, batches)
    assert "PA" in chol.state[nets[0][0].weight] and "QA" in eig.state[nets[1][0].weight]
    for pa, pb in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-10)
