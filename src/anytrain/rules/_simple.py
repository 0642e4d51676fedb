"""Rules that combine exit losses into one scalar: one backward pass per step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from anytrain.rules._base import LossWeighting, Reduce


class Joint(LossWeighting):
    """Sum of the exit losses: ``∇ Σ_k L_k``. With ``last_only=True``, only the final exit's loss (backprop).

    Example:
        >>> w = torch.ones(3, requires_grad=True)
        >>> from anytrain.rules import backward
        >>> _ = backward([(w * 2).sum(), (w**2).sum()], "joint", shared=[w])
        >>> w.grad
        tensor([4., 4., 4.])
    """

    name = "joint"

    def __init__(self, last_only: bool = False) -> None:
        self.last_only = bool(last_only)

    def total(self, losses: Tensor, reduce: Reduce | None) -> Tensor:
        return losses[-1] if self.last_only else losses.sum()

    def trained_exits(self, num_exits: int) -> list[int]:
        return [num_exits - 1] if self.last_only else list(range(num_exits))

    def extra_repr(self) -> str:
        return f"last_only={self.last_only}"


class Weighted(LossWeighting):
    """Fixed weights: ``∇ Σ_k w_k L_k``. The weight vector is built once per device and dtype of the losses
    and then reused, so a step makes no host-to-device copy."""

    name = "weighted"

    def __init__(self, weights: Sequence[float]) -> None:
        w = [float(v) for v in weights]
        if not w or any(v < 0 for v in w) or sum(w) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {w}")
        self.weights = w
        self._w: Tensor | None = None  # ``weights`` as a tensor where the losses live (built on first use)

    def weight_tensor(self, like: Tensor) -> Tensor:
        """The weights on ``like``'s device and dtype; built only when those change."""
        w = self._w
        if w is None or w.device != like.device or w.dtype != like.dtype:
            w = self._w = torch.tensor(self.weights, dtype=like.dtype, device=like.device)
        return w

    def trained_exits(self, num_exits: int) -> list[int]:
        return [k for k, v in enumerate(self.weights[:num_exits]) if v > 0]

    def bind(self, net: nn.Module) -> None:
        k = getattr(net, "num_exits", 1)
        if len(self.weights) != k:
            raise ValueError(f"rule 'weighted' has {len(self.weights)} weights but the network has {k} exits")

    def total(self, losses: Tensor, reduce: Reduce | None) -> Tensor:
        if len(self.weights) != losses.numel():
            raise ValueError(f"rule 'weighted' has {len(self.weights)} weights for {losses.numel()} losses")
        return (self.weight_tensor(losses) * losses).sum()

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


class AdaLoss(LossWeighting):
    """Adaptive loss balancing (Hu, Dey, Hebert & Bagnell, AAAI 2019).

    Each exit's weight is inversely proportional to a running average of its loss,
    ``w_k ∝ 1 / (Ē_k + eps)``, with ``Ē_k ← β Ē_k + (1-β) L_k`` (bias-corrected as in Adam). This is the
    gradient of ``Σ_k log Ē_k`` and keeps every exit's relative error improving at the same rate. Weights are
    normalised to mean 1 so the step size stays comparable to ``joint``. The averages stay on the device: no
    host synchronisation per step. The object keeps the averages across calls.
    """

    name = "adaloss"

    def __init__(self, beta: float = 0.99, eps: float = 1e-8) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.avg: Tensor | None = None
        self.steps = 0

    def accumulate_error(self) -> str | None:
        # Ē_k is updated with the step's loss before the weights are applied, so every micro-batch's backward
        # would need the large batch's loss first: equal only by keeping all n graphs (or a second forward).
        return "its weights need the whole batch's losses before any backward (set train.accumulate: 1)"

    def weights(self) -> Tensor:
        assert self.avg is not None
        corr = 1.0 - self.beta**self.steps
        inv = 1.0 / (self.avg / corr + self.eps)
        return inv * (inv.numel() / inv.sum())

    def total(self, losses: Tensor, reduce: Reduce | None) -> Tensor:
        d = losses.detach().clone()
        if reduce is not None:
            d = reduce(d)  # data-parallel: every rank averages the same (global) losses
        if self.avg is None:
            self.avg = torch.zeros_like(d)
        elif self.avg.shape != d.shape:
            raise ValueError(f"adaloss keeps averages of {self.avg.numel()} losses, got {d.numel()}")
        self.avg.mul_(self.beta).add_(d, alpha=1.0 - self.beta)
        self.steps += 1
        return (self.weights() * losses).sum()

    def state_dict(self) -> dict[str, Any]:
        return {"avg": None if self.avg is None else self.avg.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.avg = state["avg"]
        self.steps = int(state["steps"])

    def extra_repr(self) -> str:
        return f"beta={self.beta}"
