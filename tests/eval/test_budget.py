"""Budgeted classification: thresholds fitted on validation, checked against brute-force searches."""

from __future__ import annotations

import itertools

import pytest
import torch

from anytrain.eval import (
    NEVER,
    budgeted_curve,
    evaluate_thresholds,
    fit_budget,
    geometric_counts,
    thresholds_for_counts,
)


def simulate(conf: torch.Tensor, correct: torch.Tensor, taus: list[float], costs: list[float]) -> tuple[float, float]:
    """Per-sample loop, independent of the vectorised code: (accuracy, mean cost)."""
    K, n = conf.shape
    hits, spent = 0, 0.0
    for i in range(n):
        k = next((k for k in range(K - 1) if conf[k, i] >= taus[k]), K - 1)
        hits += bool(correct[k, i])
        spent += costs[k]
    return hits / n, spent / n


def scores(K: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    conf = 0.3 + 0.7 * torch.rand(K, n, generator=g)  # distinct values (ties have probability 0)
    correct = torch.rand(K, n, generator=g) < conf  # confident exits are right more often
    return conf, correct


@pytest.mark.parametrize("n,K,p", [(10, 3, 0.5), (7, 4, 1.0), (5, 2, 3.0), (9, 3, 0.0), (9, 3, float("inf"))])
def test_geometric_counts(n, K, p):
    c = geometric_counts(n, K, p)
    assert sum(c) == n and min(c) >= 0
    if p == 0:
        assert c[0] == n
    elif p == float("inf"):
        assert c[-1] == n
    else:  # within rounding of n * p^k / sum_j p^j
        w = [p**k for k in range(K)]
        for k in range(K):
            assert abs(sum(c[: k + 1]) - n * sum(w[: k + 1]) / sum(w)) <= 0.5 + 1e-9


def test_thresholds_realise_the_counts():
    conf, _ = scores(4, 40, 0)
    for counts in ([10, 10, 10, 10], [0, 5, 30, 5], [40, 0, 0, 0], [3, 0, 0, 37]):
        taus = thresholds_for_counts(conf, counts)
        hist = [0] * 4
        for i in range(40):  # independent per-sample simulation
            k = next((k for k in range(3) if conf[k, i] >= taus[k]), 3)
            hist[k] += 1
        assert hist == counts


@pytest.mark.parametrize("seed", range(4))
def test_two_exits_fit_equals_brute_force_optimum(seed):
    """With two exits the geometric family reaches every split of the samples, so the fit must match the
    best of *all* thresholds (searched exhaustively over the observed confidences) within each budget."""
    conf, correct = scores(2, 7, seed)
    costs = [10.0, 50.0]
    candidates = sorted(set(conf[0].tolist())) + [NEVER]
    for budget in (10.0, 20.0, 27.0, 33.0, 41.0, 50.0):
        best = max(
            simulate(conf, correct, [t], costs)[0]
            for t in candidates
            if simulate(conf, correct, [t], costs)[1] <= budget + 1e-9
        )
        fit = fit_budget(conf, correct, costs, budget)
        assert fit.val.accuracy == pytest.approx(best)
        assert fit.val.mean_flops <= budget + 1e-9
        assert simulate(conf, correct, fit.thresholds, costs) == pytest.approx((fit.val.accuracy, fit.val.mean_flops))


def test_three_exits_fit_is_best_of_family_and_bounded_by_brute_force():
    conf, correct = scores(3, 6, 7)
    costs = [5.0, 12.0, 30.0]
    grid = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, float("inf")]
    cands = [sorted(set(conf[k].tolist())) + [NEVER] for k in range(2)]
    for budget in (5.0, 9.0, 15.0, 22.0, 30.0):
        fit = fit_budget(conf, correct, costs, budget, ps=grid)
        acc, cost = simulate(conf, correct, fit.thresholds, costs)
        assert (acc, cost) == pytest.approx((fit.val.accuracy, fit.val.mean_flops)) and cost <= budget + 1e-9
        # best over the same family, recomputed by hand: counts -> thresholds by sorting -> simulation
        family = []
        for p in grid:
            counts, taus, left = geometric_counts(6, 3, p), [], list(range(6))
            for k in range(2):
                ranked = sorted(left, key=lambda i: -float(conf[k, i]))
                taus.append(float(conf[k, ranked[counts[k] - 1]]) if counts[k] else NEVER)
                left = ranked[counts[k] :]
            a, c = simulate(conf, correct, taus, costs)
            if c <= budget + 1e-9:
                family.append(a)
        assert fit.val.accuracy == pytest.approx(max(family))
        # and never better than the exhaustive optimum over all threshold pairs
        opt = max(
            a
            for a, c in (simulate(conf, correct, list(t), costs) for t in itertools.product(*cands))
            if c <= budget + 1e-9
        )
        assert fit.val.accuracy <= opt + 1e-12


def test_budget_errors_and_test_is_only_evaluated():
    conf, correct = scores(3, 20, 1)
    costs = [5.0, 12.0, 30.0]
    with pytest.raises(ValueError, match="below the first exit"):
        fit_budget(conf, correct, costs, 4.0)
    with pytest.raises(ValueError, match="no validation samples"):
        fit_budget(conf[:, :0], correct[:, :0], costs, 10.0)
    test = scores(3, 20, 2)
    (pt,) = budgeted_curve((conf, correct), test, costs, [15.0])
    fit = fit_budget(conf, correct, costs, 15.0)
    assert pt["thresholds"] == fit.thresholds  # chosen on validation alone
    assert pt["test"] == vars(evaluate_thresholds(*test, fit.thresholds, costs))
