"""Recursively nested anytime networks: stage ``k``'s network contains stage ``k−1``'s and reuses every one of
its activations.

The network after stage ``k`` is a chain of *positions* ``0..D_k`` (position 0 is the input); each position
holds a list of channel *blocks*, one per stage that wrote to it. A stage grows the chain in one or both ways:

- **width** (``nested-width``): every position ``p ≥ 1`` gets a new block, as many channels as it already has
  (total width doubles), computed from *all* blocks of position ``p−1`` (old and new). Old blocks are never
  recomputed and never read new ones.
- **depth, interlaced** (``nested-depth``): a new layer ``c_p`` is inserted after every position ``p ≥ 1``;
  ``c_p = ReLU(BN(conv(c_{p−1}) + conv(h_p)))`` reads its own path ``c_{p−1}`` (``c_0`` = input) and, as a
  lateral input, the previous stage's activation ``h_p`` at that depth. The chain length doubles per stage,
  and so does the depth of the newest column.
- **width+depth** (``nested-width-depth``): first widen, then interlace (inserted layers are as wide as the
  widened position they sit after).

The exit after stage ``k`` reads the last position (all its blocks): global average pooling, then a linear
layer. States between stages are pytrees ``list[list[Tensor]]`` (positions × blocks), so
``StagedNet.continue_from`` resumes from any stage with every earlier activation reused, and
``forward(x, upto=k)`` runs (and costs) exactly stages ``0..k``.

Builders work for 1-D inputs ``(C, L)`` (MNIST-1D) and 2-D inputs ``(C, H, W)`` (digits, CIFAR); the ``*-vgg``
builders are CIFAR-sized presets whose final network has VGG-like widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from anytrain.nets import MODELS
from anytrain.nets.staged import StagedNet

Blocks = list[Tensor]
NestedState = list[Blocks]


def _conv(dims: int, cin: int, cout: int, kernel: int, stride: int, bias: bool) -> nn.Module:
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    return cls(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias)


def _norm(dims: int, c: int, norm: str) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm1d(c) if dims == 1 else nn.BatchNorm2d(c)
    return nn.Identity()


class ConvUnit(nn.Module):
    """``ReLU(norm(Σ_i conv_i(x_i)))``: one conv per input group (groups may differ in resolution)."""

    def __init__(self, dims: int, cins: Sequence[int], cout: int, strides: Sequence[int], kernel: int, norm: str):
        super().__init__()
        self.convs = nn.ModuleList(
            _conv(dims, ci, cout, kernel, s, bias=norm == "none") for ci, s in zip(cins, strides)
        )
        self.norm = _norm(dims, cout, norm)
        self.act = nn.ReLU()

    def forward(self, *xs: Tensor) -> Tensor:
        out = self.convs[0](xs[0])
        for conv, x in zip(self.convs[1:], xs[1:]):
            out = out + conv(x)
        return self.act(self.norm(out))


def _cat(blocks: Blocks) -> Tensor:
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


class BaseStage(nn.Module):
    """Stage 0: a plain chain ``x → h_1 → … → h_D``; returns the state ``[[x], [h_1], …, [h_D]]``."""

    def __init__(self, dims: int, cin: int, widths: Sequence[int], strides: Sequence[int], kernel: int, norm: str):
        super().__init__()
        chans = [cin, *widths]
        self.layers = nn.ModuleList(
            ConvUnit(dims, [chans[i]], chans[i + 1], [strides[i]], kernel, norm) for i in range(len(widths))
        )

    def forward(self, x: Tensor) -> NestedState:
        state: NestedState = [[x]]
        h = x
        for layer in self.layers:
            h = layer(h)
            state.append([h])
        return state


class GrowStage(nn.Module):
    """Stage ``k ≥ 1``: widen every position and/or interlace new layers (see the module docstring).

    ``chans[p]`` and ``strides[p]`` describe the previous stage's positions (``strides[p]`` is the stride from
    position ``p−1`` to ``p``; index 0 is the input). After construction, ``out_chans``/``out_strides`` describe
    this stage's positions.
    """

    def __init__(
        self,
        dims: int,
        chans: Sequence[int],
        strides: Sequence[int],
        kernel: int,
        norm: str,
        widen: bool,
        deepen: bool,
    ):
        super().__init__()
        self.widen, self.deepen = widen, deepen
        D = len(chans) - 1
        chans = list(chans)
        if widen:
            # new block at p reads all (widened) channels of p−1; it has as many channels as p had (doubling)
            self.wide = nn.ModuleList()
            for p in range(1, D + 1):
                cin = chans[p - 1] + (chans[p - 1] if p - 1 >= 1 else 0)
                self.wide.append(ConvUnit(dims, [cin], chans[p], [strides[p]], kernel, norm))
            chans = [chans[0]] + [2 * c for c in chans[1:]]
        out_chans, out_strides = [chans[0]], [1]
        if deepen:
            self.deep = nn.ModuleList()
            own = chans[0]
            for p in range(1, D + 1):
                # c_p = f(conv(c_{p−1}, stride_p) + conv(h_p, stride 1)): same resolution as h_p
                self.deep.append(ConvUnit(dims, [own, chans[p]], chans[p], [strides[p], 1], kernel, norm))
                own = chans[p]
                out_chans += [chans[p], chans[p]]
                out_strides += [strides[p], 1]
        else:
            out_chans, out_strides = chans, list(strides)
        self.out_chans, self.out_strides = out_chans, out_strides

    def forward(self, state: NestedState) -> NestedState:
        new = [list(blocks) for blocks in state]  # old blocks are reused as they are
        D = len(new) - 1
        if self.widen:
            for p in range(1, D + 1):
                new[p].append(self.wide[p - 1](_cat(new[p - 1])))
        if not self.deepen:
            return new
        out: NestedState = [new[0]]
        c = _cat(new[0])
        for p in range(1, D + 1):
            c = self.deep[p - 1](c, _cat(new[p]))
            out.append(new[p])
            out.append([c])
        return out


class PoolLinearHead(nn.Module):
    """Exit head: all blocks of the last position → global average pool → linear."""

    def __init__(self, dims: int, cin: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, state: NestedState) -> Tensor:
        return self.fc(self.pool(_cat(state[-1])).flatten(1))


def nested_net(
    in_shape: Sequence[int],
    num_classes: int,
    stages: int,
    widths: Sequence[int],
    strides: Sequence[int],
    widen: bool,
    deepen: bool,
    kernel: int = 3,
    norm: str = "batch",
) -> StagedNet:
    """Build a nested net from a base chain (``widths``/``strides`` per layer of stage 0) and a growth kind."""
    shape = tuple(int(s) for s in in_shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"nested nets need inputs of shape (C, L) or (C, H, W), got {shape}")
    if stages < 1:
        raise ValueError(f"stages must be ≥ 1, got {stages}")
    if len(widths) != len(strides) or not widths:
        raise ValueError(f"need one stride per layer, got {len(widths)} widths and {len(strides)} strides")
    if any(int(w) < 1 for w in widths) or any(int(s) < 1 for s in strides):
        raise ValueError(f"widths and strides must be positive, got {list(widths)} and {list(strides)}")
    if norm not in ("batch", "none"):
        raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be odd and positive, got {kernel}")
    dims = len(shape) - 1
    widths = [int(w) for w in widths]
    strides = [int(s) for s in strides]
    st: list[nn.Module] = [BaseStage(dims, shape[0], widths, strides, kernel, norm)]
    chans, strd = [shape[0], *widths], [1, *strides]
    heads: list[nn.Module] = [PoolLinearHead(dims, chans[-1], num_classes)]
    for _ in range(1, stages):
        g = GrowStage(dims, chans, strd, kernel, norm, widen, deepen)
        st.append(g)
        chans, strd = g.out_chans, g.out_strides
        heads.append(PoolLinearHead(dims, chans[-1], num_classes))
    return StagedNet(st, heads)


def _default_strides(layers: int, spatial: int) -> list[int]:
    """Stride 2 at every second layer while the resolution allows it (≥ 2 after the step)."""
    out, size = [], spatial
    for i in range(layers):
        s = 2 if i % 2 == 1 and size >= 4 else 1
        size = (size + s - 1) // s
        out.append(s)
    return out


def _small(in_shape: Sequence[int], layers: int, width: int, strides: Sequence[int] | None) -> tuple[list, list]:
    if layers < 1:
        raise ValueError(f"layers must be ≥ 1, got {layers}")
    spatial = int(min(in_shape[1:])) if len(in_shape) > 1 else 1
    s = list(strides) if strides is not None else _default_strides(layers, spatial)
    return [int(width)] * layers, s


@MODELS.register("nested-width", "width-nested anytime CNN (1-D or 2-D): each stage doubles every layer's width")
def nested_width(
    in_shape: Sequence[int] = (1, 40),
    num_classes: int = 10,
    stages: int = 4,
    width: int = 8,
    layers: int = 4,
    strides: Sequence[int] | None = None,
    kernel: int = 3,
    norm: str = "batch",
) -> StagedNet:
    """Width-nested CNN: stage 0 has ``layers`` conv layers of ``width`` channels; stage k doubles every width."""
    w, s = _small(in_shape, layers, width, strides)
    return nested_net(in_shape, num_classes, stages, w, s, widen=True, deepen=False, kernel=kernel, norm=norm)


@MODELS.register("nested-depth", "depth-nested (interlaced) anytime CNN: each stage doubles the depth")
def nested_depth(
    in_shape: Sequence[int] = (1, 40),
    num_classes: int = 10,
    stages: int = 4,
    width: int = 16,
    layers: int = 2,
    strides: Sequence[int] | None = None,
    kernel: int = 3,
    norm: str = "batch",
) -> StagedNet:
    """Depth-nested CNN: stage 0 is ``layers`` conv layers; stage k interlaces one new layer per position."""
    w, s = _small(in_shape, layers, width, strides)
    if strides is None:
        s = [2 if i >= layers - 2 and min(in_shape[1:]) >= 8 else 1 for i in range(layers)]
    return nested_net(in_shape, num_classes, stages, w, s, widen=False, deepen=True, kernel=kernel, norm=norm)


@MODELS.register("nested-width-depth", "width+depth nested anytime CNN: each stage doubles width and depth")
def nested_width_depth(
    in_shape: Sequence[int] = (1, 40),
    num_classes: int = 10,
    stages: int = 3,
    width: int = 8,
    layers: int = 2,
    strides: Sequence[int] | None = None,
    kernel: int = 3,
    norm: str = "batch",
) -> StagedNet:
    """Width+depth nested CNN: each stage widens every position, then interlaces new layers."""
    w, s = _small(in_shape, layers, width, strides)
    if strides is None:
        s = [2 if i >= layers - 2 and min(in_shape[1:]) >= 8 else 1 for i in range(layers)]
    return nested_net(in_shape, num_classes, stages, w, s, widen=True, deepen=True, kernel=kernel, norm=norm)


_VGG_WIDTHS = (64, 128, 256, 256, 512, 512, 512, 512)
_VGG_STRIDES = (1, 2, 2, 1, 2, 1, 2, 1)


@MODELS.register("nested-width-vgg", "CIFAR-sized width-nested VGG: the last stage has VGG11 widths")
def nested_width_vgg(
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    stages: int = 4,
    kernel: int = 3,
    norm: str = "batch",
) -> StagedNet:
    """VGG11-shaped width-nested net: stage 0 has VGG11 widths / 2^(stages−1); the final stage VGG11's."""
    f = 2 ** (stages - 1)
    w = [max(1, c // f) for c in _VGG_WIDTHS]
    return nested_net(
        in_shape, num_classes, stages, w, _VGG_STRIDES, widen=True, deepen=False, kernel=kernel, norm=norm
    )


@MODELS.register("nested-depth-vgg", "CIFAR-sized depth-nested (interlaced) VGG-like net")
def nested_depth_vgg(
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    stages: int = 3,
    width: int = 64,
    kernel: int = 3,
    norm: str = "batch",
) -> StagedNet:
    """Stage 0: 4 conv layers (width, 2·width, 4·width, 8·width; strides 1, 2, 2, 2); depth doubles per stage."""
    w = [width, 2 * width, 4 * width, 8 * width]
    return nested_net(
        in_shape, num_classes, stages, w, [1, 2, 2, 2], widen=False, deepen=True, kernel=kernel, norm=norm
    )


@MODELS.register("nested-width-depth-vgg", "CIFAR-sized width+depth nested VGG-like net")
def nested_width_depth_vgg(
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    stages: int = 3,
    width: int = 32,
    kernel: int = 3,
    norm: str = "batch",
) -> StagedNet:
    """Stage 0: 4 conv layers (width·(1, 2, 4, 8); strides 1, 2, 2, 2); width and depth double per stage."""
    w = [width, 2 * width, 4 * width, 8 * width]
    return nested_net(in_shape, num_classes, stages, w, [1, 2, 2, 2], widen=True, deepen=True, kernel=kernel, norm=norm)
