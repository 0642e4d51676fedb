"""Shallow-Deep Networks' weighted loss (Kaya, Hong & Dumitras, ICML 2019): internal exits' weights ramp up over
training while the final exit keeps weight 1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from anytrain.rules._base import LossWeighting, Reduce

SDN_START = 0.01  # every internal exit's weight before the ramp (SDN's τ_i start)


class SDN(LossWeighting):
    """SDN weighting: ``∇ (L_{K−1} + Σ_{k<K−1} τ_k L_k)`` with each ``τ_k`` rising linearly to its cap ``C_k``.

    In epoch ``e`` (counted from 1) of ``E``, as in the released code,

    ::

        τ_k(e) = min(C_k, 0.01 + e · C_k / E)        for the internal exits k = 0..K−2;  the final exit: 1

    so ``τ_k`` reaches ``C_k`` in the last epoch. SDN places its six internal classifiers at 15 %, 30 %, …, 90 % of
    the network's cost and uses those fractions as caps (``C = 0.15, 0.3, …, 0.9``): the cap grows with the
    exit's relative depth. Here ``cap`` is

    * ``None`` (default): the relative position ``C_k = (k+1)/K`` of exit ``k`` among ``K`` exits;
    * a number: the same cap for every internal exit;
    * a list of ``K−1`` numbers: one cap per internal exit, earliest first (e.g. the exits' fractions of the
      final exit's multiply-adds, for SDN's own choice).

    The trainer advances the schedule through :meth:`on_epoch_start`; before the first call every internal weight
    is ``min(C_k, 0.01)``. Called outside the trainer (``anytrain.rules.backward``), advance it yourself with
    ``rule.on_epoch_start(epoch, epochs)`` (``epoch`` counted from 0). Weights are constant within an epoch, so
    the gradient is linear in the losses: data parallelism averages ``.grad`` afterwards, exactly.

    Example:
        >>> rule = SDN(cap=0.5)
        >>> rule.on_epoch_start(0, 4)
        >>> rule.weights(3)
        [0.135, 0.135, 1.0]

    Reference: Y. Kaya, S. Hong, T. Dumitras. Shallow-Deep Networks: Understanding and Mitigating Network
    Overthinking. ICML 2019 (Section 4.1; code github.com/yigitcankaya/Shallow-Deep-Networks, ``sdn_train``).
    """

    name = "sdn"

    def __init__(self, cap: float | Sequence[float] | None = None) -> None:
        if cap is None:
            self.cap: float | list[float] | None = None
        elif isinstance(cap, (int, float)) and not isinstance(cap, bool):
            self.cap = float(cap)
        elif isinstance(cap, (list, tuple)) and all(
            isinstance(c, (int, float)) and not isinstance(c, bool) for c in cap
        ):
            self.cap = [float(c) for c in cap]
        else:
            raise ValueError(f"sdn: cap must be a number or a list of numbers (one per internal exit), got {cap!r}")
        values = [] if self.cap is None else self.cap if isinstance(self.cap, list) else [self.cap]
        if any(not 0.0 <= c < float("inf") for c in values):
            raise ValueError(f"sdn: caps must be finite and >= 0, got {cap!r}")
        self.epoch = 0  # epochs started so far (SDN's e, counted from 1 inside an epoch)
        self.epochs = 1
        self._w: tuple[tuple[Any, ...], Tensor] | None = None  # the current weights on the losses' device

    def caps(self, num_exits: int) -> list[float]:
        """The caps ``C_k`` of the ``num_exits − 1`` internal exits."""
        n = num_exits - 1
        if self.cap is None:
            return [(k + 1) / num_exits for k in range(n)]
        if not isinstance(self.cap, list):
            return [self.cap] * n
        if len(self.cap) != n:
            raise ValueError(f"sdn: {len(self.cap)} caps given for {n} internal exits ({num_exits} exits)")
        return list(self.cap)

    def weights(self, num_exits: int) -> list[float]:
        """The current weights of all ``num_exits`` exits (the final exit's is 1)."""
        e, E = self.epoch, self.epochs
        return [min(c, SDN_START + e * c / E) for c in self.caps(num_exits)] + [1.0]

    def bind(self, net: nn.Module) -> None:
        self.caps(getattr(net, "num_exits", 1))

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if not 0 <= epoch < epochs:
            raise ValueError(f"sdn: epoch {epoch} out of range for {epochs} epochs")
        self.epoch, self.epochs = epoch + 1, epochs

    def total(self, losses: Tensor, reduce: Reduce | None) -> Tensor:
        key = (self.epoch, self.epochs, losses.numel(), losses.dtype, losses.device)
        if self._w is None or self._w[0] != key:  # once per epoch: no host-to-device copy in the other steps
            self._w = (key, torch.tensor(self.weights(losses.numel()), dtype=losses.dtype, device=losses.device))
        return (self._w[1] * losses).sum()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.epochs = int(state["epoch"]), int(state["epochs"])

    def extra_repr(self) -> str:
        return f"cap={self.cap}"
