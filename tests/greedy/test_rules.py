"""DGL and SGL procedures: gradient isolation, equivalence with backprop, freezing, optimizer wrapper."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from greedy_helpers import batches, small_net

from anytrain.greedy import DGL, SGL, GreedyProcedure, module_step
from anytrain.nets.modules import ModuleOptimizers, module_parameters, partition_stages
from anytrain.optim import build_optimizer
from anytrain.rules import build_rule
from anytrain.train.trainer import optimizer_for


def sgd_factory(lr: float = 0.05, momentum: float = 0.9):
    return lambda net, params: build_optimizer("sgd", net, params, lr=lr, momentum=momentum)


def train(net, rule, steps, data, factory=None, opt=None):
    opt = opt or optimizer_for(rule, net, factory or sgd_factory())
    for x, y in data[:steps]:
        if isinstance(rule, GreedyProcedure):
            rule.step(net, x, y, opt)
            continue
        opt.zero_grad(set_to_none=True)
        losses = [F.cross_entropy(z, y) for z in rule.forward(net, x)]
        rule.backward(net, losses)
        opt.step()
    return opt


def test_partition() -> None:
    assert partition_stages(4) == [[0], [1], [2], [3]]
    assert partition_stages(5, 3) == [[0, 1], [2, 3], [4]]
    assert partition_stages(3, [2, 1]) == [[0, 1], [2]]
    for bad in (0, 4, [1, 1], [0, 3]):
        with pytest.raises(ValueError):
            partition_stages(3, bad)


@pytest.mark.parametrize("modules", [None, 2])
def test_no_gradient_crosses_modules(modules) -> None:
    """Hooks on every stage output and every parameter record what each exit's loss reaches."""
    net = small_net(4)
    part = DGL(modules=modules).bind(net)
    reached: set[int] = set()

    def stage_hook(k):
        def fwd(mod, inp, out):
            if out.requires_grad:
                out.register_hook(lambda g: reached.add(k))

        return fwd

    handles = [net.stages[k].register_forward_hook(stage_hook(k)) for k in range(4)]
    x, y = batches(1)[0]
    state = x
    for j, stages in enumerate(part):
        reached.clear()
        net.zero_grad(set_to_none=True)
        opt = torch.optim.SGD(module_parameters(net, stages), lr=0.0)  # the step leaves the gradients in place
        state = module_step(net, stages, state, y, opt).output
        assert reached == set(stages), (j, reached)  # the loss of module j flows through its stages only
        mine = {id(p) for p in module_parameters(net, stages)}
        for p in net.parameters():
            if id(p) not in mine:
                assert p.grad is None
    for h in handles:
        h.remove()


def test_dgl_gradient_matches_independent_per_module_reference() -> None:
    """One backward of the summed losses equals, module by module, autograd of that module's loss alone on a
    detached input computed without grad."""
    net = small_net(3)
    x, y = batches(1)[0]
    ref = copy.deepcopy(net)
    rule = DGL()
    opts = optimizer_for(rule, net, lambda n, ps: torch.optim.SGD(ps, lr=0.0))  # lr 0: gradients stay to compare
    rule.step(net, x, y, opts)
    state = x
    for k in range(3):
        inp = state.detach()
        out = ref.stages[k](inp)
        params = list(ref.stages[k].parameters()) + list(ref.exits[k].parameters())
        grads = torch.autograd.grad(F.cross_entropy(ref.exits[k](out), y), params)
        mine = list(net.stages[k].parameters()) + list(net.exits[k].parameters())
        for g, p in zip(grads, mine):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
        state = out


def test_dgl_one_module_equals_backprop_step_for_step() -> None:
    data = batches(6)
    # one exit: the whole network must match exactly
    a, b = small_net(1), None
    b = copy.deepcopy(a)
    train(a, build_rule("dgl"), 6, data)
    train(b, build_rule("joint", last_only=True), 6, data)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    for s, t in zip(a.buffers(), b.buffers()):
        torch.testing.assert_close(s, t, rtol=0, atol=0)
    # three exits, one module: trunk and last head match backprop; inner heads are probes
    a = small_net(3)
    b = copy.deepcopy(a)
    train(a, build_rule("dgl", modules=1), 6, data)
    train(b, build_rule("joint", last_only=True), 6, data)
    for m, n in ((a.stages, b.stages), (a.exits[2], b.exits[2])):
        for p, q in zip(m.parameters(), n.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert all(torch.equal(p, q) is False for p, q in zip(a.exits[0].parameters(), b.exits[0].parameters()))


def test_module_optimizers_state_dict_round_trip_and_scheduler() -> None:
    data = batches(8)
    net = small_net(3)
    rule = build_rule("dgl")
    factory = lambda n, p: torch.optim.Adam(p, lr=1e-2)  # noqa: E731
    opt = train(net, rule, 4, data, factory)
    assert isinstance(opt, ModuleOptimizers) and len(opt.optimizers) == 3
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    train(net, rule, 8, data[4:], opt=opt)
    net2 = small_net(3)
    net2.load_state_dict(saved_net)
    rule2 = build_rule("dgl")
    opt2 = optimizer_for(rule2, net2, factory)
    opt2.load_state_dict(saved_opt)
    train(net2, rule2, 8, data[4:], opt=opt2)
    for p, q in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # the wrapper's groups are the inner optimizers' groups: a scheduler reaches every module
    sched = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** (s + 1))
    opt2.step()
    sched.step()
    assert [g["lr"] for o in opt2.optimizers for g in o.param_groups] == [1e-2 * 0.25] * 3
    assert len(opt2.state) == sum(len(o.state) for o in opt2.optimizers)
    with pytest.raises(ValueError, match="modules"):
        opt2.load_state_dict({"modules": [None]})


def test_sgl_phases_and_freezing() -> None:
    rule = SGL()
    net = small_net(3)
    rule.bind(net)
    assert rule.phases(7, 3) == [2, 2, 3]
    assert [rule.module_at(e, 7, 3) for e in range(7)] == [0, 0, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError):
        rule.phases(2, 3)
    opt = optimizer_for(rule, net, sgd_factory())
    data = batches(4)
    snap = copy.deepcopy(net.state_dict())

    def run_phase(epoch):
        rule.on_epoch_start(epoch, 3)
        net.train()
        for x, y in data:
            losses, stats, _ = rule.step(net, x, y, opt)
            assert losses.shape == (3,) and sorted(stats) == ["loss_active"]
            # later exits are not run: their losses are those of a uniform prediction, log C
            assert torch.allclose(losses[rule.active + 1 :], torch.tensor(4.0).log())

    run_phase(0)
    now = net.state_dict()
    changed = {k for k in now if not torch.equal(now[k], snap[k])}
    assert changed and all(k.startswith(("stages.0.", "exits.0.")) for k in changed)
    snap = copy.deepcopy(now)
    run_phase(1)  # module 0 frozen: weights *and* BN running statistics unchanged
    now = net.state_dict()
    changed = {k for k in now if not torch.equal(now[k], snap[k])}
    assert changed and all(k.startswith(("stages.1.", "exits.1.")) for k in changed)
    assert rule.state_dict() == {"active": 1, "epoch": 1}


def test_sgl_first_phase_equals_training_first_module_alone() -> None:
    data = batches(5)
    a = small_net(2)
    b = copy.deepcopy(a)
    sgl = build_rule("sgl")
    sgl.bind(a)
    sgl.on_epoch_start(0, 2)
    train(a, sgl, 5, data)
    opt = torch.optim.SGD(list(b.stages[0].parameters()) + list(b.exits[0].parameters()), lr=0.05, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(b.exits[0](b.stages[0](x)), y).backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["dgl", "sgl"])
def test_trainer_runs_greedy_rules_without_warnings(rule: str, tmp_path) -> None:
    from anytrain.config import load_config
    from anytrain.train import Trainer

    cfg = load_config(
        None,
        [
            "data.name=synthetic",
            "data.batch_size=64",
            "model.name=cnn1d-exits",
            "model.exits=3",
            "model.width=8",
            "model.head=conv1x1",
            f"rule.name={rule}",
            "train.epochs=3",
            "train.device=cpu",
            "train.progress=false",
            "train.tensorboard=false",
            "train.plots=false",
        ],
    )
    m = Trainer(cfg, tmp_path / "run").fit()
    assert m["rule"] == rule and len(m["exits"]) == 3
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in m["exits"])


def test_module_optimizers_scheduler_sees_the_module_steps_through_public_step() -> None:
    """An LR scheduler on the wrapper checks, on its first step, that the optimizer stepped first. The modules
    step through ``ModuleOptimizers.step(module=j)`` (public), so a DGL step satisfies it — and the check is
    live in this torch (the control below warns), so the test would catch a torch that changed it."""
    import warnings

    data = batches(2)
    net, ref = small_net(3), small_net(3)
    ref.load_state_dict(net.state_dict())
    rule, ref_rule = build_rule("dgl"), build_rule("dgl")
    rule.bind(net)
    ref_rule.bind(ref)
    opt, ref_opt = optimizer_for(rule, net, sgd_factory()), optimizer_for(ref_rule, ref, sgd_factory())
    assert isinstance(opt, ModuleOptimizers) and isinstance(ref_opt, ModuleOptimizers)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in data:
            rule.step(net, x, y, opt)
            sched.step()
    # same weights as stepping the module optimizers themselves (a list, no wrapper, no scheduler), lr halved
    for x, y in data:
        ref_rule.step(ref, x, y, ref_opt.optimizers)
        for g in ref_opt.param_groups:
            g["lr"] *= 0.5
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # step(module=j) steps module j only
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    before = [p.clone() for p in net.parameters()]
    opt.step(module=1)
    owned = {id(p) for g in opt.optimizers[1].param_groups for p in g["params"]}
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p, b) is (id(p) not in owned)
    # control: a scheduler stepped before its optimizer warns
    fresh = optimizer_for(build_rule("dgl"), small_net(3), sgd_factory())
    late = torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0)
    with pytest.warns(UserWarning, match="before `optimizer.step"):
        late.step()
