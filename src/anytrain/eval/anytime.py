"""Anytime evaluation: accuracy and FLOPs per exit, area under the accuracy-vs-FLOPs curve, deadline
inference, and budgeted classification (confidence thresholds fitted on validation for an average budget)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from anytrain.nets.staged import StagedNet


@torch.no_grad()
def exit_logits(net: StagedNet, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Logits of every exit for every sample, shape ``(K, N, C)``, computed in eval mode with one forward pass
    per batch (all exits share it)."""
    was = net.training
    net.eval()
    try:
        dev = next(net.parameters()).device
        outs = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(dev, non_blocking=True)
            outs.append(torch.stack([z.float() for z in net(xb)]).cpu())
        return torch.cat(outs, dim=1)
    finally:
        net.train(was)


def accuracy_per_exit(logits: Tensor, y: Tensor) -> list[float]:
    """Fraction of correct top-1 predictions per exit; ``logits`` is ``(K, N, C)``."""
    return (logits.argmax(-1) == y.to(logits.device)[None]).float().mean(1).tolist()


def anytime_auc(flops: Sequence[float], accuracy: Sequence[float]) -> float:
    """Area under the anytime accuracy-vs-FLOPs curve, normalised to [0, 1].

    With a budget ``b`` (FLOPs as a fraction of the final exit's), the anytime prediction is the deepest exit
    that fits, and accuracy is 0 before the first exit. The area of this step function over ``b ∈ [0, 1]`` is
    1 only for a network whose first exit is free and perfect; it rewards early, accurate exits.
    """
    if len(flops) != len(accuracy) or not flops:
        raise ValueError("flops and accuracy must be non-empty and of equal length")
    total = float(flops[-1])
    if total <= 0:
        return float(accuracy[-1])
    area, best = 0.0, 0.0
    edges = [f / total for f in flops] + [1.0]
    for k in range(len(flops)):
        best = max(best, float(accuracy[k]))  # a later, worse exit is never chosen over an earlier better one
        area += best * (edges[k + 1] - edges[k])
    return area


def deadline_exit(flops: Sequence[int], budget: float) -> int:
    """Index of the deepest exit whose cumulative FLOPs fit in ``budget``."""
    fits = [k for k, f in enumerate(flops) if f <= budget]
    if not fits:
        raise ValueError(f"budget {budget:g} FLOPs is below the first exit's cost {flops[0]}")
    return fits[-1]


@torch.no_grad()
def deadline_predict(net: StagedNet, x: Tensor, budget: float, flops: Sequence[int] | None = None) -> Tensor:
    """Predictions of the deepest exit that fits a per-sample FLOPs budget; runs only the stages it needs.

    ``flops`` is ``net.flops_per_exit(input_shape)``; pass it when calling repeatedly (counting runs the net).
    """
    if flops is None:
        flops = net.flops_per_exit(tuple(x.shape[1:]))
    k = deadline_exit(flops, budget)
    was = net.training
    net.eval()
    try:
        return net.forward_exit(x, k).argmax(-1)
    finally:
        net.train(was)


@torch.no_grad()
def exit_scores(net: StagedNet, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Top softmax probability and top-1 correctness of every exit on every sample: ``(conf, correct)``, each
    ``(K, N)`` on the CPU (float32 / bool). One eval-mode forward per batch serves all exits, and only these
    two numbers per exit and sample are kept, so memory does not grow with the number of classes."""
    was = net.training
    net.eval()
    try:
        dev = next(net.parameters()).device
        confs, oks = [], []
        for x, y in batches:
            logits = torch.stack([z.float() for z in net(x.to(dev, non_blocking=True))])
            conf, pred = logits.softmax(-1).max(-1)
            confs.append(conf.cpu())
            oks.append((pred == y.to(dev)[None]).cpu())
        K = net.num_exits
        if not confs:
            return torch.empty(K, 0), torch.empty(K, 0, dtype=torch.bool)
        return torch.cat(confs, 1), torch.cat(oks, 1)
    finally:
        net.train(was)


def exit_costs(stage_flops: Sequence[int], head_flops: Sequence[int]) -> list[float]:
    """Multiply-adds spent on a sample that stops at exit ``k`` under early exit: stages ``0..k`` plus heads
    ``0..k`` (every earlier head was evaluated to decide not to stop there)."""
    s = torch.tensor(stage_flops, dtype=torch.float64).cumsum(0)
    h = torch.tensor(head_flops, dtype=torch.float64).cumsum(0)
    return (s + h).tolist()


# A threshold no top softmax probability reaches (they are <= 1): "never stop at this exit".
NEVER = 2.0


def early_exit(conf: Tensor, thresholds: Sequence[float]) -> Tensor:
    """Exit index per sample: the first ``k < K - 1`` with ``conf[k] >= thresholds[k]``, else ``K - 1``."""
    K = conf.shape[0]
    if len(thresholds) != K - 1:
        raise ValueError(f"need {K - 1} thresholds (one per exit but the last), got {len(thresholds)}")
    tau = torch.tensor([*thresholds, -1.0], dtype=conf.dtype).reshape(K, 1)
    return (conf >= tau).float().argmax(0)  # the last row is all True, so argmax finds the first True


@dataclass
class EarlyExitResult:
    accuracy: float
    mean_flops: float
    exit_histogram: list[int]


def evaluate_thresholds(
    conf: Tensor, correct: Tensor, thresholds: Sequence[float], costs: Sequence[float]
) -> EarlyExitResult:
    """Accuracy, mean multiply-adds and exit counts of confidence early exit with ``thresholds``."""
    first = early_exit(conf, thresholds)
    if first.numel() == 0:
        return EarlyExitResult(float("nan"), float("nan"), [0] * conf.shape[0])
    acc = correct.gather(0, first[None]).double().mean().item()
    cost = torch.tensor(costs, dtype=torch.float64)[first].mean().item()
    return EarlyExitResult(acc, cost, torch.bincount(first, minlength=conf.shape[0]).tolist())


def geometric_counts(n: int, num_exits: int, p: float) -> list[int]:
    """How many of ``n`` samples stop at each exit when exit ``k`` takes a share ``∝ p^k`` (MSDNet's
    budgeted-classification assumption); ``p = 0`` sends all to the first exit, ``p = inf`` to the last.
    Rounded on the cumulative shares, so the counts sum to ``n``."""
    if p == 0:
        share = [1.0] + [0.0] * (num_exits - 1)
    elif math.isinf(p):
        share = [0.0] * (num_exits - 1) + [1.0]
    else:  # p^k / sum_j p^j, computed relative to the largest term so neither tiny nor huge p overflows
        logs = [k * math.log(p) for k in range(num_exits)]
        top = max(logs)
        w = [math.exp(v - top) for v in logs]
        share = [v / sum(w) for v in w]
    cum = [round(n * sum(share[: k + 1])) for k in range(num_exits)]
    cum[-1] = n
    return [cum[0]] + [cum[k] - cum[k - 1] for k in range(1, num_exits)]


def thresholds_for_counts(conf: Tensor, counts: Sequence[int]) -> list[float]:
    """Thresholds under which ``counts[k]`` samples stop at exit ``k`` (more only where confidences tie):
    exit by exit, the threshold is the ``counts[k]``-th largest confidence among the samples still running."""
    K, n = conf.shape
    running = torch.ones(n, dtype=torch.bool)
    out: list[float] = []
    for k in range(K - 1):
        c = conf[k][running]
        if counts[k] == 0 or c.numel() == 0:
            out.append(NEVER)
            continue
        tau = float(torch.topk(c, min(int(counts[k]), c.numel())).values[-1])
        out.append(tau)
        running &= conf[k] < tau
    return out


GEOMETRIC_P = (0.0, *[10 ** (e / 40) for e in range(-120, 121)], math.inf)


@dataclass
class BudgetFit:
    budget: float
    thresholds: list[float]
    p: float
    val: EarlyExitResult


def fit_budget(
    conf: Tensor, correct: Tensor, costs: Sequence[float], budget: float, ps: Sequence[float] = GEOMETRIC_P
) -> BudgetFit:
    """Confidence thresholds for an average budget of ``budget`` multiply-adds per sample, fitted on the
    validation scores ``conf``/``correct`` (``(K, N)``, from :func:`exit_scores`).

    As in MSDNet's budgeted classification, the exits are assumed to take geometric shares ``∝ p^k`` of the
    samples; for each ``p`` in ``ps`` the thresholds that realise those shares on the validation set follow
    from its confidences (:func:`thresholds_for_counts`). Of the candidates whose validation mean cost is
    within ``budget``, the most accurate on validation wins (ties: the cheaper). Raises ``ValueError`` when
    even stopping every sample at the first exit costs more than ``budget``.
    """
    if budget < costs[0]:
        raise ValueError(f"budget {budget:,.0f} MACs/sample is below the first exit's cost {costs[0]:,.0f}")
    K, n = conf.shape
    if n == 0:
        raise ValueError("no validation samples: thresholds cannot be fitted (data.val_size is 0)")
    best: BudgetFit | None = None
    for p in ps:
        tau = thresholds_for_counts(conf, geometric_counts(n, K, p))
        r = evaluate_thresholds(conf, correct, tau, costs)
        if r.mean_flops > budget + 1e-9 * budget:
            continue
        if best is None or (r.accuracy, -r.mean_flops) > (best.val.accuracy, -best.val.mean_flops):
            best = BudgetFit(float(budget), tau, float(p), r)
    if best is None:  # p = 0 costs exactly costs[0] <= budget, so only a custom ``ps`` gets here
        raise ValueError(f"no candidate exit distribution fits {budget:,.0f} MACs/sample on validation")
    return best


def budgeted_curve(
    val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], costs: Sequence[float], budgets: Sequence[float]
) -> list[dict[str, object]]:
    """For each budget: thresholds fitted on ``val`` (:func:`fit_budget`), then applied once to ``test``.
    Each entry: ``budget``, ``thresholds``, ``p``, ``val`` and ``test`` (accuracy, mean_flops, exit_histogram)."""
    out = []
    for b in budgets:
        fit = fit_budget(*val, costs, b)
        t = evaluate_thresholds(*test, fit.thresholds, costs)
        out.append(
            {"budget": fit.budget, "thresholds": fit.thresholds, "p": fit.p, "val": vars(fit.val), "test": vars(t)}
        )
    return out


def default_budgets(costs: Sequence[float], n: int = 8) -> list[float]:
    """``n`` average budgets evenly spaced from the first exit's cost to the last's."""
    lo, hi = float(costs[0]), float(costs[-1])
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]
