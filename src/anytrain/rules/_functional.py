"""``backward(losses, rule, *, shared)``: any per-exit rule, on any model, in any training loop."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from anytrain.rules._base import PROCEDURES, GradientRule, Reduce, procedure_error, scalar_losses
from anytrain.rules._pergrad import graph_partition


def backward(
    losses: Sequence[Tensor],
    rule: str | GradientRule | Any,
    *,
    shared: Iterable[Tensor],
    reduce: Reduce | None = None,
    scale: float | Tensor | torch.amp.GradScaler | None = None,
) -> dict[str, Tensor]:
    """Accumulate the gradients a per-exit rule gives into ``.grad``, like ``torch.autograd.backward``.

    The rule combines the per-exit gradients of the ``shared`` parameters (the trunk); every other parameter a
    loss reaches gets the plain gradient of the losses that reach it (an exit head: its own exit's gradient).
    Which loss reaches which parameter is read off the autograd graphs, so any model works: a multi-exit CNN of
    your own, a multi-task net, a staged network.

    ::

        g_k = ∇_shared L_k                 one backward per exit, each stopping where L_k's graph stops
        shared.grad += rule(g_1, …, g_K)   joint: Σ_k g_k;  osgd: Σ_k u_k (Gram–Schmidt, earliest exit first);
                                           torchjd:<A>: the aggregator A applied to the K×P matrix [g_k]
        other.grad  += ∇_other Σ_k L_k     (only the losses that reach it contribute)

    Loss weightings (``joint``, ``weighted``, ``adaloss``) need one backward in all; ``joint`` is exactly
    ``sum(losses).backward()``.

    Args:
        losses: ``K`` scalar tensors, earliest exit (highest priority) first.
        rule: a registered name (``"osgd"``, ``"joint"``, ``"adaloss"``, ``"torchjd:UPGrad"``, …), a rule object
            (it may keep state across calls, e.g. AdaLoss's running averages) or a TorchJD aggregator object.
        shared: the leaf tensors the rule combines across exits; each must be reached by some loss. Pass the
            trunk only (``net.trunk_parameters()``): an exit head's parameters inside ``shared`` are not refused
            (the graph cannot tell them from the last stage's trunk, which also only one loss reaches) but they
            enter the combination — for ``osgd`` they lengthen ``g_k``, so later exits' projections on it shrink —
            which is not the rule as published; ``joint`` is unaffected.
        reduce: data parallelism: a function that averages a flat tensor over the ranks in place and returns it
            (``anytrain.train.distributed.average_``). The per-exit gradients are averaged before a non-linear
            rule combines them; everything this call adds to ``.grad`` is then the rank average.
        scale: float16 loss scaling: a ``torch.amp.GradScaler`` (or its current scale). Pass the *unscaled*
            losses; ``.grad`` then holds the scale times the rule's gradient, as after
            ``scaler.scale(loss).backward()``, so ``scaler.step(optimizer); scaler.update()`` follow as usual
            (``scaler.unscale_(optimizer)`` first if you clip). The rule itself sees unscaled per-exit gradients
            (see ``docs/precision.md``).

    Returns:
        The rule's statistics (tensors on the losses' device; no host synchronisation).

    Raises:
        ValueError: a single loss instead of a list, a non-scalar loss, an empty ``shared``, a ``shared`` tensor
            that is not a leaf requiring grad
            or that no loss reaches, a rule that needs its own forward pass (amortized OSGD), or a training procedure
            (DGL, SGL: ``anytrain.greedy``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> trunk, heads = nn.Linear(4, 8), [nn.Linear(8, 3), nn.Linear(8, 3)]
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> h = trunk(x).relu()
        >>> losses = [nn.functional.cross_entropy(head(h), y) for head in heads]
        >>> stats = backward(losses, "osgd", shared=trunk.parameters())
        >>> trunk.weight.grad.shape, heads[1].bias.grad.shape
        (torch.Size([8, 4]), torch.Size([3]))
    """
    from anytrain.rules import build_rule

    name = rule.lower() if isinstance(rule, str) else getattr(rule, "name", None)
    if name in PROCEDURES:  # DGL/SGL: procedures over blocks and heads, never a combination of losses
        raise procedure_error(name)
    if isinstance(rule, str):
        rule = build_rule(rule)
    elif not isinstance(rule, GradientRule):
        if "torchjd" in sys.modules and isinstance(rule, sys.modules["torchjd.aggregation"].Aggregator):
            from anytrain.rules._torchjd import TorchJDRule

            rule = TorchJDRule(rule)
        else:
            raise ValueError(
                f"rule must be a rule name, a rule object or a TorchJD aggregator, got {type(rule).__name__}"
            )
    reason = rule.needs_forward()
    if reason is not None:
        raise ValueError(f"rule {rule.name!r} cannot work from losses alone: {reason}")
    if isinstance(losses, Tensor) and losses.dim() == 0:
        raise ValueError(
            "backward takes one loss per exit (a list of K scalar tensors, earliest first), got one scalar; "
            "for a single summed loss call loss.backward()"
        )
    losses = list(losses)
    scalar_losses(losses)
    if isinstance(shared, Tensor):
        shared = [shared]
    params = list(shared)
    if not params:
        raise ValueError("shared is empty: pass the parameters the exits share (the trunk), e.g. trunk.parameters()")
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.requires_grad or p.grad_fn is not None:
            raise ValueError(f"shared tensor {i} must be a leaf tensor that requires grad (a parameter)")
        if id(p) in seen:
            raise ValueError(f"shared tensor {i} appears twice")
        seen.add(id(p))
    for k, loss in enumerate(losses):
        if not loss.requires_grad:
            raise ValueError(f"loss of exit {k} does not require grad (computed under no_grad, or detached?)")
    part = graph_partition(losses, params)
    return rule.combine(losses, part, reduce=reduce, scale=loss_scale(scale, losses[0].device))


def loss_scale(scale: float | Tensor | torch.amp.GradScaler | None, device: torch.device) -> Tensor | None:
    """The loss scale as a 0-d float32 tensor on ``device`` (``None``: no scaling). A ``GradScaler`` gives its
    current scale without a host synchronisation (a disabled one: ``None``)."""
    if scale is None:
        return None
    if isinstance(scale, torch.amp.GradScaler):
        if not scale.is_enabled():
            return None
        return scale.scale(torch.ones((), device=device))
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"scale must be a float, a 1-element float tensor or a GradScaler, got {scale.dtype}")
        return scale.reshape(()).to(device, torch.float32)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < float(scale) < float("inf"):
        raise ValueError(f"scale must be a positive finite number, a tensor or a GradScaler, got {scale!r}")
    return torch.tensor(float(scale), device=device)
