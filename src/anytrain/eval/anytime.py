"""Anytime evaluation: accuracy and FLOPs per exit, area under the accuracy-vs-FLOPs curve, deadline
inference and confidence-threshold early exit."""

from __future__ import annotations

from collections.abc import Sequence
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


@dataclass
class ConfidencePoint:
    threshold: float
    accuracy: float
    mean_flops: float
    exit_histogram: list[int]


def confidence_exit(
    logits: Tensor,
    y: Tensor,
    stage_flops: Sequence[int],
    head_flops: Sequence[int],
    thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
) -> list[ConfidencePoint]:
    """Early exit at the first exit whose max softmax probability is ≥ τ (the last exit otherwise).

    The cost of stopping at exit ``k`` is stages ``0..k`` plus heads ``0..k`` (every earlier head had to be
    evaluated to decide not to stop there).
    """
    K = logits.shape[0]
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)  # (K, N)
    cost = torch.tensor(stage_flops, dtype=torch.float64).cumsum(0) + torch.tensor(
        head_flops, dtype=torch.float64
    ).cumsum(0)
    correct = pred == y[None]
    out = []
    for tau in thresholds:
        ok = conf >= tau
        ok[-1] = True
        first = ok.float().argmax(0)  # index of first True per sample
        acc = correct.gather(0, first[None]).float().mean().item()
        out.append(
            ConfidencePoint(float(tau), acc, cost[first].mean().item(), torch.bincount(first, minlength=K).tolist())
        )
    return out
