"""AnytimePredictor equals the simulation from all-exit logits, sample for sample, and really stops computing."""

from __future__ import annotations

import math

import pytest
import torch
from inference_helpers import NETS, reference, safe_thresholds, shape_of
from torch import nn

from anytrain.eval import early_exit, exit_costs, fit_budget
from anytrain.inference import AnytimePredictor, Budget, Deadline, Entropy, MaxProb, Patience
from anytrain.nets import StagedNet


def _entropy_conf(logits: torch.Tensor) -> torch.Tensor:
    """Reference: 1 − H/ln C from torch.distributions (not the library's code path)."""
    h = torch.distributions.Categorical(logits=logits.double()).entropy()
    return (1 - h / math.log(logits.shape[-1])).float()


def _patience_exits(labels: torch.Tensor, t: int) -> torch.Tensor:
    """Reference: PABEE's counter, sample by sample in plain Python."""
    K, n = labels.shape
    out = []
    for i in range(n):
        count, prev, stop = 0, None, K - 1
        for k in range(K):
            count = count + 1 if prev is not None and labels[k, i] == prev else 0
            prev = labels[k, i]
            if count >= t:
                stop = k
                break
        out.append(stop)
    return torch.tensor(out)


class _Counter:
    """Rows each stage and head ran on, recorded with forward pre-hooks."""

    def __init__(self, net: StagedNet) -> None:
        self.stage = [0] * net.num_exits
        self.head = [0] * net.num_exits
        self.handles = [
            net.stages[k].register_forward_pre_hook(self._hook(self.stage, k)) for k in range(net.num_exits)
        ]
        self.handles += [net.exits[k].register_forward_pre_hook(self._hook(self.head, k)) for k in range(net.num_exits)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    @staticmethod
    def _hook(store: list[int], k: int):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple) -> None:
            leaves = torch.utils._pytree.tree_flatten(args[0])[0]
            store[k] += int(leaves[0].shape[0])

        return hook


def _check(net: StagedNet, x: torch.Tensor, policy, ref_exits: torch.Tensor, logits: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    K, n = logits.shape[:2]
    stage_macs, head_macs = net.flops_breakdown(tuple(x.shape[1:]))
    pred = AnytimePredictor(net, policy, input_shape=x.shape[1:])
    counter = _Counter(net)
    try:
        p = pred.predict(x)
    finally:
        counter.remove()
    assert p.exits.tolist() == ref_exits.tolist()
    rows = torch.arange(n)
    assert p.labels.tolist() == logits[ref_exits, rows].argmax(-1).tolist()
    torch.testing.assert_close(p.logits, logits[ref_exits, rows], atol=1e-5, rtol=1e-5)
    # really stops: stage k ran on exactly the samples that left at k or later (the deadline: every sample)
    last = policy.exit if isinstance(policy, Deadline) else K - 1
    assert counter.stage == [int((ref_exits >= k).sum()) if k <= last else 0 for k in range(K)]
    if isinstance(policy, Deadline):
        assert counter.head == [n if k == last else 0 for k in range(K)]
        per_exit = [sum(stage_macs[: k + 1]) + head_macs[k] for k in range(K)]
    else:
        assert counter.head == counter.stage
        per_exit = exit_costs(stage_macs, head_macs)
    # MACs: per sample, the stages and heads on its row; in total, what the hooks saw times the per-sample cost
    assert p.macs.tolist() == [int(per_exit[e]) for e in ref_exits.tolist()]
    seen = sum(c * m for c, m in zip(counter.stage, stage_macs)) + sum(c * m for c, m in zip(counter.head, head_macs))
    assert int(p.macs.sum()) == seen


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("n", [1, 1500])
def test_threshold_policies_equal_the_simulation(name: str, n: int) -> None:
    net = NETS[name]().eval()
    x = torch.randn(n, *shape_of(name))
    logits = reference(net, x)
    probe = reference(net, torch.randn(400, *shape_of(name)))  # thresholds from other samples
    conf = probe.softmax(-1).max(-1).values
    for q in (0.3, 0.7):
        taus = safe_thresholds(conf, q)
        _check(net, x, MaxProb(taus), early_exit(logits.softmax(-1).max(-1).values, taus), logits)
    taus = safe_thresholds(_entropy_conf(probe), 0.5)
    _check(net, x, Entropy(taus), early_exit(_entropy_conf(logits), taus), logits)


@pytest.mark.parametrize("name", list(NETS))
def test_patience_and_deadline_equal_the_simulation(name: str) -> None:
    net = NETS[name]().eval()
    x = torch.randn(700, *shape_of(name))
    logits = reference(net, x)
    K = logits.shape[0]
    for t in range(K):
        _check(net, x, Patience(t), _patience_exits(logits.argmax(-1), t), logits)
    for d in range(K):
        _check(net, x, Deadline(d), torch.full((700,), d), logits)
    _check(net, x[:1], Patience(1), _patience_exits(logits[:, :1].argmax(-1), 1), logits[:, :1])


@pytest.mark.parametrize("name", ["nested-width", "msdnet"])
def test_budget_policy_is_the_validation_fit_and_equals_the_simulation(name: str) -> None:
    net = NETS[name]().eval()
    shape = shape_of(name)
    xv, yv = torch.randn(600, *shape), torch.randint(0, 5, (600,))
    costs = exit_costs(*net.flops_breakdown(shape))
    budget = (costs[0] + costs[-1]) / 2
    pred = AnytimePredictor(net, "budget", budget=budget, val=(xv, yv))
    # the reference fit from scores computed here, independently of anytrain.eval.exit_scores
    lv = reference(net, xv)
    conf, lab = lv.softmax(-1).max(-1)
    fit = fit_budget(conf, lab == yv[None], costs, budget)
    assert isinstance(pred.policy, Budget) and pred.policy.budget == budget
    assert pred.policy.thresholds == pytest.approx(fit.thresholds, abs=1e-6)
    x = torch.randn(900, *shape)
    logits = reference(net, x)
    taus = pred.policy.thresholds
    _check(net, x, pred.policy, early_exit(logits.softmax(-1).max(-1).values, taus), logits)
    # on the validation split itself the realised mean cost is within the budget
    p = pred.predict(xv)
    assert float(p.macs.double().mean()) <= budget * (1 + 1e-9)


def test_chunks_give_the_same_answer_and_training_mode_is_restored() -> None:
    net = NETS["nested-width"]()
    net.train()
    x = torch.randn(257, 1, 40)
    pol = MaxProb([0.5, 0.6])
    a = AnytimePredictor(net, pol).predict(x)
    b = AnytimePredictor(net, pol).predict(x, batch_size=64)
    assert net.training
    assert torch.equal(a.exits, b.exits) and torch.equal(a.labels, b.labels) and torch.equal(a.macs, b.macs)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(policy="max-prob", thresholds=[0.5]), r"got 1 thresholds, expected 2"),
        (dict(policy="max-prob", thresholds=[0.5, 1.5]), r"threshold 1 is 1.5, expected a number in \[0, 1\]"),
        (dict(policy="entropy", thresholds=[0.5, float("nan")]), r"threshold 1 is nan"),
        (dict(policy="patience", patience=3), r"expected at most 2"),
        (dict(policy="patience", patience=-1), r"expected a whole number >= 0"),
        (dict(policy="deadline", exit=3), r"expected 0..2"),
        (dict(policy="greedy"), r"unknown policy 'greedy'"),
        (dict(policy="budget", budget=1e5), r"needs budget=... and val="),
    ],
)
def test_bad_policy_arguments_are_one_line_errors(kw: dict, match: str) -> None:
    net = NETS["nested-width"]()
    with pytest.raises(ValueError, match=match) as e:
        AnytimePredictor(net, **kw)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors_naming_the_expected_value() -> None:
    net = NETS["nested-width"]()
    pred = AnytimePredictor(net, "deadline", exit=1, input_shape=(1, 40))
    for x, match in [
        (torch.randn(3, 1, 41), r"shape \(3, 1, 41\), expected \(N, 1, 40\)"),
        (torch.randn(3, 1, 40, dtype=torch.float64), r"dtype torch.float64, expected torch.float32"),
        (torch.zeros(0, 1, 40), "no samples"),
    ]:
        with pytest.raises(ValueError, match=match) as e:
            pred.predict(x)
        assert "\n" not in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["nested-width-depth", "msdnet", "own"])
def test_cuda_equals_the_simulation(name: str) -> None:
    net = NETS[name]().eval().cuda()
    x = torch.randn(1000, *shape_of(name), device="cuda")
    logits = reference(net, x)
    taus = safe_thresholds(logits.softmax(-1).max(-1).values.cpu(), 0.5)
    p = AnytimePredictor(net, MaxProb(taus)).predict(x)
    ref = early_exit(logits.softmax(-1).max(-1).values.cpu(), taus)
    assert p.exits.device.type == "cuda" and p.exits.cpu().tolist() == ref.tolist()
    assert p.labels.cpu().tolist() == logits.cpu()[ref, torch.arange(1000)].argmax(-1).tolist()
    q = AnytimePredictor(net, Patience(1)).predict(x)
    assert q.exits.cpu().tolist() == _patience_exits(logits.argmax(-1).cpu(), 1).tolist()
