"""Exit and auxiliary heads: map a stage's feature map to logits.

``make_head(kind, channels, num_classes, dims, **kw)`` builds one head for a feature map with ``channels``
channels and ``dims`` spatial dimensions (0: a ``(B, C)`` vector, 1: ``(B, C, L)``, 2: ``(B, C, H, W)``).

Kinds (``HEADS`` lists them):

- ``linear``: global average pool → linear. The cheapest head; the usual exit of an anytime network.
- ``mlp-sr``: the "MLP-SR" auxiliary problem of decoupled greedy learning (Belilovsky, Eickenberg & Oyallon,
  ICML 2020, §4): adaptive average pool to a small fixed grid (2×2 by default; length 2 for 1-D maps), a few
  1×1 convolutions with ReLU (optionally batch norm), then flatten → linear. Pooling first keeps the head's
  cost independent of the map's resolution, while the 2×2 grid keeps some spatial layout, which is what makes
  a greedy module's features useful to the next one.

Heads never modify their input in place (the same state also feeds the next stage). ``head_macs`` counts the
multiply-adds a head adds per sample with the same counter as ``StagedNet.flops_breakdown``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from anytrain.registry import ConfigError, Registry

HEADS: Registry = Registry("head")


def _pool(dims: int, size: int) -> nn.Module:
    if dims == 0:
        return nn.Identity()
    if dims == 1:
        return nn.AdaptiveAvgPool1d(size)
    if dims == 2:
        return nn.AdaptiveAvgPool2d(size)
    raise ValueError(f"heads support 0-, 1- or 2-D feature maps, got dims={dims}")


def _conv1x1(dims: int, cin: int, cout: int, bias: bool) -> nn.Module:
    # On a vector (dims=0) a 1x1 convolution is a linear layer.
    if dims == 0:
        return nn.Linear(cin, cout, bias=bias)
    return {1: nn.Conv1d, 2: nn.Conv2d}[dims](cin, cout, 1, bias=bias)


def _norm(dims: int, c: int) -> nn.Module:
    return {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](c)


@HEADS.register("linear", "global average pool → linear")
def linear_head(channels: int, num_classes: int, dims: int, dropout: float = 0.0) -> nn.Module:
    """Global average pool over the spatial dimensions, optional dropout, then one linear layer."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = [_pool(dims, 1), nn.Flatten(1)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(channels, num_classes))
    return nn.Sequential(*layers)


@HEADS.register("mlp-sr", "adaptive avg pool to 2x2 → 1x1 conv+ReLU layers → linear (DGL's MLP-SR)")
def mlp_sr_head(
    channels: int,
    num_classes: int,
    dims: int,
    hidden: int | None = None,
    layers: int = 3,
    pool: int = 2,
    batchnorm: bool = False,
) -> nn.Module:
    """Adaptive average pool to ``pool`` per spatial dimension, ``layers`` 1×1 conv (+BN) + ReLU of width
    ``hidden`` (default ``channels``), flatten, linear."""
    hidden = int(hidden) if hidden is not None else int(channels)
    if hidden < 1 or layers < 0 or pool < 1:
        raise ValueError(f"mlp-sr head: need hidden, pool >= 1, layers >= 0; got {hidden}, {pool}, {layers}")
    mods: list[nn.Module] = [_pool(dims, pool)]
    c = int(channels)
    for _ in range(int(layers)):
        mods.append(_conv1x1(dims, c, hidden, bias=not batchnorm))
        if batchnorm:
            mods.append(_norm(dims, hidden))
        mods.append(nn.ReLU())
        c = hidden
    mods += [nn.Flatten(1), nn.Linear(c * pool**dims, num_classes)]
    return nn.Sequential(*mods)


def make_head(kind: str, channels: int, num_classes: int, dims: int, **kw: Any) -> nn.Module:
    """Build a head of ``kind`` for a ``channels``-channel feature map with ``dims`` spatial dimensions.

    Example:
        >>> h = make_head("mlp-sr", 16, 10, dims=2)
        >>> h(torch.randn(4, 16, 7, 7)).shape
        torch.Size([4, 10])
        >>> make_head("linear", 8, 3, dims=1)(torch.randn(2, 8, 5)).shape
        torch.Size([2, 3])
    """
    if channels < 1 or num_classes < 1:
        raise ValueError(f"head needs channels >= 1 and num_classes >= 1, got {channels}, {num_classes}")
    if dims not in (0, 1, 2):
        raise ValueError(f"heads support 0-, 1- or 2-D feature maps, got dims={dims}")
    builder = HEADS.get(kind)
    try:
        return builder(int(channels), int(num_classes), int(dims), **kw)
    except TypeError as e:  # unknown keyword
        raise ConfigError(f"head {kind!r}: {e}") from None


def head_macs(head: nn.Module, feature_shape: Sequence[int]) -> int:
    """Multiply-adds ``head`` adds for one sample whose feature map has shape ``feature_shape`` (no batch)."""
    from anytrain.nets.staged import macs_of

    was_training = head.training
    head.eval()
    try:
        p = next(head.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        return macs_of(head, torch.zeros(1, *feature_shape, device=device))
    finally:
        head.train(was_training)


__all__ = ["HEADS", "head_macs", "linear_head", "make_head", "mlp_sr_head"]
