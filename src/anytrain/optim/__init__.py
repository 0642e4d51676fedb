"""Optimizers. ``build_optimizer(name, net, params, **hparams)``; ``OPTIMIZERS`` lists them, and any other
``torch.optim`` class can be named too (``rmsprop``, ``nadam``, ``adagrad``...).

A factory registered here has the signature ``factory(net, params, **hparams) -> torch.optim.Optimizer``:
``params`` is the list of parameters this optimizer owns (all of the net's, or one module's under decoupled
greedy learning); ``net`` is passed for optimizers that need the model (layer hooks, grouping by layer type).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from anytrain.optim.curvature import CurvatureCorrected
from anytrain.optim.slbi import SLBI, slbi_param_groups
from anytrain.registry import ConfigError, Registry, as_config_error

__all__ = ["OPTIMIZERS", "SLBI", "CurvatureCorrected", "build_optimizer"]

OPTIMIZERS: Registry = Registry("optimizer")


@OPTIMIZERS.register("sgd", "torch.optim.SGD (momentum, weight_decay, nesterov)")
def _sgd(net: nn.Module, params: list[nn.Parameter], lr: float = 0.1, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, **kw)


@OPTIMIZERS.register("adam", "torch.optim.Adam")
def _adam(net: nn.Module, params: list[nn.Parameter], lr: float = 1e-3, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, **kw)


@OPTIMIZERS.register("adamw", "torch.optim.AdamW")
def _adamw(net: nn.Module, params: list[nn.Parameter], lr: float = 1e-3, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, **kw)


def _torch_optimizer(name: str) -> type[torch.optim.Optimizer] | None:
    """Any ``torch.optim`` optimizer class by (case-insensitive) name, e.g. ``rmsprop``, ``nadam``."""
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if (
            attr.lower() == name.lower()
            and isinstance(obj, type)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
            and obj is not torch.optim.LBFGS  # needs a closure every step; the trainer does not pass one
        ):
            return obj
    return None


@OPTIMIZERS.register("curvature", "block-diagonal natural gradient with fractional exponent alpha (Huh 2020)")
def _curvature(net: nn.Module, params: list[nn.Parameter], lr: float = 0.1, **kw: Any) -> torch.optim.Optimizer:
    # only the layers whose weight is in `params` are preconditioned (one optimizer per module under DGL)
    return CurvatureCorrected(net, lr=lr, params=params, **kw)


@OPTIMIZERS.register("slbi", "DessiLBI / Split LBI: sparse regularization path on trunk conv/linear weights")
def _slbi(
    net: nn.Module,
    params: list[nn.Parameter],
    lr: float = 0.1,
    conv: str = "group",
    linear: str = "lasso",
    group_by: str = "out",
    heads: bool = False,
    example_inputs: torch.Tensor | None = None,
    output_layers: list[str] | None = None,
    **kw: Any,
) -> torch.optim.Optimizer:
    # trunk conv weights: group lasso per filter; trunk linear weights: lasso; heads, biases, norms: plain step
    # (on a plain module the heads are its output layers, see slbi_param_groups)
    groups = slbi_param_groups(
        net,
        params,
        conv=conv,
        linear=linear,
        group_by=group_by,
        heads=heads,
        example_inputs=example_inputs,
        output_layers=output_layers,
    )
    return SLBI(groups, lr=lr, **kw)


def build_optimizer(
    name: str, net: nn.Module, params: list[nn.Parameter] | None = None, **hparams: Any
) -> torch.optim.Optimizer:
    if params is None:
        params = [p for p in net.parameters() if p.requires_grad]
    if name in OPTIMIZERS:
        return OPTIMIZERS.build(name, net, params, **hparams)
    cls = _torch_optimizer(name)
    if cls is None:
        known = ", ".join(OPTIMIZERS)
        raise ConfigError(f"unknown optimizer {name!r}; known: {known} (or any torch.optim class name)")
    with as_config_error(f"optimizer {name!r}"):
        return cls(params, **hparams)
