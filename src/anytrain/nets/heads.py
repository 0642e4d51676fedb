"""Exit and auxiliary heads: map a stage's feature map to logits.

``make_head(kind, channels, num_classes, dims, **kw)`` builds one head for a feature map with ``channels``
channels and ``dims`` spatial dimensions (0: a ``(B, C)`` vector, 1: ``(B, C, L)``, 2: ``(B, C, H, W)``).

Kinds (``HEADS`` lists them):

- ``linear``: global average pool → linear. The cheapest head; the usual exit of an anytime network.
- ``conv1x1``: anytrain's light pooled head: adaptive average pool to a small fixed grid (2×2 by default;
  length 2 for 1-D maps), a few 1×1 convolutions with ReLU (optionally batch norm), then flatten → linear.
  Pooling first keeps the cost independent of the map's resolution; the grid keeps some spatial layout.
  (Earlier versions registered this head as ``mlp-sr``; it is *not* the paper's MLP-SR head.)

The auxiliary heads of decoupled greedy learning (Belilovsky, Eickenberg & Oyallon, ICML 2020), laid out
parameter for parameter as the authors' released code (eugenium/DGL, ``auxiliary_nets_study``) builds them, so
the authors' head state dicts load. ``C`` is the map's channel count (every hidden width is ``C``), ``S`` its
spatial size, ``g = 2^dims`` the cells of the final 2×2 grid (length 2 on 1-D maps):

- ``cnn``: ``layers`` (2) × [3×3 conv (no bias) → BN → ReLU] at full resolution → adaptive avg pool to 2×2
  → BN → flatten → linear ``g·C → classes``.
- ``mlp``: adaptive avg pool to ⌈S/4⌉ → adaptive avg pool to 2×2 → flatten → ``layers`` (3) ×
  [linear ``g·C → g·C`` → BN → ReLU] → linear ``g·C → classes``. With ``layers=2`` it is the released code's
  head of the last module (use it as ``last_head`` of the branched builders).
- ``mlp-sr``: adaptive avg pool to ⌈S/4⌉ → ``layers`` (3) × [1×1 conv (no bias) → BN → ReLU] → adaptive avg
  pool to 2×2 → the MLP of ``mlp`` (``mlp_layers``, 3).

The released ``mlp``/``mlp-sr`` heads also build a batch norm (``bn.*``) that their forward pass never uses;
loading ignores those entries (they cannot change the output).

Heads never modify their input in place (the same state also feeds the next stage). ``head_macs`` counts the
multiply-adds a head adds per sample with the same counter as ``StagedNet.flops_breakdown``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anytrain.registry import Registry

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


@HEADS.register("conv1x1", "adaptive avg pool to 2x2 → 1x1 conv(+BN)+ReLU layers → linear (anytrain's light head)")
def conv1x1_head(
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
        raise ValueError(f"conv1x1 head: need hidden, pool >= 1, layers >= 0; got {hidden}, {pool}, {layers}")
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


class DGLHead(nn.Module):
    """A DGL auxiliary head with the released code's layout (attributes ``blocks``, ``bn``, ``classifier``).

    Args:
        channels: ``C``, channels of the feature map (and every hidden width).
        num_classes: outputs.
        dims: 1 or 2 spatial dimensions.
        conv_layers: conv → BN → ReLU blocks before the final pooling.
        kernel: their kernel size (3: ``cnn``, 1: ``mlp-sr``).
        reduce: pool to ⌈S/4⌉ per spatial dimension first (``mlp``, ``mlp-sr``).
        mlp_layers: hidden linear → BN → ReLU layers of the classifier; 0: a BN on the pooled map, then
            one linear layer (``cnn``).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        dims: int,
        *,
        conv_layers: int,
        kernel: int,
        reduce: bool,
        mlp_layers: int,
    ) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"DGL heads need a 1-D or 2-D feature map, got dims={dims}")
        if conv_layers < 0 or mlp_layers < 0:
            raise ValueError(f"DGL head: layer counts must be >= 0, got {conv_layers}, {mlp_layers}")
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        c = int(channels)
        self.dims, self.reduce = dims, bool(reduce)
        self.blocks = nn.ModuleList(
            nn.Sequential(conv(c, c, kernel, padding=kernel // 2, bias=False), _norm(dims, c))
            for _ in range(conv_layers)
        )
        self.bn = _norm(dims, c) if mlp_layers == 0 else None
        feat = c * 2**dims
        mlp: list[nn.Module] = []
        for _ in range(mlp_layers):
            mlp += [nn.Linear(feat, feat), nn.BatchNorm1d(feat), nn.ReLU(inplace=True)]
        self.classifier = nn.Sequential(*mlp, nn.Linear(feat, num_classes)) if mlp else nn.Linear(feat, num_classes)
        self.register_load_state_dict_pre_hook(_drop_unused_bn)

    def forward(self, x: Tensor) -> Tensor:
        if self.reduce:  # to ⌈S/4⌉ per spatial dimension
            x = self._pool(x, [math.ceil(s / 4) for s in x.shape[2:]])
        for block in self.blocks:
            x = F.relu(block(x))
        x = self._pool(x, [2] * self.dims)
        if self.bn is not None:
            x = self.bn(x)
        return self.classifier(x.flatten(1))

    @staticmethod
    def _pool(x: Tensor, size: list[int]) -> Tensor:
        if len(size) == 1:
            return F.adaptive_avg_pool1d(x, size[0])
        return F.adaptive_avg_pool2d(x, (size[0], size[1]))


def _drop_unused_bn(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # The released mlp/mlp-sr heads carry a batch norm their forward never uses: nothing to load it into.
    if getattr(module, "bn", None) is None:
        for key in [k for k in state_dict if k.startswith(prefix + "bn.")]:
            del state_dict[key]


@HEADS.register("cnn", "DGL's CNN head: 3x3 conv+BN+ReLU layers → pool 2x2 → BN → linear (released layout)")
def cnn_head(channels: int, num_classes: int, dims: int, layers: int = 2) -> nn.Module:
    return DGLHead(channels, num_classes, dims, conv_layers=int(layers), kernel=3, reduce=False, mlp_layers=0)


@HEADS.register("mlp", "DGL's MLP head: pool to S/4 → pool 2x2 → MLP with BN (released layout)")
def mlp_head(channels: int, num_classes: int, dims: int, layers: int = 3) -> nn.Module:
    if int(layers) < 1:
        raise ValueError(f"mlp head needs layers >= 1, got {layers}")
    return DGLHead(channels, num_classes, dims, conv_layers=0, kernel=1, reduce=True, mlp_layers=int(layers))


@HEADS.register("mlp-sr", "DGL's MLP-SR head: pool to S/4 → 1x1 conv+BN+ReLU → pool 2x2 → MLP (released layout)")
def mlp_sr_head(channels: int, num_classes: int, dims: int, layers: int = 3, mlp_layers: int = 3) -> nn.Module:
    if int(layers) < 1 or int(mlp_layers) < 1:
        raise ValueError(f"mlp-sr head needs layers, mlp_layers >= 1, got {layers}, {mlp_layers}")
    return DGLHead(
        channels, num_classes, dims, conv_layers=int(layers), kernel=1, reduce=True, mlp_layers=int(mlp_layers)
    )


def make_head(kind: str, channels: int, num_classes: int, dims: int, **kw: Any) -> nn.Module:
    """Build a head of ``kind`` for a ``channels``-channel feature map with ``dims`` spatial dimensions.

    Example:
        >>> h = make_head("mlp-sr", 16, 10, dims=2)
        >>> h.eval()(torch.randn(4, 16, 7, 7)).shape
        torch.Size([4, 10])
        >>> make_head("linear", 8, 3, dims=1)(torch.randn(2, 8, 5)).shape
        torch.Size([2, 3])
    """
    if channels < 1 or num_classes < 1:
        raise ValueError(f"head needs channels >= 1 and num_classes >= 1, got {channels}, {num_classes}")
    if dims not in (0, 1, 2):
        raise ValueError(f"heads support 0-, 1- or 2-D feature maps, got dims={dims}")
    return HEADS.build(kind, int(channels), int(num_classes), int(dims), **kw)


def head_macs(head: nn.Module, feature_shape: Sequence[int]) -> int:
    """Multiply-adds ``head`` adds for one sample whose feature map has shape ``feature_shape`` (no batch)."""
    from anytrain.nets.flops import macs_of

    was_training = head.training
    head.eval()
    try:
        p = next(head.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        return macs_of(head, torch.zeros(1, *feature_shape, device=device))
    finally:
        head.train(was_training)


__all__ = [
    "HEADS",
    "DGLHead",
    "cnn_head",
    "conv1x1_head",
    "head_macs",
    "linear_head",
    "make_head",
    "mlp_head",
    "mlp_sr_head",
]
