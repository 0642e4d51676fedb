"""Anytime metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from anytrain.eval import accuracy_per_exit, anytime_auc, deadline_exit, evaluate_thresholds, exit_costs


def test_auc_step_function_by_hand():
    # exits at 25%, 50%, 100% of the cost with accuracies .5, .7, .9:
    # 0 on [0,.25), .5 on [.25,.5), .7 on [.5,1), and .9 at exactly 1 (measure zero)
    assert anytime_auc([25, 50, 100], [0.5, 0.7, 0.9]) == pytest.approx(0.5 * 0.25 + 0.7 * 0.5)
    # a worse later exit is never preferred
    assert anytime_auc([50, 100], [0.8, 0.6]) == pytest.approx(0.8 * 0.5)
    assert 0.0 <= anytime_auc([10, 20, 30], [1.0, 1.0, 1.0]) <= 1.0


def test_deadline_exit_picks_deepest_that_fits():
    f = [10, 30, 70]
    assert deadline_exit(f, 10) == 0 and deadline_exit(f, 69) == 1 and deadline_exit(f, 1e9) == 2
    with pytest.raises(ValueError, match="below the first exit"):
        deadline_exit(f, 5)


def test_early_exit_by_hand():
    # 2 exits, 3 samples, 2 classes
    logits = torch.tensor([[[3.0, 0.0], [0.0, 0.1], [0.0, 4.0]], [[0.0, 3.0], [0.0, 5.0], [5.0, 0.0]]])
    y = torch.tensor([0, 1, 0])
    assert accuracy_per_exit(logits, y) == pytest.approx([2 / 3, 2 / 3])  # exit 0 predicts 0,1,1
    conf, pred = logits.softmax(-1).max(-1)
    costs = exit_costs(stage_flops=[10, 20], head_flops=[1, 2])
    assert costs == [11, 33]
    pt = evaluate_thresholds(conf, pred == y, [0.9], costs)
    # sample 0: exit 0 conf .95 → correct; sample 1: exit 0 conf .52 → exit 1 correct; sample 2: exit 0 conf .98 wrong
    assert pt.exit_histogram == [2, 1]
    assert pt.accuracy == pytest.approx(2 / 3)
    assert pt.mean_flops == pytest.approx((11 + 11 + 33) / 3)


def test_deadline_predict_runs_only_needed_stages():
    from torch import nn

    from anytrain.eval import deadline_predict
    from anytrain.nets import StagedNet

    calls = []

    class Probe(nn.Linear):
        def forward(self, x):
            calls.append(self.out_features)
            return super().forward(x)

    net = StagedNet([Probe(4, 5), Probe(5, 6), Probe(6, 7)], [nn.Linear(5, 3), nn.Linear(6, 3), nn.Linear(7, 3)])
    flops = net.flops_per_exit((4,))
    x = torch.randn(8, 4)
    calls.clear()
    pred = deadline_predict(net, x, budget=flops[1], flops=flops)
    assert calls == [5, 6]  # stage 2 never ran
    assert torch.equal(pred, net(x)[1].argmax(-1))
