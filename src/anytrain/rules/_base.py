"""The gradient-rule interface: how per-exit losses become parameter gradients.

A rule never steps parameters; it only fills ``p.grad``. The optimizer (any ``torch.optim.Optimizer``: SGD,
Adam, SLBI, curvature-corrected) then applies the step. That seam is what lets every rule compose with every
optimizer.

Rules come in three kinds:

* :class:`LossWeighting` — the gradient of a weighted sum of the losses (``joint``, ``weighted``, ``adaloss``):
  one backward pass, linear in the losses.
* :class:`GradientWeighting` — a combination of the per-exit gradients of the shared parameters (OSGD, every
  TorchJD aggregator): the one per-exit gradient pipeline of ``anytrain.rules._pergrad`` computes the ``K×P``
  matrix ``G``, the rule maps it to a direction (:meth:`GradientWeighting.aggregate`), the pipeline writes
  ``.grad``. Nothing else differs between OSGD and its peers.
* rules that need their own forward pass (amortized OSGD): they only work through ``rule.forward(net, x)`` then
  ``rule.backward(net, losses)`` on a :class:`~anytrain.nets.StagedNet`, and say so when called any other way.

DGL and SGL are not rules: they step one optimizer per module, so they are procedures over (blocks, heads) in
``anytrain.greedy``.

Two ways to call a rule:

* on any model, in any loop: ``anytrain.rules.backward(losses, rule, shared=params)`` (``_functional.py``);
* on a staged network (the trainer does this), per batch::

      logits = rule.forward(net, x)                  # list, one per exit
      losses = [criterion(z, y) for z in logits]     # one scalar per exit
      stats = rule.backward(net, losses)             # fills .grad; returns tensors for logging (no host sync)
      optimizer.step()

  where the shared parameters are the stages' and each exit head gets its own exit's gradient.

Data parallelism: both take an explicit ``reduce=`` (a function that averages a flat tensor over the ranks in
place, ``anytrain.train.distributed.average_``); on return, everything the call added to ``.grad`` is the rank
average. A gradient weighting averages ``G`` and the head gradients *before* combining them (the combination is
non-linear); a loss weighting averages the losses its weights depend on (AdaLoss), then its gradients, which are
linear in the losses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from anytrain.rules._pergrad import (
    ExitPartition,
    backward_averaged,
    exit_partition,
    per_exit_grads,
    reduce_per_exit,
    write_flat,
)

Reduce = Callable[[Tensor], Tensor]
#: Training procedures that are not gradient rules (``anytrain.greedy``), named in the errors of a call that
#: treats them as rules.
PROCEDURES = {"dgl": "DGL", "sgl": "SGL"}


def procedure_error(name: str) -> ValueError:
    """The one-line error for a greedy procedure used where a gradient rule is expected."""
    cls = PROCEDURES.get(name, name)
    return ValueError(
        f"{name} is a training procedure over blocks and heads, not a gradient rule: it runs its own forward pass "
        f"and steps one optimizer per module; call anytrain.greedy.{cls}().step(net, x, y, optimizers) on an "
        "anytrain.nets.StagedNet (or use rule: {name: " + name + "} with anytrain train)"
    )


class GradientRule(ABC):
    """Base class. Subclasses set ``name`` and implement :meth:`combine` (and, if needed, the other hooks)."""

    name: str = "rule"

    def needs_forward(self) -> str | None:
        """Why this rule cannot work from the losses alone (``None`` when it can): a one-line reason, used by
        ``anytrain.rules.backward`` to refuse the call."""
        return None

    def bind(self, net: nn.Module) -> None:
        """Called once by the trainer before training; check the net (number of exits, ...) here."""

    def trained_exits(self, num_exits: int) -> list[int]:
        """The exits whose losses this rule trains on (all, unless a rule ignores some): the trainer selects
        ``best.pt`` on their mean validation accuracy, so a run is judged on what it trains."""
        return list(range(num_exits))

    def forward(self, net: nn.Module, x: Tensor) -> list[Tensor]:
        out = net(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def backward(self, net: nn.Module, losses: Sequence[Tensor], *, reduce: Reduce | None = None) -> dict[str, Tensor]:
        """Accumulate gradients of the per-exit ``losses`` of ``net`` into ``p.grad``; return tensors worth
        logging. ``net`` is a staged network (or, for loss weightings, any module). ``reduce``: see the module
        docstring (data parallelism)."""
        check_losses_for(net, losses, self)
        return self.combine(list(losses), None, net=net, reduce=reduce)

    @abstractmethod
    def combine(
        self,
        losses: list[Tensor],
        part: ExitPartition | None,
        *,
        net: nn.Module | None = None,
        reduce: Reduce | None = None,
    ) -> dict[str, Tensor]:
        """Fill ``.grad`` from validated scalar ``losses``. ``part`` says which parameters are shared and which
        belong to which exit (``None``: take it from ``net``)."""

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """The training-progress hook, called by the trainer at the start of every epoch (``epoch`` counts from 0
        of ``epochs``): for rules whose weights follow a schedule over epochs."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class LossWeighting(GradientRule):
    """A rule whose gradient is ``∇ Σ_k w_k L_k``: one backward pass. Subclasses give :meth:`total`."""

    @abstractmethod
    def total(self, losses: Tensor, reduce: Reduce | None) -> Tensor:
        """The scalar ``Σ_k w_k L_k`` to differentiate, from the K-vector of ``losses`` (weights constant).
        ``reduce`` averages anything the weights depend on over the ranks (the losses, for AdaLoss)."""

    def combine(
        self,
        losses: list[Tensor],
        part: ExitPartition | None,
        *,
        net: nn.Module | None = None,
        reduce: Reduce | None = None,
    ) -> dict[str, Tensor]:
        total = self.total(torch.stack(losses), reduce)
        if reduce is None:
            total.backward()
        elif part is not None:  # functional call: exactly the parameters the losses reach
            backward_averaged(total, part.trunk + part.head_params(), reduce)
        else:
            assert net is not None
            backward_averaged(total, net.parameters(), reduce)
        return {"loss": total.detach()}


class GradientWeighting(GradientRule):
    """A rule that maps the ``K×P`` per-exit gradients of the shared parameters to one direction.

    The per-exit gradients come from the one pipeline (``anytrain.rules._pergrad``): one truncated backward per
    exit (``grad_method="loop"``) or one batched backward (``"batched"``); each exit head gets its own exit's
    gradient. Subclasses implement :meth:`aggregate`.
    """

    grad_method: str = "loop"

    def __init__(self) -> None:
        self._part: ExitPartition | None = None
        self._part_key: tuple[int, int] | None = None

    def bind(self, net: nn.Module) -> None:
        self.net_partition(net, getattr(net, "num_exits", 1))

    def net_partition(self, net: nn.Module, K: int) -> ExitPartition:
        """The partition of a staged net (cached): stages shared, each head its exit's own."""
        key = (id(net), K)
        if self._part is None or self._part_key != key:
            self._part = exit_partition(net, K, self.name)
            self._part_key = key
        return self._part

    @abstractmethod
    def aggregate(self, G: Tensor, part: ExitPartition) -> tuple[Tensor, dict[str, Tensor]]:
        """The trunk direction (a P-vector) from the per-exit gradients ``G`` (``K×P``) and extra stats."""

    def combine(
        self,
        losses: list[Tensor],
        part: ExitPartition | None,
        *,
        net: nn.Module | None = None,
        reduce: Reduce | None = None,
    ) -> dict[str, Tensor]:
        if part is None:
            assert net is not None
            part = self.net_partition(net, len(losses))
        total = torch.stack([l.detach() for l in losses]).sum()
        G, head_grads = per_exit_grads(losses, part, self.grad_method)
        if reduce is not None:  # data parallel: combine the rank-averaged G, not an average of combinations
            G, head_grads = reduce_per_exit(reduce, G, head_grads)
        direction, stats = self.aggregate(G, part)
        write_flat(part, direction, head_grads)
        return {"loss": total, **stats}


def scalar_losses(losses: Sequence[Tensor]) -> Tensor:
    """Stack per-exit scalar losses into a K-vector (validating that each is a scalar)."""
    if isinstance(losses, Tensor) or len(losses) == 0:
        raise ValueError("losses must be a non-empty list of scalar tensors, one per exit (earliest first)")
    for k, l in enumerate(losses):
        if not isinstance(l, Tensor) or l.dim() != 0:
            shape = tuple(l.shape) if isinstance(l, Tensor) else type(l).__name__
            raise ValueError(f"loss of exit {k} must be a scalar tensor, got {shape}")
    return torch.stack(list(losses))


def check_losses_for(net: Any, losses: Sequence[Tensor], rule: GradientRule) -> None:
    """One-line errors for ``rule.backward(net, losses)`` called with something other than a module and one
    scalar loss per exit."""
    if not isinstance(net, nn.Module):
        raise ValueError(
            f"{rule.name}.backward(net, losses) takes the network (an nn.Module), got {type(net).__name__}; "
            "for a list of shared parameters call anytrain.rules.backward(losses, rule, shared=params)"
        )
    scalar_losses(losses)
    k = getattr(net, "num_exits", None)
    if k is not None and len(losses) != k:
        raise ValueError(f"got {len(losses)} losses for a network with {k} exits (one loss per exit)")
