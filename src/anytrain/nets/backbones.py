"""Plain backbones with exits attached by :func:`anytrain.nets.attach.attach_exits`: ``resnet18-exits`` and
``vit-exits``, for small images (28×28, 32×32).

- ``ResNet18``: torchvision's ResNet-18 layout (BasicBlock ×2 per layer, 1×1 conv + BN shortcut where the shape
  changes, module names ``conv1 bn1 relu layer1..layer4 avgpool fc``) with a small-image stem (3×3 conv,
  stride 1, no max-pool) and a base width (64 in torchvision).
- ``ViT``: a pre-norm vision transformer in plain torch modules (patch embedding conv, CLS token, learned
  position embedding, blocks of LayerNorm → attention with separate ``q k v o`` Linear projections →
  LayerNorm → MLP, final LayerNorm, Linear on the CLS token). Separate projections keep every weight an
  ``nn.Linear`` that curvature optimizers and pruning see.

``exits`` counts the exits (the last is the backbone's own output): exits go after the last ``exits - 1``
of the default split points (ResNet: ``layer1 layer2 layer3``; ViT: blocks evenly spaced), or ``at`` lists
the submodules to split after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anytrain.nets import MODELS
from anytrain.nets.attach import AttachedNet, attach_exits


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 with a small-image stem; ``width`` is the first layer's channel count."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        cin = w[0]
        layers = []
        for i, c in enumerate(w):
            layers.append(nn.Sequential(BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT: dim {dim} must be a multiple of heads {heads}")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(z: Tensor) -> Tensor:
            return z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(a.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small pre-norm vision transformer (see the module docstring)."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        dim: int = 64,
        depth: int = 6,
        heads: int = 4,
        mlp: int = 128,
        patch: int = 4,
    ) -> None:
        super().__init__()
        c, h, w = (int(s) for s in in_shape)
        if h % patch or w % patch:
            raise ValueError(f"ViT: patch {patch} must divide the image size {h}x{w}")
        self.patch = nn.Conv2d(c, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + (h // patch) * (w // patch), dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        z = self.patch(x).flatten(2).transpose(1, 2)
        z = torch.cat([self.cls.expand(z.shape[0], -1, -1), z], dim=1) + self.pos
        z = self.norm(self.blocks(z))
        return self.head(z[:, 0])


def _split_points(defaults: list[str], exits: int | None, at: Sequence[str] | None) -> list[str]:
    if at is not None:
        return [str(a) for a in at]
    k = len(defaults) + 1 if exits is None else int(exits)
    if not 1 <= k <= len(defaults) + 1:
        raise ValueError(f"exits must be between 1 and {len(defaults) + 1} here, got {k} (or pass at=[...])")
    return defaults[len(defaults) - (k - 1) :]


def _check_image(in_shape: Sequence[int], what: str) -> None:
    if len(in_shape) != 3:
        raise ValueError(f"{what} takes images (C, H, W), got input shape {tuple(in_shape)}")


@MODELS.register("resnet18-exits", "torchvision's ResNet-18 (small-image stem) with exits after layer1..layer3")
def resnet18_exits(
    in_shape: Sequence[int],
    num_classes: int,
    width: int | None = None,
    exits: int | None = None,
    at: Sequence[str] | None = None,
    head: str = "linear",
    **head_options: Any,
) -> AttachedNet:
    _check_image(in_shape, "resnet18-exits")
    model = ResNet18(int(in_shape[0]), num_classes, width=int(width or 64))
    cuts = _split_points(["layer1", "layer2", "layer3"], exits, at)
    return attach_exits(model, cuts, num_classes, input_shape=in_shape, head=head, head_options=head_options)


@MODELS.register("vit-exits", "a small pre-norm ViT (plain torch) with token-feature exits on its blocks")
def vit_exits(
    in_shape: Sequence[int],
    num_classes: int,
    width: int | None = None,
    exits: int | None = 3,
    at: Sequence[str] | None = None,
    depth: int = 6,
    heads: int = 4,
    mlp: int | None = None,
    patch: int = 4,
    token_pool: str = "cls",
) -> AttachedNet:
    _check_image(in_shape, "vit-exits")
    dim = int(width or 64)
    model = ViT(in_shape, num_classes, dim=dim, depth=depth, heads=heads, mlp=int(mlp or 2 * dim), patch=patch)
    k = depth if exits is None else int(exits)
    if at is None and not 1 <= k <= depth:
        raise ValueError(f"exits must be between 1 and depth={depth}, got {k}")
    # exits spread evenly over the blocks: after block round(depth * j / k) - 1 for j = 1..k-1
    defaults = [f"blocks.{round(depth * j / k) - 1}" for j in range(1, k)]
    cuts = [str(a) for a in at] if at is not None else defaults
    return attach_exits(model, cuts, num_classes, input_shape=in_shape, token_pool=token_pool)


__all__ = ["ViT", "ResNet18", "resnet18_exits", "vit_exits"]
