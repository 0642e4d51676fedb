"""Mixed precision, loss scaling and micro-batches through every rule and optimizer (``anytrain.train.precision``).

Three kinds of proof:

* scaling: multiplying every loss by 2^16 (the loss scale, handed to the rule) changes no rule's gradient once
  unscaled: bit for bit, since a power-of-two scale commutes with every rounding (no overflow here);
* fp16 with a scaler against float32: the update agrees within a tolerance derived below;
* accumulation: ``train.accumulate: 4`` reaches the weights of ``accumulate: 1`` (to float32 rounding) for every
  rule and optimizer where that is mathematically true, on a net without batch norm.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from anytrain.config import load_config
from anytrain.greedy import DGL, build_module_optimizers
from anytrain.nets import StagedNet
from anytrain.optim import CurvatureCorrected, build_optimizer
from anytrain.registry import ConfigError
from anytrain.rules import backward, build_rule
from anytrain.train import Trainer
from anytrain.train.trainer import data_from_config, optimizer_for

S = 2.0**16
U16 = 2.0**-11  # unit roundoff of float16

FAST = [
    "data.name=synthetic",
    "data.batch_size=32",
    "data.options.n_train=160",
    "data.options.n_test=64",
    "data.val_size=32",
    "model.name=cnn1d-exits",
    "model.width=4",
    "model.exits=3",
    "train.epochs=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
]
RULES = {
    "joint": {},
    "weighted": {"weights": [0.2, 0.3, 0.5]},
    "adaloss": {},
    "sdn": {},
    "gradient-equilibrium": {},
    "osgd": {},
    "osgd-amortized": {"name": "osgd", "amortize": 2},
    "osgd-per-tensor": {"name": "osgd", "mode": "per_tensor", "rescale": True},
    "torchjd-upgrad": {"name": "torchjd:UPGrad"},
    "torchjd-pcgrad": {"name": "torchjd:PCGrad"},
    "dgl": {},
    "sgl": {"modules": 1},
}
OPTIMIZERS = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
    "adam": {"lr": 0.01},
    "slbi": {"lr": 0.05, "kappa": 1.0, "nu": 10.0, "momentum": 0.9},
    "curvature": {"lr": 0.05, "alpha": 0.5, "damping": 0.1, "factor_every": 1, "inverse_every": 2},
}


def cfg(rule: str, opt: str = "sgd", *extra: str):
    r = dict(RULES[rule])
    name = r.pop("name", rule)
    sets = [*FAST, f"rule.name={name}", f"optimizer.name={opt}"]
    sets += [f"rule.{k}={json.dumps(v)}" for k, v in r.items()]
    sets += [f"optimizer.{k}={v}" for k, v in OPTIMIZERS[opt].items()]
    return load_config(None, sets + list(extra))


def plain_net(in_shape=(1, 16), classes=4, exits=3, width=6) -> StagedNet:
    """A staged 1-D CNN without batch norm (conv + ReLU stages, linear heads): micro-batches change nothing."""
    stages, heads, c = [], [], in_shape[0]
    for _ in range(exits):
        stages.append(nn.Sequential(nn.Conv1d(c, width, 3, padding=1), nn.ReLU()))
        heads.append(nn.Sequential(nn.Flatten(), nn.Linear(width * in_shape[1], classes)))
        c = width
    return StagedNet(stages, heads)


def components(config, net: StagedNet) -> dict:
    data = data_from_config(config)
    rule = build_rule(config.rule.name, **config.rule.kwargs())
    rule.bind(net)
    o = config.optimizer

    def factory(model, params):
        return build_optimizer(o.name, model, params, **o.kwargs())

    return {
        "device": torch.device("cpu"),
        "data": data,
        "net": net,
        "rule": rule,
        "optimizer": optimizer_for(rule, net, factory),
    }


# ---- scaling: every rule, 2^16 changes nothing once unscaled -------------------------------------------------
def _trunk_heads(seed=0):
    torch.manual_seed(seed)
    return plain_net(in_shape=(2, 8), classes=3, exits=3, width=5)


def _grads_via(rule_key: str, scale, steps: int = 2, dtype=None):
    """``.grad`` of every parameter after ``steps`` calls of the rule (on fresh batches), divided by the scale."""
    net = _trunk_heads()
    r = dict(RULES[rule_key])
    rule = build_rule(r.pop("name", rule_key), **r)
    rule.bind(net)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        net.zero_grad(set_to_none=True)
        x, y = torch.randn(16, 2, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = [nn.functional.cross_entropy(z, y).float() for z in rule.forward(net, x)]
        s = None if scale is None else torch.tensor(scale)
        rule.backward(net, losses, scale=s)
        out.append([p.grad / (1.0 if scale is None else scale) for p in net.parameters()])
    return out


@pytest.mark.parametrize("rule", [r for r in RULES if r not in ("dgl", "sgl")])
def test_a_loss_scale_of_2_16_changes_no_rule_once_unscaled(rule):
    # The rule gets the unscaled losses and s = 2^16; it backpropagates s×(its combination), divides the per-exit
    # gradients by s before a non-linear combination and multiplies back after. Every step is a multiplication by
    # a power of two, exact in floating point without overflow: equality is bitwise, over two steps (AdaLoss's
    # running averages and amortized OSGD's cached weights included).
    plain, scaled = _grads_via(rule, None), _grads_via(rule, S)
    for a_step, b_step in zip(plain, scaled):
        for a, b in zip(a_step, b_step):
            assert torch.equal(a, b), rule


def test_which_rules_commute_with_the_scale_and_which_do_not():
    # Why the rules are handed unscaled losses. OSGD's Gram–Schmidt and UPGrad are positively homogeneous of
    # degree 1 in G (OSGD's weights are a function of G Gᵀ invariant to G ↦ sG), so giving them s×losses yields
    # s×(the update): they would commute with the scale. AdaLoss is not: its weights 1/(Ē_k + ε) read the loss
    # values, and a running average over steps with different scales mixes the units. The unscaled path is exact
    # for all of them (previous test); this one shows the property that makes it necessary.
    net = _trunk_heads()
    batches = [(torch.randn(16, 2, 8), torch.randint(0, 3, (16,))) for _ in range(2)]
    for name, homogeneous in (("osgd", True), ("torchjd:UPGrad", True), ("adaloss", False)):
        results = []
        for scales in ((1.0, 1.0), (S, S / 4)):  # the second step with another scale, as after a backoff
            rule = build_rule(name)
            rule.bind(net)
            gs = []
            for k, (x, y) in zip(scales, batches):
                net.zero_grad(set_to_none=True)
                rule.backward(net, [nn.functional.cross_entropy(z, y) * k for z in net(x)])
                gs.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]) / k)
            results.append(gs)
        close = all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(*results))
        assert close == homogeneous, name


# ---- fp16 with a scaler against float32 ----------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["joint", "adaloss", "sdn", "gradient-equilibrium", "osgd", "torchjd-upgrad"])
def test_fp16_with_scaler_update_matches_float32_within_the_derived_tolerance(rule):
    # Tolerance. Under fp16 autocast every convolution and linear layer rounds its two operands to float16
    # (relative error ≤ u = 2^-11 each) and accumulates in float32; its backward does the same for the two
    # products it forms (input gradient and weight gradient). To first order the gradient of a parameter is then
    # the exact one with every matmul operand on its path perturbed by ≤ u: relative error ≤ (roundings on the
    # path) × u × (cancellation factor). The path through D = 3 stages and a head has 2(D+1) forward operands
    # and 2(D+1) backward ones: 16 roundings. The cancellation factor of a sum of n products of independent
    # random terms, Σ|a_i b_i| / |Σ a_i b_i|, is about √n (n ≤ 40 here): ≈ 6. The loss scale contributes nothing
    # (power-of-two scaling is exact) unless a gradient underflows in float16, which is what it prevents.
    # Normwise: ‖g16 − g32‖ ≤ 16 · 6 · u · ‖g32‖ ≈ 0.047 ‖g32‖. A non-linear combination (OSGD's Gram–Schmidt,
    # UPGrad's projection) multiplies the relative error by at most the condition number of the per-exit
    # gradient matrix G, measured here in float32. The update of SGD is −lr × gradient: the same bound.
    tol = 16 * 6 * U16
    net32 = _trunk_heads()
    net16 = copy.deepcopy(net32)
    r = dict(RULES[rule])
    name = r.pop("name", rule)
    x, y = torch.randn(32, 2, 8), torch.randint(0, 3, (32,))
    before = [p.detach().clone() for p in net32.parameters()]
    cond = 1.0
    deltas = []
    for net, fp16 in ((net32, False), (net16, True)):
        rule_obj = build_rule(name, **r)
        rule_obj.bind(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=fp16)
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            losses = [nn.functional.cross_entropy(z, y).float() for z in rule_obj.forward(net, x)]
        if not fp16 and name != "joint":
            trunk = [p for st in net.stages for p in st.parameters()]
            G = torch.stack(
                [
                    torch.cat(
                        [
                            g.reshape(-1)
                            for g in torch.autograd.grad(
                                l, trunk, retain_graph=True, allow_unused=True, materialize_grads=True
                            )
                        ]
                    )
                    for l in losses
                ]
            )
            sv = torch.linalg.svdvals(G)
            cond = float(sv[0] / sv[-1])
        rule_obj.backward(net, losses, scale=scaler.scale(torch.ones(())) if fp16 else None)
        scaler.step(opt)
        scaler.update()
        deltas.append(torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(net.parameters(), before)]))
    d32, d16 = deltas
    err = float((d16 - d32).norm() / d32.norm())
    bound = tol * (cond if name in ("osgd", "torchjd:UPGrad") else 1.0)
    assert err <= bound, f"{rule}: relative error {err:.2e} > derived bound {bound:.2e}"
    assert err > 0  # float16 did run: the two updates are not the same computation


# ---- a user's own loop: rules.backward and DGL().step with a GradScaler (docs/precision.md) --------------------
def test_user_loop_rules_backward_with_a_grad_scaler_equals_the_unscaled_call():
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 8), [nn.Linear(8, 3), nn.Linear(8, 3)]
    params = [*trunk.parameters(), *(p for h in heads for p in h.parameters())]
    twin = copy.deepcopy([trunk, *heads])
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.SGD(params, lr=0.1)
    h = trunk(x).relu()
    backward([nn.functional.cross_entropy(hd(h), y) for hd in heads], "osgd", shared=trunk.parameters(), scale=scaler)
    assert torch.equal(trunk.weight.grad / scaler.get_scale(), _osgd_grad(twin, x, y))  # .grad holds s × gradient
    scaler.step(opt)  # unscales, checks for infinities, steps
    scaler.update()
    expected = twin[0].weight.detach() - 0.1 * _osgd_grad(twin, x, y)
    assert torch.allclose(trunk.weight, expected, rtol=0, atol=1e-7)


def _osgd_grad(mods, x, y):
    trunk, *heads = mods
    trunk.zero_grad(set_to_none=True)
    h = trunk(x).relu()
    backward([nn.functional.cross_entropy(hd(h), y) for hd in heads], "osgd", shared=trunk.parameters())
    return trunk.weight.grad.clone()


def test_user_loop_dgl_step_with_one_scaler_per_module_matches_float32():
    net = plain_net()
    twin = copy.deepcopy(net)
    x, y = torch.randn(32, 1, 16), torch.randint(0, 4, (32,))
    outs = []
    for n, fp16 in ((net, True), (twin, False)):
        dgl = DGL()
        opts = build_module_optimizers(n, dgl.bind(n), lambda m, ps: torch.optim.SGD(ps, lr=0.1))
        scalers = [torch.amp.GradScaler("cpu") for _ in opts.optimizers] if fp16 else None
        losses, _, _ = dgl.step(n, x, y, opts, autocast=torch.float16 if fp16 else None, scalers=scalers)
        outs.append((losses, torch.cat([p.detach().reshape(-1) for p in n.parameters()])))
    (l16, w16), (l32, w32) = outs
    assert torch.allclose(l16, l32, rtol=16 * 6 * U16)
    assert torch.allclose(w16, w32, rtol=0, atol=1e-3) and not torch.equal(w16, w32)


# ---- skipped steps, scaler state in the checkpoint, resume bit-identical --------------------------------------
def _overflowing_scaler(tr: Trainer) -> None:
    # 2^24 times a loss gradient of order 1/B overflows float16 (max 65504): the first steps are skipped and the
    # scale backs off; growth every 3 steps makes the scale move in both directions.
    tr.amp.scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=3) for _ in tr.amp.scalers]


class Stop(Exception):
    pass


@pytest.mark.parametrize("rule", ["osgd", "dgl"])
def test_fp16_skips_non_finite_steps_counts_them_and_resumes_bit_identical(tmp_path, rule):
    c = cfg(rule, "sgd", "train.precision=fp16", "train.epochs=2")
    full = Trainer(c, tmp_path / "full")
    _overflowing_scaler(full)
    full.fit()
    hist = json.loads((tmp_path / "full" / "history.json").read_text())
    assert hist[0]["amp/skipped_steps"] >= 1 and all(math.isfinite(v) for v in hist[-1]["train_loss"])
    assert all(torch.isfinite(p).all() for p in full.net.parameters())
    part = Trainer(c, tmp_path / "part")
    _overflowing_scaler(part)
    orig = part._end_epoch

    def end_epoch(epoch, loss):
        orig(epoch, loss)
        raise Stop

    part._end_epoch = end_epoch
    with pytest.raises(Stop):
        part.fit()
    resumed = Trainer(c, tmp_path / "part", resume=True)  # default scalers: the checkpoint's state replaces them
    resumed.fit()
    for (k, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert [s.get_scale() for s in full.amp.scalers] == [s.get_scale() for s in resumed.amp.scalers]
    timing = ("seconds", "images_per_s", "cpu_seconds")  # measured times differ between any two runs

    def untimed(h: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if k not in timing} for e in h]

    assert untimed(json.loads((tmp_path / "part" / "history.json").read_text())) == untimed(hist)


# ---- accumulation: N micro-batches equal the large batch ------------------------------------------------------
ACC_TABLE = [(r, "sgd") for r in RULES if r != "adaloss"] + [
    ("osgd", "adam"),
    ("osgd", "slbi"),
    ("osgd", "curvature"),
    ("dgl", "curvature"),
    ("joint", "curvature"),
]


@pytest.mark.parametrize(("rule", "opt"), ACC_TABLE)
def test_accumulate_4_equals_the_large_batch(tmp_path, rule, opt):
    weights = []
    for n in (1, 4):
        c = cfg(rule, opt, f"train.accumulate={n}")
        torch.manual_seed(0)
        tr = Trainer(c, tmp_path / str(n), components=components(c, plain_net()))
        tr.fit()
        weights.append(torch.cat([p.detach().reshape(-1) for p in tr.net.parameters()]))
    # float32 sums in another order: differences of a few ulps per step, grown over 4 steps by the optimizer
    assert torch.allclose(weights[0], weights[1], rtol=1e-4, atol=1e-5), f"{rule}+{opt}"
    torch.manual_seed(0)
    init = torch.cat([p.detach().reshape(-1) for p in plain_net().parameters()])
    assert (weights[0] - init).norm() > 1e-3 * init.norm()  # it did train


def test_accumulate_with_batch_norm_differs_and_curvature_factors_are_the_large_batchs(tmp_path):
    # Batch norm normalises every micro-batch by its own statistics: not the large batch's step (documented).
    ws = []
    for n in (1, 4):
        torch.manual_seed(0)
        tr = Trainer(cfg("joint", "sgd", f"train.accumulate={n}"), tmp_path / str(n))
        tr.fit()
        ws.append(torch.cat([p.detach().reshape(-1) for p in tr.net.parameters()]))
    assert not torch.allclose(ws[0], ws[1], rtol=1e-4, atol=1e-5)
    # CurvatureCorrected counts the micro-batches (its Ĝ is then that of the whole batch)
    c = cfg("osgd", "curvature", "train.accumulate=4")
    tr = Trainer(c, tmp_path / "c", components=components(c, plain_net()))
    assert isinstance(tr.optimizer, CurvatureCorrected) and tr.optimizer.micro_batches == 4


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------------------
def _cli(args, capsys):
    from anytrain.cli import main

    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (["train.precision=fp8"], "train.precision must be one of fp32, bf16, fp16"),
        (["train.accumulate=0"], "train.accumulate must be >= 1"),
        (["train.accumulate=4", "rule.name=adaloss"], "adaloss"),
        (["train.channels_last=true"], "channels_last"),
        (["train.accumulate=3"], "must divide data.batch_size 32"),
    ],
)
def test_bad_speed_options_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, sets, words):
    out = tmp_path / "run"
    code, err = _cli(["train", *sum([["--set", s] for s in FAST + sets], []), "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_fp16_on_a_device_without_it_and_compile_without_a_compiler_are_config_errors(monkeypatch):
    from anytrain.train import precision

    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(ConfigError, match="train.precision fp16 is not available on cpu"):
        precision.check_precision("fp16", torch.device("cpu"))

    def broken(*a, **k):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ConfigError, match=r"^train.compile: torch.compile does not work on cpu here: InvalidCxx"):
        precision.check_compiler(torch.device("cpu"))


# ---- every rule × optimizer trains an epoch in bf16 and fp16 to finite metrics ---------------------------------
TABLE = [(r, o, p) for r in RULES for o in OPTIMIZERS for p in ("bf16", "fp16")]
FAST_ROWS = {
    ("osgd", "sgd", "fp16"),
    ("dgl", "curvature", "bf16"),
    ("torchjd-upgrad", "slbi", "fp16"),
    ("adaloss", "adam", "bf16"),
}


@pytest.mark.parametrize(
    ("rule", "opt", "prec"), [pytest.param(*row, marks=() if row in FAST_ROWS else pytest.mark.slow) for row in TABLE]
)
def test_every_rule_and_optimizer_trains_an_epoch_in_half_precision(tmp_path, rule, opt, prec):
    c = cfg(rule, opt, f"train.precision={prec}")
    m = Trainer(c, tmp_path).fit()
    hist = json.loads((tmp_path / "history.json").read_text())
    assert all(math.isfinite(v) for v in hist[-1]["train_loss"] + hist[-1]["val_acc"])
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in m["exits"])
    assert hist[-1].get("amp/skipped_steps", 0.0) < hist[-1]["step"]  # some steps were taken


# ---- compile and channels-last ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, from inside the compile toolchain
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")  # dynamo's tracing
def test_compile_does_not_recompile_after_the_first_epoch(tmp_path):
    from torch._dynamo.utils import counters

    from anytrain.train.precision import compile_report

    torch._dynamo.reset()
    c = cfg("osgd", "sgd", "train.compile=true", "train.epochs=3")
    tr = Trainer(c, tmp_path)
    counters.clear()  # not the compiler check's probe: only what training compiles
    seen = []
    orig = tr._end_epoch

    def end_epoch(epoch, loss):
        orig(epoch, loss)
        seen.append((int(counters["stats"]["unique_graphs"]), compile_report()))

    tr._end_epoch = end_epoch
    tr.fit()
    # every stage and head was compiled (training graphs, and again for evaluation), all in the first epoch
    assert seen[0][0] >= 2 * tr.net.num_exits and seen[0][0] == seen[-1][0], seen
    assert seen[0][1] == seen[-1][1] and seen[0][1].startswith("compile: ")


def test_channels_last_on_a_2d_net_matches_the_default_layout(tmp_path):
    ws = []
    for cl in ("false", "true"):
        c = cfg("joint", "sgd", "model.name=cnn2d-exits", "data.options.shape=[1,8,8]", f"train.channels_last={cl}")
        torch.manual_seed(0)
        tr = Trainer(c, tmp_path / cl)
        tr.fit()
        if cl == "true":
            conv = next(m for m in tr.net.modules() if isinstance(m, nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        ws.append(torch.cat([p.detach().reshape(-1) for p in tr.net.parameters()]))
    assert torch.allclose(ws[0], ws[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opt", ["slbi", "curvature", "adam"])
@pytest.mark.parametrize("rule", ["osgd", "joint"])
def test_optimizers_see_unscaled_gradients_and_statistics(rule, opt):
    # A GradScaler at 2^16 around a float32 forward: SLBI's Γ and z, CurvatureCorrected's Kronecker factors
    # (its output-gradient statistic Ĝ is divided by s², told through set_loss_scale) and Adam's moments equal
    # those of the unscaled run bit for bit: every difference would be a multiplication by a power of two.
    states = []
    for scaled in (False, True):
        net = _trunk_heads()
        r = build_rule(rule)
        r.bind(net)
        o = build_optimizer(opt, net, list(net.parameters()), **OPTIMIZERS[opt])
        scaler = torch.amp.GradScaler("cpu", init_scale=S, enabled=scaled)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            o.zero_grad(set_to_none=True)
            x, y = torch.randn(16, 2, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
            scale = scaler.scale(torch.ones(())) if scaled else None
            if isinstance(o, CurvatureCorrected):
                o.set_loss_scale(scale)
            r.backward(net, [nn.functional.cross_entropy(z, y) for z in r.forward(net, x)], scale=scale)
            scaler.step(o)
            scaler.update()
        states.append((copy.deepcopy(net.state_dict()), copy.deepcopy(o.state_dict()["state"])))
    (w0, s0), (w1, s1) = states
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    for i in s0:
        for key, v in s0[i].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, s1[i][key]), (i, key)


def test_a_skipped_step_leaves_curvature_statistics_and_weights_untouched():
    net = _trunk_heads()
    o = CurvatureCorrected(net, lr=0.1, factor_every=1, inverse_every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=S)
    x, y = torch.randn(16, 2, 8), torch.randint(0, 3, (16,))
    x[0, 0, 0] = float("inf")  # one bad sample: every gradient is NaN
    before = copy.deepcopy(net.state_dict())
    scale = scaler.scale(torch.ones(()))
    o.set_loss_scale(scale)
    build_rule("osgd").backward(net, [nn.functional.cross_entropy(z, y) for z in net(x)], scale=scale)
    scaler.unscale_(o)
    assert any(layer.captures for layer in o.layers)  # the statistics of this step hold NaN
    o.discard_captures()  # what the trainer does once it sees non-finite gradients
    scaler.step(o)  # skipped
    scaler.update()
    assert scaler.get_scale() == S / 2
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(not layer.captures for layer in o.layers) and not o.state and o.steps == 0


def test_a_run_written_before_the_speed_keys_existed_still_resumes(tmp_path):
    import yaml

    from anytrain.config import load_config as load
    from anytrain.train import load_checkpoint, save_checkpoint

    c = cfg("joint", "sgd", "train.epochs=2")
    tr = Trainer(c, tmp_path)
    orig = tr._end_epoch

    def end_epoch(epoch, loss):
        orig(epoch, loss)
        raise Stop

    tr._end_epoch = end_epoch
    with pytest.raises(Stop):
        tr.fit()
    # the files as an older anytrain wrote them: no train.precision / compile / channels_last / accumulate
    old = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for k in ("precision", "compile", "channels_last", "accumulate"):
        del old["train"][k]
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    ck["config"] = yaml.safe_dump(old)
    del ck["amp"]
    save_checkpoint(tmp_path / "checkpoint.pt", ck)
    first = (tmp_path / "config.yaml").read_text().splitlines()[0]
    (tmp_path / "config.yaml").write_text(first + "\n" + yaml.safe_dump(old))
    resumed = Trainer(load(tmp_path / "config.yaml"), tmp_path, resume=True)
    assert resumed.start_epoch == 1
    resumed.fit()
    # a key that does change the run is still refused
    with pytest.raises(ConfigError, match="train.precision"):
        Trainer(load(tmp_path / "config.yaml", ["train.precision=bf16"]), tmp_path, resume=True)
