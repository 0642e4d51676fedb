"""OSGD: the orthogonalization core against independent references, and the rule's gradients, options, state."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from osgd_helpers import brute_force_grads, flat_grad, pinv_orthogonalize, qr_orthogonalize, tiny_net
from torch import nn

from anytrain.nets import StagedNet, build_model
from anytrain.optim import OPTIMIZERS, build_optimizer
from anytrain.rules import OSGD, OSGDAggregator, OSGDWeighting, build_rule, orthogonalize, osgd_weights
from anytrain.rules._osgd import combine_segments, osgd_coefficients, segment_grams

F = nn.functional


# ---- orthogonalize --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("K,P", [(1, 7), (3, 50), (6, 20), (10, 300)])
def test_matches_qr_reference(dtype, tol, K, P):
    G = torch.randn(K, P, dtype=torch.float64)
    U = orthogonalize(G.to(dtype))
    assert U.dtype == dtype
    ref = qr_orthogonalize(G)
    torch.testing.assert_close(U.double(), ref, rtol=0, atol=tol * G.norm(dim=1).max().item())


@settings(max_examples=60, deadline=None)
@given(
    K=st.integers(1, 8),
    P=st.integers(1, 30),
    rank=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_properties(K, P, rank, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    r = min(rank, K, P)
    G64 = torch.randn(K, r, generator=gen, dtype=torch.float64) @ torch.randn(r, P, generator=gen, dtype=torch.float64)
    zero_rows = torch.rand(K, generator=gen) < 0.2
    G64[zero_rows] = 0.0
    G = G64.to(dtype)
    U = orthogonalize(G)
    assert torch.isfinite(U).all()
    Ud = U.double()
    scale = max(G64.norm(dim=1).max().item(), 1e-30)
    eps = 1e-10 if dtype == torch.float64 else 2e-3
    # rows mutually orthogonal
    gram = Ud @ Ud.T
    off = gram - torch.diag(torch.diagonal(gram))
    assert off.abs().max().item() <= eps * scale**2
    # zero rows stay exactly zero
    assert (U[zero_rows] == 0).all()
    # u_k − g_k lies in span(g_<k), and u_k ⟂ g_<k: compare with the pinv reference
    ref = pinv_orthogonalize(G.double())
    diff = (Ud - ref).abs().max().item()
    # a row whose residual is tiny relative to g_k may be dropped by one tolerance and kept by the other
    kept_both = (Ud.norm(dim=1) > 0) == (ref.norm(dim=1) > 0)
    if bool(kept_both.all()):
        assert diff <= (1e-7 if dtype == torch.float64 else 2e-3) * scale
    # number of non-zero rows = rank of G (generic data)
    if dtype == torch.float64:
        assert int((U.norm(dim=1) > 0).sum()) == int(torch.linalg.matrix_rank(G64))


def test_rounding_residual_after_nearly_dependent_rows_is_dropped():
    # rank 2: g_1 and g_4 are nearly parallel (‖u_4‖/‖g_4‖ ≈ 0.018), so g_5's true residual (1e-12 of ‖g_5‖) is
    # pure rounding of large cancelling terms; it must be dropped, as the rank says (found by hypothesis).
    gen = torch.Generator().manual_seed(26)
    G = torch.randn(8, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 26, generator=gen, dtype=torch.float64)
    G[torch.rand(8, generator=gen) < 0.2] = 0.0
    U = orthogonalize(G)
    assert int((U.norm(dim=1) > 0).sum()) == int(torch.linalg.matrix_rank(G)) == 2
    torch.testing.assert_close(U.sum(0), pinv_orthogonalize(G).sum(0), rtol=0, atol=1e-9 * G.norm(dim=1).max().item())


def test_dependent_and_zero_rows_are_exact_zeros():
    for dtype in (torch.float32, torch.float64):
        g = torch.randn(3, 100, dtype=dtype)
        G = torch.stack([g[0], 3 * g[0], torch.zeros(100, dtype=dtype), g[1], g[0] - 2 * g[1], g[2]])
        U = orthogonalize(G)
        assert (U[1] == 0).all() and (U[2] == 0).all() and (U[4] == 0).all()
        assert (U[[0, 3, 5]].norm(dim=1) > 0).all()
        torch.testing.assert_close(U[0], G[0], rtol=0, atol=0)
    assert (orthogonalize(torch.zeros(4, 5)) == 0).all()


def test_order_prefix_and_scaling():
    G = torch.randn(5, 40, dtype=torch.float64)
    U = orthogonalize(G)
    # row k depends only on rows ≤ k
    for k in range(1, 5):
        torch.testing.assert_close(orthogonalize(G[:k]), U[:k])
    # u_k is linear in g_k and invariant to rescaling earlier rows (only their span matters)
    G2 = G.clone()
    G2[0] *= -3.0
    G2[4] *= 2.0
    U2 = orthogonalize(G2)
    torch.testing.assert_close(U2[1:4], U[1:4])
    torch.testing.assert_close(U2[4], 2 * U[4])
    # priority: permuting rows changes the result (the earliest row is kept whole), the total span does not
    Up = orthogonalize(G[[4, 3, 2, 1, 0]])
    torch.testing.assert_close(Up[0], G[4])
    assert not torch.allclose(Up.sum(0), U.sum(0))
    proj = Up.T @ torch.linalg.pinv(Up.T) @ U.T
    torch.testing.assert_close(proj, U.T)


def test_orthogonalize_rejects_bad_input():
    with pytest.raises(ValueError, match="K×P"):
        orthogonalize(torch.randn(3))
    with pytest.raises(ValueError, match="floating"):
        orthogonalize(torch.ones(2, 2, dtype=torch.long))


# ---- Gram-space coefficients and the TorchJD weighting ---------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_coefficients_reproduce_orthogonalize(dtype, tol):
    G = torch.randn(6, 80, dtype=dtype)
    G[3] = G[0] - G[1]  # a dependent row
    C, sq = osgd_coefficients(G @ G.T)
    U = orthogonalize(G)
    scale = G.norm(dim=1).max().item()
    torch.testing.assert_close((C.to(dtype) @ G), U, rtol=0, atol=tol * scale)
    torch.testing.assert_close(sq.to(dtype), (U * U).sum(1), rtol=tol * 10, atol=tol * scale**2)
    assert (torch.tril(C) == C).all()
    w = osgd_weights(G @ G.T)
    torch.testing.assert_close(w @ G, U.sum(0), rtol=0, atol=tol * scale * 10)


def test_rescaled_weights_give_rows_of_norm_g():
    G = torch.randn(4, 30, dtype=torch.float64)
    C, sq = osgd_coefficients(G @ G.T)
    U = C @ G
    s = G.norm(dim=1) / U.norm(dim=1)
    torch.testing.assert_close(osgd_weights(G @ G.T, rescale=True) @ G, (s[:, None] * U).sum(0))
    torch.testing.assert_close((s[:, None] * U).norm(dim=1), G.norm(dim=1))


def test_batched_gram():
    G = torch.randn(3, 4, 25, dtype=torch.float64)
    W = osgd_weights(G @ G.transpose(1, 2))
    for b in range(3):
        torch.testing.assert_close(W[b] @ G[b], qr_orthogonalize(G[b]).sum(0))


def test_torchjd_weighting_and_aggregator():
    J = torch.randn(4, 12, dtype=torch.float64)
    ref = qr_orthogonalize(J).sum(0)
    torch.testing.assert_close(OSGDAggregator()(J), ref)
    torch.testing.assert_close(OSGDWeighting()(J @ J.T) @ J, ref)
    assert "rescale=False" in repr(OSGDAggregator())


def test_torchjd_autogram_engine_with_osgd_weighting_equals_rule():
    from torchjd.autogram import Engine

    torch.manual_seed(1)
    net = tiny_net(K=3).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    # our rule
    rule = OSGD()
    rule.backward(net, [F.cross_entropy(z, y) for z in net(x)])
    ours = flat_grad(net.trunk_parameters())
    net.zero_grad()
    # TorchJD: Gramian of the trunk Jacobian, OSGD weights, one weighted backward (heads get a_k ∇L_k)
    engine = Engine(*net.stages, batch_dim=None)
    losses = torch.stack([F.cross_entropy(z, y) for z in net(x)])
    w = OSGDWeighting()(engine.compute_gramian(losses))
    losses.backward(w)
    torch.testing.assert_close(flat_grad(net.trunk_parameters()), ours)


# ---- the rule ---------------------------------------------------------------------------------------------------
def _losses(net, x, y, rule=None):
    out = rule.forward(net, x) if rule is not None else net(x)
    return [F.cross_entropy(z, y) for z in out]


def _data(n=24, din=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, din, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("grad_method", ["loop", "batched"])
@pytest.mark.parametrize("rescale", [False, True])
def test_global_rule_matches_brute_force(grad_method, rescale):
    net = tiny_net(K=3).double()
    x, y = _data()
    trunk, G, heads = brute_force_grads(net, x, y)
    U = qr_orthogonalize(G)
    if rescale:
        U = U * (G.norm(dim=1) / U.norm(dim=1))[:, None]
    OSGD(rescale=rescale, grad_method=grad_method).backward(net, _losses(net, x, y))
    torch.testing.assert_close(flat_grad(trunk), U.sum(0))
    for k in range(3):
        for p, g in zip(net.exit_parameters(k), heads[k]):
            torch.testing.assert_close(p.grad, g)


def test_per_tensor_rule_orthogonalizes_each_tensor():
    net = tiny_net(K=3).double()
    x, y = _data()
    trunk, G, _ = brute_force_grads(net, x, y)
    OSGD(mode="per_tensor").backward(net, _losses(net, x, y))
    off = 0
    stage_of = {id(p): j for j in range(3) for p in net.stage_parameters(j)}
    for p in trunk:
        n = p.numel()
        Gt = G[stage_of[id(p)] :, off : off + n]  # the exits that reach this tensor
        ref = qr_orthogonalize(Gt)
        # per-tensor rows are mutually orthogonal and sum to the tensor's update
        gram = ref @ ref.T
        assert (gram - torch.diag(torch.diagonal(gram))).abs().max() < 1e-10
        torch.testing.assert_close(p.grad.reshape(-1), ref.sum(0))
        off += n


def test_segment_grams_match_loop():
    G = torch.randn(3, 10, dtype=torch.float64)
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    G[0, 5:] = 0.0  # exits 0 and 1 reach only the first two tensors (5 columns)
    G[1, 5:] = 0.0
    grams = segment_grams(G, [3, 2, 5])
    pruned = segment_grams(G, [3, 2, 5], support=[5, 5, 10])
    for t in range(3):
        Gt = G[:, seg == t]
        torch.testing.assert_close(grams[t], Gt @ Gt.T)
        torch.testing.assert_close(pruned[t], Gt @ Gt.T)
    W = torch.randn(3, 3, dtype=torch.float64)
    expect = (W[seg].T * G).sum(0)
    torch.testing.assert_close(combine_segments(W, G, torch.tensor([3, 2, 5])), expect)
    torch.testing.assert_close(combine_segments(W, G, torch.tensor([3, 2, 5]), support=[5, 5, 10]), expect)


def test_one_exit_equals_plain_backprop_over_steps():
    torch.manual_seed(3)
    net_a = StagedNet([nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))], [nn.Linear(6, 3)])
    net_b = copy.deepcopy(net_a)
    opt_a = torch.optim.SGD(net_a.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    rule = OSGD()
    for step in range(4):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        opt_a.zero_grad()
        rule.backward(net_a, _losses(net_a, x, y, rule))
        opt_b.zero_grad()
        F.cross_entropy(net_b(x)[0], y).backward()
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            assert torch.equal(pa.grad, pb.grad), step
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa, pb)


class _Mask(nn.Module):
    def __init__(self, idx):
        super().__init__()
        self.idx = idx

    def forward(self, h):
        return h[:, self.idx]


def test_orthogonal_exit_gradients_equal_joint():
    # exit 0 reads units 0..2 of the shared layer, exit 1 units 3..5: their trunk gradients touch disjoint rows
    torch.manual_seed(0)
    trunk = nn.Linear(4, 6)
    net = StagedNet(
        [trunk, nn.Identity()],
        [nn.Sequential(_Mask([0, 1, 2]), nn.Linear(3, 3)), nn.Sequential(_Mask([3, 4, 5]), nn.Linear(3, 3))],
    )
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    OSGD().backward(net, _losses(net, x, y))
    ours = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    build_rule("joint").backward(net, _losses(net, x, y))
    for a, p in zip(ours, net.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-7)


def test_hand_computed_two_exit_net():
    # θ ∈ R², x = 1: stage 0 is h = θ (Linear 1→2 without bias), heads are fixed linear maps to a scalar loss
    theta = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        theta.weight.copy_(torch.tensor([[0.5], [-1.0]]))
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    net = StagedNet([theta, nn.Identity()], [nn.Identity(), nn.Identity()])
    h = net(torch.ones(1, 1))
    L1, L2 = (h[0] @ a).sum(), (h[1] @ b).sum()  # ∇_θ L1 = a, ∇_θ L2 = b
    OSGD().backward(net, [L1, L2])
    # u_2 = b − (a·b/‖a‖²) a = (3, 1) − (5/5)(1, 2) = (2, −1);  direction = a + u_2 = (3, 1)
    torch.testing.assert_close(theta.weight.grad.reshape(-1), torch.tensor([3.0, 1.0]))
    theta.weight.grad = None
    h = net(torch.ones(1, 1))
    OSGD(rescale=True).backward(net, [(h[0] @ a).sum(), (h[1] @ b).sum()])
    # rescaled: u_2 · ‖b‖/‖u_2‖ = (2, −1)·√10/√5
    expect = a + torch.tensor([2.0, -1.0]) * (10.0**0.5 / 5.0**0.5)
    torch.testing.assert_close(theta.weight.grad.reshape(-1), expect)


def test_amortized_n1_equals_exact():
    net_a = tiny_net(K=3).double()
    net_b = copy.deepcopy(net_a)
    ra, rb = OSGD(), OSGD(amortize=1)
    for s in range(3):
        x, y = _data(seed=s)
        net_a.zero_grad()
        net_b.zero_grad()
        ra.backward(net_a, _losses(net_a, x, y, ra))
        rb.backward(net_b, _losses(net_b, x, y, rb))
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            assert torch.equal(pa.grad, pb.grad)


def test_amortized_reuses_cached_coefficients():
    net = tiny_net(K=3).double()
    rule = OSGD(amortize=3)
    for s in range(7):
        x, y = _data(seed=s)
        trunk, G, heads = brute_force_grads(net, x, y)
        net.zero_grad()
        cached = None if rule.weights is None else rule.weights.clone()
        rule.backward(net, _losses(net, x, y, rule))
        if s % 3 == 0:  # refresh step: exact OSGD, coefficients recomputed from this step's Gram matrix
            torch.testing.assert_close(flat_grad(trunk), qr_orthogonalize(G).sum(0))
            torch.testing.assert_close(rule.weights, osgd_weights(G @ G.T))
        else:  # one backward of Σ L_k with the cached coefficients on the trunk side
            torch.testing.assert_close(flat_grad(trunk), cached @ G)
            assert torch.equal(rule.weights, cached)
        for k in range(3):  # heads always get their own exit's gradient
            for p, g in zip(net.exit_parameters(k), heads[k]):
                torch.testing.assert_close(p.grad, g)


def test_amortized_without_rule_forward_raises():
    net = tiny_net(K=2).double()
    rule = OSGD(amortize=5)
    x, y = _data()
    rule.backward(net, _losses(net, x, y, rule))  # refresh step: any forward will do
    net.zero_grad()
    with pytest.raises(ValueError, match=r"rule\.forward\(net, x\)"):
        rule.backward(net, _losses(net, x, y))  # forward not through the rule, cached weights due
    assert all(p.grad is None for p in net.parameters())  # nothing was written


@pytest.mark.parametrize("kw", [{}, {"amortize": 3}, {"mode": "per_tensor", "rescale": True}])
def test_resume_is_exact(kw):
    def run(net, rule, opt, steps, start):
        for s in range(start, start + steps):
            x, y = _data(seed=100 + s)
            opt.zero_grad()
            rule.backward(net, _losses(net, x, y, rule))
            opt.step()

    torch.manual_seed(0)
    net = tiny_net(K=3).double()
    rule = OSGD(**kw)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    run(net, rule, opt, 4, 0)
    snap = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(rule.state_dict()))
    run(net, rule, opt, 5, 4)
    net2 = tiny_net(K=3).double()
    net2.load_state_dict(snap[0])
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(snap[1])
    rule2 = OSGD(**kw)
    rule2.load_state_dict(snap[2])
    run(net2, rule2, opt2, 5, 4)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_batchnorm_nested_net_and_stats():
    net = build_model("nested-width", in_shape=(1, 40), num_classes=4, stages=3, width=4)
    rule = OSGD()
    x, y = torch.randn(8, 1, 40), torch.randint(0, 4, (8,))
    stats = rule.backward(net, _losses(net, x, y, rule))
    assert set(stats) == {"loss", "osgd/kept"} and all(v.dim() == 0 for v in stats.values())
    assert int(stats["osgd/kept"]) == 3
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


OPT_NAMES = sorted(OPTIMIZERS)


@pytest.mark.parametrize("opt_name", OPT_NAMES)
@pytest.mark.parametrize("kw", [{}, {"amortize": 4}])
def test_composes_with_every_optimizer(opt_name, kw):
    torch.manual_seed(0)
    net = build_model("nested-depth", in_shape=(1, 16), num_classes=3, stages=3, width=6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 16, generator=g)
    y = (x.mean((1, 2)) > 0).long() + (x[:, 0, :8].mean(1) > 0).long()
    rule = OSGD(**kw)
    rule.bind(net)
    opt = build_optimizer(opt_name, net, list(net.parameters()))
    first = None
    for _ in range(25):
        opt.zero_grad()
        losses = _losses(net, x, y, rule)
        rule.backward(net, losses)
        opt.step()
        first = first if first is not None else float(sum(l.detach() for l in losses))
    last = float(sum(l.detach() for l in _losses(net, x, y)))
    assert last == last and last < first  # finite and decreasing


def test_invalid_options():
    with pytest.raises(ValueError, match="mode"):
        OSGD(mode="layer")
    with pytest.raises(ValueError, match="amortize"):
        OSGD(amortize=0)
    with pytest.raises(ValueError, match="global"):
        OSGD(mode="per_tensor", amortize=3)
    with pytest.raises(ValueError, match="grad_method"):
        OSGD(grad_method="vmap")
    assert "osgd" in repr(build_rule("osgd")).lower()


@pytest.mark.parametrize(
    "module",
    ["anytrain.rules._osgd", "anytrain.rules._torchjd", "anytrain.rules._functional", "anytrain.rules._simple"],
)
def test_docstring_examples(module):
    import doctest
    import importlib

    mod = importlib.import_module(module)
    res = doctest.testmod(mod, extraglobs={"torch": torch, "nn": nn}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
