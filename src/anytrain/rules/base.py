"""The gradient-rule interface: how per-exit losses become parameter gradients.

A rule never steps parameters; it only fills ``p.grad``. The optimizer (any ``torch.optim.Optimizer``: SGD,
Adam, SLBI, curvature-corrected) then applies the step. That seam is what lets every rule compose with every
optimizer.

The trainer calls, per batch::

    logits = rule.forward(net, x)                  # list, one per exit (a rule may detach between stages)
    losses = [criterion(z, y) for z in logits]     # one scalar per exit
    stats = rule.backward(net, losses)             # fills .grad; returns tensors for logging (no host sync)
    optimizer.step()

and ``rule.on_epoch_start(epoch, epochs)`` before each epoch. Rules that keep state (running averages,
a step counter) expose it through ``state_dict``/``load_state_dict`` so resumed runs are exact.

Data parallelism (``anytrain.train.distributed``): after ``backward`` the trainer averages every ``.grad`` over
the ranks, which is exact for rules *linear* in the per-exit losses. A rule that combines per-exit gradients
*non-linearly* (OSGD, TorchJD aggregators) must average them *before* combining::

    G, head_grads = per_exit_grads(...)
    if self.reducer is not None:                       # set by the trainer; None when not distributed
        G, *flat_heads = self.reduce_tensors([G, *heads])   # one all-reduce for all of them
    self.reduces_own_grads = self.reducer is not None  # per step: the trainer skips its own .grad average

and a rule whose state depends on the losses (AdaLoss) feeds ``self.reduce(losses.detach())`` into it, so the
state is identical on every rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class GradientRule(ABC):
    """Base class. Subclasses set ``name`` and override ``backward`` (and, if needed, the other hooks)."""

    name: str = "rule"
    #: Averages a tensor over the data-parallel ranks in place and returns it; set by the trainer, ``None`` when
    #: not distributed.
    reducer: Callable[[Tensor], Tensor] | None = None
    #: Set by ``backward`` (per step) when it already averaged everything it wrote into ``.grad`` via
    #: :meth:`reduce_tensors`; the trainer then does not average ``.grad`` again.
    reduces_own_grads: bool = False

    def bind(self, net: nn.Module) -> None:
        """Called once by the trainer before training; check the net (number of exits, ...) here."""

    def forward(self, net: nn.Module, x: Tensor) -> list[Tensor]:
        out = net(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    @abstractmethod
    def backward(self, net: nn.Module, losses: Sequence[Tensor]) -> dict[str, Tensor]:
        """Accumulate gradients of the per-exit ``losses`` into ``p.grad``; return tensors worth logging."""

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Hook for rules with a schedule over epochs (sequential greedy learning)."""

    def make_optimizer(self, net: nn.Module, factory: OptimizerFactory) -> torch.optim.Optimizer:
        """Build the optimizer(s). ``factory(net, params)`` builds one optimizer over ``params``.

        Rules that need one optimizer per module (decoupled greedy learning) override this.
        """
        return factory(net, [p for p in net.parameters() if p.requires_grad])

    def reduce(self, t: Tensor) -> Tensor:
        """``t`` averaged over the data-parallel ranks (in place); ``t`` itself when not distributed."""
        return t if self.reducer is None else self.reducer(t)

    def reduce_tensors(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Average several tensors over the ranks with one collective call: flatten into one buffer, reduce,
        return views of it shaped like the inputs (the inputs themselves when not distributed)."""
        if self.reducer is None or not tensors:
            return list(tensors)
        flat = self.reducer(torch.cat([t.reshape(-1) for t in tensors]))
        return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def scalar_losses(losses: Sequence[Tensor]) -> Tensor:
    """Stack per-exit scalar losses into a K-vector (validating that each is a scalar)."""
    if len(losses) == 0:
        raise ValueError("no exit losses given")
    for k, l in enumerate(losses):
        if l.dim() != 0:
            raise ValueError(f"loss of exit {k} must be a scalar, got shape {tuple(l.shape)}")
    return torch.stack(list(losses))
