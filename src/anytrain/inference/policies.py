"""Early-exit policies: when does a sample stop?

A policy is the *decision* only: given exit ``k``'s logits for the samples still running, it says which of them
stop there. The loop that runs stages on the undecided rows is :class:`~anytrain.inference.AnytimePredictor`.
Every policy answers at the last exit it runs (``last_exit``) for whatever is left.

==============  =====================================================================================
``max-prob``    stop at exit ``k < K−1`` when the top softmax probability is ≥ ``thresholds[k]``
``entropy``     stop when ``1 − H(p)/ln C`` (1: one-hot, 0: uniform) is ≥ ``thresholds[k]``
``budget``      ``max-prob`` with thresholds fitted on the validation split for an average MAC budget
                (:func:`anytrain.eval.fit_budget`, MSDNet's budgeted classification)
``patience``    PABEE: stop at exit ``k`` once the prediction has stayed the same ``patience`` times in a
                row (exits ``k−patience..k`` agree); ``patience=0`` stops everything at exit 0
``deadline``    one fixed exit for every sample; only stages ``0..exit`` and that one head run
==============  =====================================================================================

Thresholds are in ``[0, 1]``, or :data:`anytrain.eval.NEVER` (2.0: never stop at that exit), one per exit but the
last. Comparisons are made in float32, as :func:`anytrain.eval.early_exit` makes them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from anytrain.eval.anytime import NEVER, fit_budget

Carry = Any  # per-row policy state (a tensor, a tuple of tensors, or None); rows are gathered with the states


class Policy(ABC):
    """The decision of an early-exit predictor (see the module docstring)."""

    name: ClassVar[str]

    def check(self, num_exits: int) -> None:
        """A one-line ``ValueError`` when the policy does not fit a network with ``num_exits`` exits."""

    def last_exit(self, num_exits: int) -> int:
        """The exit where every remaining sample stops (the loop runs no stage after it)."""
        return num_exits - 1

    def runs_head(self, k: int, num_exits: int) -> bool:
        """Whether exit ``k``'s head is evaluated (a deadline evaluates only its own)."""
        return True

    def start(self, n: int, device: torch.device) -> Carry:
        """Per-row state before exit 0, for ``n`` samples."""
        return None

    @abstractmethod
    def decide(self, k: int, logits: Tensor, carry: Carry) -> tuple[Tensor, Carry]:
        """Which rows stop at exit ``k`` (a bool tensor over the rows of ``logits``), and the carry after it."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description; :func:`policy_from_dict` rebuilds the policy from it."""


def _check_thresholds(name: str, thresholds: Sequence[float]) -> list[float]:
    try:
        taus = [float(t) for t in thresholds]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: thresholds must be a list of numbers, got {thresholds!r}") from None
    for i, t in enumerate(taus):
        if not (0.0 <= t <= 1.0 or t == NEVER):
            raise ValueError(f"{name}: threshold {i} is {t}, expected a number in [0, 1] (or {NEVER}: never stop)")
    return taus


class ThresholdPolicy(Policy):
    """Stop at exit ``k < K−1`` when ``confidence(logits) >= thresholds[k]``."""

    def __init__(self, thresholds: Sequence[float]) -> None:
        self.thresholds = _check_thresholds(self.name, thresholds)
        self._tau = torch.tensor(self.thresholds, dtype=torch.float32)

    def check(self, num_exits: int) -> None:
        if len(self.thresholds) != num_exits - 1:
            raise ValueError(
                f"{self.name}: got {len(self.thresholds)} thresholds, expected {num_exits - 1} "
                f"(one per exit but the last, for {num_exits} exits)"
            )

    @abstractmethod
    def confidence(self, logits: Tensor) -> Tensor:
        """Per-row confidence in ``[0, 1]`` (float32)."""

    def decide(self, k: int, logits: Tensor, carry: Carry) -> tuple[Tensor, Carry]:
        return self.confidence(logits) >= self._tau[k].to(logits.device), carry

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "thresholds": self.thresholds}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(thresholds={self.thresholds})"


class MaxProb(ThresholdPolicy):
    """Confidence: the top softmax probability (SDN's and MSDNet's early exit)."""

    name = "max-prob"

    def confidence(self, logits: Tensor) -> Tensor:
        return logits.float().softmax(-1).max(-1).values


class Entropy(ThresholdPolicy):
    """Confidence: ``1 − H(p)/ln C``, the normalised negative entropy of the softmax (1: one-hot, 0: uniform)."""

    name = "entropy"

    def confidence(self, logits: Tensor) -> Tensor:
        logp = logits.float().log_softmax(-1)
        h = -(logp.exp() * logp).sum(-1)
        c = logits.shape[-1]
        return 1.0 - h / math.log(c) if c > 1 else torch.ones_like(h)


class Budget(MaxProb):
    """``max-prob`` with thresholds fitted for an average budget of ``budget`` MACs per sample (use :meth:`fit`)."""

    name = "budget"

    def __init__(self, thresholds: Sequence[float], budget: float) -> None:
        super().__init__(thresholds)
        if not (math.isfinite(float(budget)) and float(budget) > 0):
            raise ValueError(f"budget: expected a finite, positive number of MACs per sample, got {budget}")
        self.budget = float(budget)

    @classmethod
    def fit(cls, conf: Tensor, correct: Tensor, costs: Sequence[float], budget: float) -> Budget:
        """Thresholds fitted on validation scores ``conf``/``correct`` (``(K, N)``, :func:`anytrain.eval.exit_scores`)
        for ``budget`` MACs per sample on average, with per-exit early-exit ``costs``
        (:func:`anytrain.eval.exit_costs`)."""
        if not (math.isfinite(float(budget)) and float(budget) > 0):
            raise ValueError(f"budget: expected a finite, positive number of MACs per sample, got {budget}")
        return cls(fit_budget(conf, correct, costs, float(budget)).thresholds, budget)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "budget": self.budget}


class Patience(Policy):
    """PABEE's patience rule: stop at exit ``k`` when exits ``k−patience..k`` all predict the same class."""

    name = "patience"

    def __init__(self, patience: int) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience: expected a whole number >= 0, got {patience!r}")
        self.patience = patience

    def check(self, num_exits: int) -> None:
        if self.patience > num_exits - 1:
            raise ValueError(f"patience: got {self.patience}, expected at most {num_exits - 1} for {num_exits} exits")

    def start(self, n: int, device: torch.device) -> Carry:
        return (torch.full((n,), -1, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.long, device=device))

    def decide(self, k: int, logits: Tensor, carry: Carry) -> tuple[Tensor, Carry]:
        prev, count = carry
        label = logits.argmax(-1)
        count = torch.where(label == prev, count + 1, torch.zeros_like(count))
        return count >= self.patience, (label, count)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "patience": self.patience}

    def __repr__(self) -> str:
        return f"Patience(patience={self.patience})"


class Deadline(Policy):
    """Every sample answers at exit ``exit``: stages ``0..exit`` and head ``exit`` run, nothing else."""

    name = "deadline"

    def __init__(self, exit: int) -> None:
        if isinstance(exit, bool) or not isinstance(exit, int) or exit < 0:
            raise ValueError(f"deadline: expected an exit index >= 0, got {exit!r}")
        self.exit = exit

    def check(self, num_exits: int) -> None:
        if self.exit > num_exits - 1:
            raise ValueError(f"deadline: exit {self.exit} out of range, expected 0..{num_exits - 1}")

    def last_exit(self, num_exits: int) -> int:
        return self.exit

    def runs_head(self, k: int, num_exits: int) -> bool:
        return k == self.exit

    def decide(self, k: int, logits: Tensor, carry: Carry) -> tuple[Tensor, Carry]:
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device), carry

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "exit": self.exit}

    def __repr__(self) -> str:
        return f"Deadline(exit={self.exit})"


POLICIES = ("max-prob", "entropy", "budget", "patience", "deadline")


def make_policy(
    name: str,
    *,
    thresholds: Sequence[float] | None = None,
    patience: int | None = None,
    exit: int | None = None,
    budget: float | None = None,
) -> Policy:
    """A policy by name with its one parameter (``budget`` with ``thresholds``: already fitted ones)."""
    need = {"max-prob": "thresholds", "entropy": "thresholds", "budget": "thresholds", "patience": "patience"}
    need["deadline"] = "exit"
    if name not in need:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    given = {"thresholds": thresholds, "patience": patience, "exit": exit}
    if given[need[name]] is None:
        raise ValueError(f"policy {name!r} needs {need[name]}=...")
    if name == "max-prob":
        return MaxProb(thresholds or [])
    if name == "entropy":
        return Entropy(thresholds or [])
    if name == "budget":
        if budget is None:
            raise ValueError("policy 'budget' needs budget=... (the average MACs per sample it was fitted for)")
        return Budget(thresholds or [], budget)
    if name == "patience":
        return Patience(int(patience) if isinstance(patience, float) and patience.is_integer() else patience)  # type: ignore[arg-type]
    return Deadline(exit)  # type: ignore[arg-type]


def policy_from_dict(d: Any) -> Policy:
    """Rebuild a policy from :meth:`Policy.to_dict` (a one-line ``ValueError`` on anything else)."""
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise ValueError(f"policy: expected an object with a name, got {d!r}")
    extra = set(d) - {"name", "thresholds", "patience", "exit", "budget"}
    if extra:
        raise ValueError(f"policy: unknown keys {sorted(extra)}")
    return make_policy(
        d["name"],
        thresholds=d.get("thresholds"),
        patience=d.get("patience"),
        exit=d.get("exit"),
        budget=d.get("budget"),
    )


__all__ = [
    "POLICIES",
    "Budget",
    "Deadline",
    "Entropy",
    "MaxProb",
    "Patience",
    "Policy",
    "ThresholdPolicy",
    "make_policy",
    "policy_from_dict",
]
