"""Gradient Equilibrium (Li, Zhang, Qi, Yang & Huang, "Improved Techniques for Training Adaptive Deep Networks",
ICCV 2019): the gradient flowing back into each stage output is rescaled so that every stage learns from
the *average*, not the sum, of the losses of the exits that depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from anytrain.nets.staged import State, require_staged
from anytrain.rules._base import LossWeighting, Reduce, check_losses_for
from anytrain.rules._osgd import scale_grad


def _scaled(state: State, w: Tensor, last_only: bool) -> State:
    """``state`` with the gradient through every tensor (or only its last one) scaled by ``w``."""
    if not last_only:
        return scale_grad(state, w)
    leaves, spec = tree_flatten(state)
    leaves[-1] = scale_grad(leaves[-1], w)
    return tree_unflatten(leaves, spec)


class GradientEquilibrium(LossWeighting):
    """Gradient Equilibrium (IMTA's GE) on any staged network, in one backward pass.

    With ``n`` exits and stage outputs ``s_i`` (``i = 0..n−1``), the forward is unchanged, but the gradient
    entering head ``i`` from ``s_i`` is scaled by ``1/(n−i)`` and the gradient reaching ``s_i`` from stage ``i+1``
    by ``(n−i−1)/(n−i)``. Backpropagating ``Σ_j L_j`` through these scalings gives, by induction from the last
    stage, the gradient at every stage output

    ::

        ∂/∂s_i  =  1/(n−i) · Σ_{j ≥ i} ∂L_j/∂s_i        (the mean over the exits that depend on s_i)
        ∇θ_i    =  1/(n−i) · Σ_{j ≥ i} ∇θ_i L_j           stage i's own parameters
        ∇φ_i    =  ∇φ_i L_i                                  head i: its own loss, unscaled

    (a parameter that several stages use, tied weights, gets the sum of these terms over its uses), so the
    gradient magnitude of the early stages no longer grows with the number of exits behind them. The
    rescaled gradients are linear in the losses: averaging ``.grad`` over data-parallel ranks afterwards is exact,
    and any optimizer takes the result as it takes a plain gradient.

    The scalings sit on the whole state between stages (every tensor of a pytree state, so nested networks, whose
    later stages reuse earlier activations, get exactly the formula above). ``last_only=True`` scales only the
    last tensor of the state instead, which is what IMTA's released MSDNet does (it rescales the coarsest map,
    the one its classifier reads; finer maps pass to the next block unscaled) — the closed form then no longer
    holds.

    Works through ``rule.forward(net, x)`` then ``rule.backward(net, losses)`` on an
    :class:`~anytrain.nets.StagedNet` (the trainer does this); ``anytrain.rules.backward`` refuses it, since the
    scalings live in the forward pass.

    Example:
        >>> from anytrain.nets import StagedNet
        >>> net = StagedNet([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 2), nn.Linear(4, 2)])
        >>> rule = GradientEquilibrium()
        >>> losses = [z.square().mean() for z in rule.forward(net, torch.randn(8, 4))]
        >>> _ = rule.backward(net, losses)
        >>> net.stages[0].weight.grad.shape
        torch.Size([4, 4])

    Reference: H. Li, H. Zhang, X. Qi, R. Yang, G. Huang. Improved Techniques for Training Adaptive Deep
    Networks. ICCV 2019 (Section 3.2; code github.com/kalviny/IMTA, ``models/msdnet_ge.py``).
    """

    name = "gradient-equilibrium"

    def __init__(self, last_only: bool = False) -> None:
        if not isinstance(last_only, bool):
            raise ValueError(f"gradient-equilibrium: last_only must be true or false, got {last_only!r}")
        self.last_only = last_only
        self._forwarded = False  # set by forward, consumed by backward: a bypassed forward is an error
        self._scales: Tensor | None = None  # row i: (1/(n−i), (n−i−1)/(n−i)), on the device (no per-step copies)

    def needs_forward(self) -> str | None:
        return (
            "it rescales gradients between the stages inside its own forward: call rule.forward(net, x) then "
            "rule.backward(net, losses) on an anytrain.nets.StagedNet (the trainer does this)"
        )

    def bind(self, net: nn.Module) -> None:
        require_staged(net, self.name)

    def forward(self, net: nn.Module, x: Tensor) -> list[Tensor]:
        staged = require_staged(net, self.name)
        n = staged.num_exits
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        sc = self._scales
        if sc is None or len(sc) != n or sc.device != x.device or sc.dtype != dtype:
            left = torch.arange(n, 0, -1, dtype=torch.float64)  # exits that depend on stage i's output: n−i
            self._scales = sc = torch.stack([1.0 / left, (left - 1.0) / left], dim=1).to(x.device, dtype)
        out, s = [], x
        for i, (stage, head) in enumerate(zip(staged.stages, staged.exits)):
            s = stage(s)
            if i == n - 1:  # the last head is the only exit left: scale 1
                out.append(head(s))
            else:
                out.append(head(_scaled(s, sc[i, 0], self.last_only)))
                s = _scaled(s, sc[i, 1], self.last_only)
        self._forwarded = True
        return out

    def backward(self, net: nn.Module, losses: Sequence[Tensor], **kwargs: Any) -> dict[str, Tensor]:
        check_losses_for(net, losses, self)
        require_staged(net, self.name)
        forwarded, self._forwarded = self._forwarded, False
        if not forwarded:
            raise ValueError(
                f"{self.name}: the losses must come from rule.forward(net, x) (it rescales gradients there); "
                "net(x) would silently train with joint"
            )
        return super().backward(net, losses, **kwargs)

    def total(self, losses: Tensor, reduce: Reduce | None) -> Tensor:
        return losses.sum()

    def extra_repr(self) -> str:
        return f"last_only={self.last_only}"
