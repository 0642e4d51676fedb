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

Loss scaling (float16 with ``torch.amp.GradScaler``): both take ``scale=`` (the current loss scale ``s``, a
0-d tensor, power of two). The losses passed in stay *unscaled*, so whatever a rule computes from them (AdaLoss's
running averages) sees the true values; the rule backpropagates ``s × (its combination)`` so that float16
activation gradients do not underflow, and leaves ``s × (its gradient)`` in ``.grad``, exactly what
``scaler.scale(loss).backward()`` leaves: ``scaler.unscale_`` / ``scaler.step`` then see and skip non-finite
steps as usual. A gradient weighting divides the per-exit gradients by ``s`` *before* it combines them (exact:
``s`` is a power of two) and multiplies the direction by ``s`` after, so the aggregator sees the float32 gradients
whatever its homogeneity (OSGD, UPGrad, PCGrad, MGDA, CAGrad are positively homogeneous of degree 1 and would
commute with the scale; NashMTL, which is homogeneous of degree 0 in ``G``, and AdaLoss, whose weights read the
loss values, would not). Per-exit gradients that are not finite become a NaN direction (the aggregator is given
zeros instead, so no solver sees an infinity), which the scaler then skips.

Micro-batches (gradient accumulation): ``micro=(i, n)`` says this is micro-batch ``i`` of ``n`` of one step, each
loss the mean over its micro-batch. Loss weightings with constant weights backpropagate ``(1/n) × total`` each
time (the gradient of the large batch's mean loss, by linearity); gradient weightings add up the per-exit
gradients and combine them once, after the last micro-batch, so they combine the large batch's ``G``. A rule whose
result is not a function of the large batch's gradients says why in :meth:`GradientRule.accumulate_error`.
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

    def accumulate_error(self) -> str | None:
        """Why ``n`` micro-batches per step would not give this rule's large-batch update (``None``: they do)."""
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

    def backward(
        self,
        net: nn.Module,
        losses: Sequence[Tensor],
        *,
        reduce: Reduce | None = None,
        scale: Tensor | None = None,
        micro: tuple[int, int] = (0, 1),
    ) -> dict[str, Tensor]:
        """Accumulate gradients of the per-exit ``losses`` of ``net`` into ``p.grad``; return tensors worth
        logging. ``net`` is a staged network (or, for loss weightings, any module). ``reduce``, ``scale`` and
        ``micro``: see the module docstring (data parallelism, loss scaling, micro-batches)."""
        check_losses_for(net, losses, self)
        return self.combine(list(losses), None, net=net, reduce=reduce, scale=scale, micro=micro)

    @abstractmethod
    def combine(
        self,
        losses: list[Tensor],
        part: ExitPartition | None,
        *,
        net: nn.Module | None = None,
        reduce: Reduce | None = None,
        scale: Tensor | None = None,
        micro: tuple[int, int] = (0, 1),
    ) -> dict[str, Tensor]:
        """Fill ``.grad`` from validated scalar ``losses``. ``part`` says which parameters are shared and which
        belong to which exit (``None``: take it from ``net``)."""

    def _check_micro(self, micro: tuple[int, int]) -> None:
        i, n = micro
        if not 0 <= i < n:
            raise ValueError(f"micro-batch index {i} out of range for {n} micro-batches")
        why = self.accumulate_error() if n > 1 else None
        if why is not None:
            raise ValueError(f"rule {self.name!r} cannot accumulate micro-batches: {why}")

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
        scale: Tensor | None = None,
        micro: tuple[int, int] = (0, 1),
    ) -> dict[str, Tensor]:
        self._check_micro(micro)
        total = self.total(torch.stack(losses), reduce)  # from the unscaled losses: the weights see true values
        seed = total if micro[1] == 1 else total / micro[1]
        if scale is not None:
            seed = seed * scale
        if reduce is None:
            seed.backward()
        elif part is not None:  # functional call: exactly the parameters the losses reach
            backward_averaged(seed, part.trunk + part.head_params(), reduce)
        else:
            assert net is not None
            backward_averaged(seed, net.parameters(), reduce)
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
        self._acc: tuple[Tensor, list[list[Tensor]]] | None = None  # per-exit gradients summed over micro-batches

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
        scale: Tensor | None = None,
        micro: tuple[int, int] = (0, 1),
    ) -> dict[str, Tensor]:
        self._check_micro(micro)
        if part is None:
            assert net is not None
            part = self.net_partition(net, len(losses))
        total = torch.stack([l.detach() for l in losses]).sum()
        i, n = micro
        # the seed of each per-exit backward: s/n (each micro-batch's share of the mean, times the loss scale,
        # as a loss weighting's; curvature statistics then see the same output gradients for every rule)
        mult = scale if n == 1 else (1.0 / n if scale is None else scale / n)
        G, head_grads = per_exit_grads(losses if mult is None else [l * mult for l in losses], part, self.grad_method)
        if n > 1:  # sum the per-exit gradients of the micro-batches; combine once, after the last
            if i == 0:
                self._acc = (G, head_grads)
            else:
                assert self._acc is not None
                self._acc[0].add_(G)
                torch._foreach_add_([g for gs in self._acc[1] for g in gs], [g for gs in head_grads for g in gs])
            if i < n - 1:
                return {"loss": total}
            (G, head_grads), self._acc = self._acc, None
        heads_flat = [g for gs in head_grads for g in gs]
        if scale is not None:  # exact: the scale is a power of two
            G.div_(scale)
            if heads_flat:
                torch._foreach_div_(heads_flat, scale)
        if reduce is not None:  # data parallel: combine the rank-averaged G, not an average of combinations
            G, head_grads = reduce_per_exit(reduce, G, head_grads)
            heads_flat = [g for gs in head_grads for g in gs]
        back: Tensor | None = None
        if scale is not None:  # non-finite per-exit gradients: the aggregator gets zeros, .grad gets NaN
            finite = torch.isfinite(torch.stack([G.sum(), *[g.sum() for g in heads_flat]]).sum())
            G = torch.where(finite, G, torch.zeros((), dtype=G.dtype, device=G.device))
            back = torch.where(finite, scale, torch.full_like(scale, float("nan")))
        direction, stats = self.aggregate(G, part)
        if back is not None:
            direction = direction * back.to(direction.dtype)
            if heads_flat:
                torch._foreach_mul_(heads_flat, back)
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
