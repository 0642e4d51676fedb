"""Branched anytime networks: a trunk cut into stages, with a side exit after each stage.

Builders (registered in ``MODELS``):

- ``cnn1d-exits``: 1-D CNN for MNIST-1D (input ``(1, 40)``).
- ``cnn2d-exits``: small 2-D CNN for 8×8 digits.
- ``vgg11-exits`` ... ``vgg19-exits``: VGG with batch norm for 32×32 images; exits after chosen blocks.
- ``preresnet18-exits``/``preresnet34-exits`` (ImageNet-style widths 64..512) and
  ``preresnet20/56/110-exits`` (CIFAR-style, 16/32/64 channels): pre-activation ResNets with exits after
  chosen residual blocks.

Every builder takes ``in_shape`` and ``num_classes``, a ``head`` option naming the exit head kind (see
``anytrain.nets.heads``) with ``head_kwargs``, and optionally ``last_head``/``last_head_kwargs`` for the last
exit alone (DGL's released code gives the last module its own head, ``mlp`` with ``layers: 2``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from anytrain.nets import MODELS
from anytrain.nets.heads import make_head
from anytrain.nets.staged import StagedNet


def _conv(dims: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d}[dims]


def _bn(dims: int) -> type[nn.Module]:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]


def conv_bn_relu(cin: int, cout: int, dims: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        _conv(dims)(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        _bn(dims)(cout),
        nn.ReLU(inplace=True),
    )


def split_into_stages(
    layers: Sequence[nn.Module],
    channels: Sequence[int],
    exits_after: Sequence[int],
    dims: int,
    num_classes: int,
    head: str,
    head_kwargs: dict[str, Any] | None = None,
    pre_head: bool = False,
    last_head: str | None = None,
    last_head_kwargs: dict[str, Any] | None = None,
) -> StagedNet:
    """Group ``layers`` into stages ending after the layer indices in ``exits_after`` (the last must be the
    final layer) and attach one head per stage (``last_head`` for the last stage when given).
    ``channels[i]`` is the output width of ``layers[i]``."""
    if last_head is None and last_head_kwargs:
        raise ValueError("last_head_kwargs given without last_head")
    n = len(layers)
    ex = sorted({int(i) % n for i in exits_after})
    if not ex or ex[-1] != n - 1:
        ex.append(n - 1)
    stages, exits, start = [], [], 0
    for end in ex:
        stages.append(nn.Sequential(*layers[start : end + 1]))
        c = channels[end]
        if end == ex[-1] and last_head is not None:
            h = make_head(last_head, c, num_classes, dims, **(last_head_kwargs or {}))
        else:
            h = make_head(head, c, num_classes, dims, **(head_kwargs or {}))
        if pre_head:  # pre-activation nets leave the trunk's output un-normalised
            h = nn.Sequential(_bn(dims)(c), nn.ReLU(inplace=True), h)
        exits.append(h)
        start = end + 1
    return StagedNet(stages, exits)


def _check_shape(in_shape: Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != dims + 1:
        raise ValueError(f"model {name!r} needs inputs of shape (C, {'L' if dims == 1 else 'H, W'}), got {shape}")
    return shape


@MODELS.register("cnn1d-exits", "1-D CNN with side exits (MNIST-1D)")
def cnn1d_exits(
    in_shape: Sequence[int] = (1, 40),
    num_classes: int = 10,
    width: int = 32,
    exits: int = 4,
    head: str = "linear",
    head_kwargs: dict[str, Any] | None = None,
    last_head: str | None = None,
    last_head_kwargs: dict[str, Any] | None = None,
) -> StagedNet:
    """1-D CNN: ``exits`` stages of two 3-wide conv-BN-ReLU layers; stage k>0 halves the length."""
    shape = _check_shape(in_shape, 1, "cnn1d-exits")
    if exits < 1:
        raise ValueError(f"exits must be >= 1, got {exits}")
    layers: list[nn.Module] = []
    channels: list[int] = []
    cin = shape[0]
    for k in range(exits):
        cout = width * min(2**k, 4)
        block = nn.Sequential(
            conv_bn_relu(cin, cout, 1, kernel=5 if k == 0 else 3, stride=1 if k == 0 else 2),
            conv_bn_relu(cout, cout, 1),
        )
        layers.append(block)
        channels.append(cout)
        cin = cout
    return split_into_stages(
        layers,
        channels,
        range(exits),
        1,
        num_classes,
        head,
        head_kwargs,
        last_head=last_head,
        last_head_kwargs=last_head_kwargs,
    )


@MODELS.register("cnn2d-exits", "small 2-D CNN with side exits (8x8 digits)")
def cnn2d_exits(
    in_shape: Sequence[int] = (1, 8, 8),
    num_classes: int = 10,
    width: int = 32,
    exits: int = 3,
    head: str = "linear",
    head_kwargs: dict[str, Any] | None = None,
    last_head: str | None = None,
    last_head_kwargs: dict[str, Any] | None = None,
) -> StagedNet:
    """2-D CNN: ``exits`` stages of one 3×3 conv-BN-ReLU; stage k>0 doubles width and halves resolution while
    the map is larger than 2×2."""
    shape = _check_shape(in_shape, 2, "cnn2d-exits")
    if exits < 1:
        raise ValueError(f"exits must be >= 1, got {exits}")
    layers: list[nn.Module] = []
    channels: list[int] = []
    cin, side = shape[0], min(shape[1:])
    for k in range(exits):
        stride = 2 if (k > 0 and side > 2) else 1
        side = (side + stride - 1) // stride
        cout = width * min(2**k, 4)
        layers.append(nn.Sequential(conv_bn_relu(cin, cout, 2, stride=stride), conv_bn_relu(cout, cout, 2)))
        channels.append(cout)
        cin = cout
    return split_into_stages(
        layers,
        channels,
        range(exits),
        2,
        num_classes,
        head,
        head_kwargs,
        last_head=last_head,
        last_head_kwargs=last_head_kwargs,
    )


VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}


def vgg_exits(
    depth: str,
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    exits_after: Sequence[int] = (1, 2, 3, 4),
    width_mult: float = 1.0,
    head: str = "linear",
    head_kwargs: dict[str, Any] | None = None,
    last_head: str | None = None,
    last_head_kwargs: dict[str, Any] | None = None,
) -> StagedNet:
    """VGG-BN. The trunk is cut into blocks, each ending in a 2×2 max-pool; ``exits_after`` lists the block
    indices (0-based) after which an exit sits; the final block always has one. With 32×32 inputs the last
    block's pool is skipped only if the map is already 1×1."""
    shape = _check_shape(in_shape, 2, f"{depth}-exits")
    blocks: list[nn.Module] = []
    channels: list[int] = []
    cur: list[nn.Module] = []
    cin, side = shape[0], min(shape[1:])
    for v in VGG_CFGS[depth]:
        if v == "M":
            if side >= 2:
                cur.append(nn.MaxPool2d(2))
                side //= 2
            blocks.append(nn.Sequential(*cur))
            channels.append(cin)
            cur = []
        else:
            cout = max(1, int(round(int(v) * width_mult)))
            cur.append(conv_bn_relu(cin, cout, 2))
            cin = cout
    return split_into_stages(
        blocks,
        channels,
        exits_after,
        2,
        num_classes,
        head,
        head_kwargs,
        last_head=last_head,
        last_head_kwargs=last_head_kwargs,
    )


for _d in VGG_CFGS:
    MODELS.register(f"{_d}-exits", f"{_d.upper()}-BN with side exits after chosen blocks")(
        (lambda d: lambda **kw: vgg_exits(d, **kw))(_d)
    )


class PreActBlock(nn.Module):
    """Pre-activation basic residual block (He et al. 2016): BN-ReLU-conv-BN-ReLU-conv + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + sc


PRERESNET_CFGS: dict[str, tuple[list[int], list[int]]] = {
    # name: (blocks per group, widths per group)
    "preresnet18": ([2, 2, 2, 2], [64, 128, 256, 512]),
    "preresnet34": ([3, 4, 6, 3], [64, 128, 256, 512]),
    "preresnet20": ([3, 3, 3], [16, 32, 64]),
    "preresnet56": ([9, 9, 9], [16, 32, 64]),
    "preresnet110": ([18, 18, 18], [16, 32, 64]),
}


def preresnet_exits(
    depth: str,
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    exits_after: Sequence[int] | None = None,
    width_mult: float = 1.0,
    head: str = "linear",
    head_kwargs: dict[str, Any] | None = None,
    last_head: str | None = None,
    last_head_kwargs: dict[str, Any] | None = None,
) -> StagedNet:
    """Pre-activation ResNet for 32×32 inputs. Layer 0 is the stem conv, then one layer per residual block;
    ``exits_after`` indexes those layers (default: the end of every group of blocks)."""
    shape = _check_shape(in_shape, 2, f"{depth}-exits")
    nblocks, widths = PRERESNET_CFGS[depth]
    widths = [max(1, int(round(w * width_mult))) for w in widths]
    layers: list[nn.Module] = [nn.Conv2d(shape[0], widths[0], 3, padding=1, bias=False)]
    channels = [widths[0]]
    group_ends = []
    cin = widths[0]
    for g, (n, w) in enumerate(zip(nblocks, widths)):
        for b in range(n):
            layers.append(PreActBlock(cin, w, 2 if (b == 0 and g > 0) else 1))
            channels.append(w)
            cin = w
        group_ends.append(len(layers) - 1)
    ex = list(exits_after) if exits_after is not None else group_ends
    return split_into_stages(layers, channels, ex, 2, num_classes, head, head_kwargs, True, last_head, last_head_kwargs)


for _d in PRERESNET_CFGS:
    MODELS.register(f"{_d}-exits", f"pre-activation {_d[3:].upper()} with side exits")(
        (lambda d: lambda **kw: preresnet_exits(d, **kw))(_d)
    )
