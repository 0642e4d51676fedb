"""MSDNet, the multi-scale dense network (Huang, Chen, Li, Wu, van der Maaten & Weinberger, ICLR 2018), as a
:class:`~anytrain.nets.StagedNet`.

The network keeps ``S`` feature maps at once, scale ``s`` at ``1/2^s`` of the first map's resolution with
``channels·w_s`` channels (``w = scale_widths``). Every layer is *dense*: each scale it keeps gains new channels,
concatenated to what it already holds,

::

    x_s ← [x_s, down(x_{s−1}), same(x_s)]     ``growth·w_s/2`` channels from each branch
    x_s ← [x_s, same(x_s)]                    the finest scale kept, when no finer map is an input

where ``same`` is a 3×3 convolution and ``down`` a 3×3 convolution of stride 2, each (with ``bottleneck``) after a
1×1 convolution to ``min(C_in, b_s·C_out)`` channels (``b = bottleneck_widths``); every convolution is followed by
batch norm and ReLU. Layers are grouped into ``blocks``; block ``k`` has ``base`` layers when ``k = 0``, else
``step`` (``stepmode: even``) or ``step·k + 1`` (``lin_grow``). One classifier per block reads the coarsest map:
two 3×3 conv-BN-ReLU of stride 2, global average pooling, a linear layer.

Finer scales are dropped as the net deepens (``prune: max``, the released default: with ``L`` layers in all
and interval ``⌈L/S⌉``, layer ``l`` (1-based) reads ``S − ⌊max(0, l−2)/interval⌋`` scales and keeps
``S − ⌊(l−1)/interval⌋``; ``prune: min`` keeps ``min(S, L−l+1)`` scales, so only the last layers drop any). A
*transition* (per kept scale a 1×1 conv-BN-ReLU) compresses every scale to ``⌊reduction·C⌋·w_s`` channels after a
layer that dropped a scale (``max``) or after layers ``⌊L/3⌋`` and ``⌊2L/3⌋`` (``min``); ``reduction: 0`` turns
transitions off.

Stems: ``cifar`` (3×3 conv at full resolution; the finer-grained inputs, 28×28 Fashion-MNIST and 32×32 CIFAR)
and ``imagenet`` (7×7 conv of stride 2 and a 3×3 max-pool of stride 2: 224×224 → 56×56). Every other scale
starts as a 3×3 conv-BN-ReLU of stride 2 from the scale above it. Defaults follow the released recipes:

==========  ======  ====  ====  ========  ======  ======  ============  ===========================
stem        blocks  base  step  channels  growth  scales  scale_widths  head_channels
==========  ======  ====  ====  ========  ======  ======  ============  ===========================
cifar       7       4     2     16        6       3       1, 2, 4       128
imagenet    5       4     4     32        16      4       1, 2, 4, 4    ``input`` (as wide as its map)
==========  ======  ====  ====  ========  ======  ======  ============  ===========================

``bottleneck_widths`` defaults to ``scale_widths``, ``reduction`` to 0.5, ``stepmode`` to ``even``. The state
between stages is the list of kept feature maps, finest first.

Two small departures from the released code, neither changing the function class: the 7×7 stem convolution has
no bias (batch norm follows it), and the classifier pools globally (the released ``AvgPool2d(2)`` sees a 2×2 map
at the sizes above, where the two agree; global pooling keeps other input sizes working).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from anytrain.nets import MODELS
from anytrain.nets.staged import StagedNet

Maps = list[Tensor]  # one feature map per kept scale, finest first

_VARIANTS: dict[str, dict[str, int | str]] = {
    "cifar": {"blocks": 7, "base": 4, "step": 2, "channels": 16, "growth": 6, "scales": 3, "head_channels": 128},
    "imagenet": {
        "blocks": 5,
        "base": 4,
        "step": 4,
        "channels": 32,
        "growth": 16,
        "scales": 4,
        "head_channels": "input",
    },
}


def _cbr(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _branch(cin: int, cout: int, stride: int, bottleneck_width: int | None) -> nn.Sequential:
    """3×3 conv-BN-ReLU (stride 1 or 2), after a 1×1 bottleneck to ``min(cin, b·cout)`` channels when asked."""
    if bottleneck_width is None:
        return _cbr(cin, cout, 3, stride)
    inner = min(cin, bottleneck_width * cout)
    return nn.Sequential(_cbr(cin, inner, 1, 1), _cbr(inner, cout, 3, stride))


class ScaleUnit(nn.Module):
    """New channels of one scale: ``[x_s, down(x_{s−1}), same(x_s)]`` (``down`` absent: ``[x_s, same(x_s)]``)."""

    def __init__(self, same: nn.Module, down: nn.Module | None) -> None:
        super().__init__()
        self.same, self.down = same, down

    def forward(self, finer: Tensor | None, x: Tensor) -> Tensor:
        if self.down is None:
            return torch.cat([x, self.same(x)], dim=1)
        assert finer is not None
        return torch.cat([x, self.down(finer), self.same(x)], dim=1)


class MSDLayer(nn.Module):
    """One dense multi-scale layer: reads ``in_scales`` maps, writes the ``out_scales`` coarsest of them grown."""

    def __init__(
        self,
        c: int,
        growth: int,
        scale_widths: Sequence[int],
        bottleneck_widths: Sequence[int] | None,
        in_scales: int,
        out_scales: int,
    ) -> None:
        super().__init__()
        S = len(scale_widths)
        self.drop = in_scales - out_scales  # 0 or 1: the finest input map is only read, not kept
        first = S - out_scales  # absolute index of the finest kept scale

        def bw(s: int) -> int | None:
            return None if bottleneck_widths is None else bottleneck_widths[s]

        units = []
        for s in range(first, S):
            new = growth * scale_widths[s]
            if s == first and self.drop == 0:
                units.append(ScaleUnit(_branch(c * scale_widths[s], new, 1, bw(s)), None))
            else:
                same = _branch(c * scale_widths[s], new // 2, 1, bw(s))
                down = _branch(c * scale_widths[s - 1], new // 2, 2, bw(s - 1))
                units.append(ScaleUnit(same, down))
        self.units = nn.ModuleList(units)

    def forward(self, maps: Maps) -> Maps:
        d = self.drop
        return [u(maps[i + d - 1] if i + d > 0 else None, maps[i + d]) for i, u in enumerate(self.units)]


class Transition(nn.Module):
    """Compression: a 1×1 conv-BN-ReLU per scale."""

    def __init__(self, cin: Sequence[int], cout: Sequence[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_cbr(i, o, 1, 1) for i, o in zip(cin, cout))

    def forward(self, maps: Maps) -> Maps:
        return [conv(m) for conv, m in zip(self.convs, maps)]


class Stem(nn.Module):
    """The first layer: the finest map from the image, each coarser one by a stride-2 conv of the one above."""

    def __init__(self, cin: int, widths: Sequence[int], stem: str) -> None:
        super().__init__()
        if stem == "imagenet":
            first: nn.Module = nn.Sequential(_cbr(cin, widths[0], 7, 2), nn.MaxPool2d(3, stride=2, padding=1))
        else:
            first = _cbr(cin, widths[0], 3, 1)
        self.layers = nn.ModuleList([first, *(_cbr(a, b, 3, 2) for a, b in zip(widths, widths[1:]))])

    def forward(self, x: Tensor) -> Maps:
        maps = []
        for layer in self.layers:
            x = layer(x)
            maps.append(x)
        return maps


class MSDBlock(nn.Module):
    """One stage: the stem (block 0 only), then dense layers and transitions."""

    def __init__(self, stem: nn.Module | None, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stem = stem
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor | Maps) -> Maps:
        maps: Maps = self.stem(x) if self.stem is not None else x  # type: ignore[assignment]
        for layer in self.layers:
            maps = layer(maps)
        return maps


class MSDExit(nn.Module):
    """Classifier on the coarsest map: two 3×3 conv-BN-ReLU of stride 2, global average pooling, linear."""

    def __init__(self, cin: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(_cbr(cin, hidden, 3, 2), _cbr(hidden, hidden, 3, 2))
        self.linear = nn.Linear(hidden, num_classes)

    def forward(self, maps: Maps) -> Tensor:
        return self.linear(self.convs(maps[-1]).mean(dim=(2, 3)))


def block_steps(blocks: int, base: int, step: int, stepmode: str) -> list[int]:
    """Layers per block: ``base``, then ``step`` each (``even``) or ``step·k + 1`` for block ``k`` (``lin_grow``)."""
    if stepmode not in ("even", "lin_grow"):
        raise ValueError(f"stepmode must be 'even' or 'lin_grow', got {stepmode!r}")
    return [base] + [step if stepmode == "even" else step * k + 1 for k in range(1, blocks)]


def scale_plan(layers: int, scales: int, prune: str) -> list[tuple[int, int, bool]]:
    """For each layer ``l = 1..layers``: (scales read, scales kept, transition after it) — before ``reduction``."""
    if prune not in ("max", "min"):
        raise ValueError(f"prune must be 'max' or 'min', got {prune!r}")
    plan = []
    interval = math.ceil(layers / scales)
    for l in range(1, layers + 1):
        if prune == "max":
            n_in = scales - max(0, l - 2) // interval
            n_out = scales - (l - 1) // interval
            plan.append((n_in, n_out, n_in > n_out))
        else:
            n_in, n_out = min(scales, layers - l + 2), min(scales, layers - l + 1)
            plan.append((n_in, n_out, l in (layers // 3, 2 * layers // 3)))
    return plan


def _positive(name: str, v: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"msdnet: {name} must be a positive integer, got {v!r}")
    return v


def _widths(name: str, v: Sequence[int] | None, scales: int) -> list[int]:
    w = [min(2**s, 4) for s in range(scales)] if v is None else [_positive(name, x) for x in v]
    if len(w) != scales:
        raise ValueError(f"msdnet: {name} needs one entry per scale ({scales}), got {list(w)}")
    return w


@MODELS.register("msdnet", "MSDNet: multi-scale dense anytime net, one classifier per block (Huang et al. 2018)")
def msdnet(
    in_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    blocks: int | None = None,
    base: int | None = None,
    step: int | None = None,
    stepmode: str = "even",
    scales: int | None = None,
    channels: int | None = None,
    growth: int | None = None,
    scale_widths: Sequence[int] | None = None,
    bottleneck: bool = True,
    bottleneck_widths: Sequence[int] | None = None,
    reduction: float = 0.5,
    prune: str = "max",
    head_channels: int | str | None = None,
    stem: str | None = None,
) -> StagedNet:
    """MSDNet with one exit per block (see the module docstring for every option).

    Args:
        in_shape: ``(C, H, W)``.
        blocks, base, step, stepmode: number of blocks (= exits) and layers per block (MSDNet's ``nBlocks``,
            ``base``, ``step``, ``stepmode``).
        scales, channels, growth: MSDNet's ``nScales``, ``nChannels`` (channels of the finest map after the stem)
            and ``growthRate`` (channels a layer adds to the finest scale).
        scale_widths, bottleneck_widths: per-scale channel and bottleneck multipliers (``grFactor``, ``bnFactor``);
            default ``min(2^s, 4)``.
        bottleneck: 1×1 bottleneck before every 3×3 convolution of a layer.
        reduction, prune: transition compression factor (``0``: none) and scale-dropping policy.
        head_channels: width of the classifiers' convolutions, or ``"input"`` for the width of the map they read.
        stem: ``"cifar"`` or ``"imagenet"``; default ``imagenet`` for inputs of side ≥ 64, else ``cifar``. The other
            defaults (``None``) come from the stem's row of the table above.
    """
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3:
        raise ValueError(f"model 'msdnet' needs inputs of shape (C, H, W), got {shape}")
    if stem is None:
        stem = "imagenet" if min(shape[1:]) >= 64 else "cifar"
    if stem not in _VARIANTS:
        raise ValueError(f"msdnet: stem must be 'cifar' or 'imagenet', got {stem!r}")
    d = _VARIANTS[stem]
    blocks = _positive("blocks", int(d["blocks"]) if blocks is None else blocks)
    base = _positive("base", int(d["base"]) if base is None else base)
    step = _positive("step", int(d["step"]) if step is None else step)
    S = _positive("scales", int(d["scales"]) if scales is None else scales)
    c = _positive("channels", int(d["channels"]) if channels is None else channels)
    growth = _positive("growth", int(d["growth"]) if growth is None else growth)
    gw = _widths("scale_widths", scale_widths, S)
    bw = _widths("bottleneck_widths", bottleneck_widths if bottleneck_widths is not None else gw, S)
    if S > 1 and any(growth * w % 2 for w in gw[1:]):
        raise ValueError(
            f"msdnet: growth·scale_width must be even on every scale after the first (two branches of half each), "
            f"got growth={growth}, scale_widths={gw}"
        )
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0.0 <= reduction <= 1.0:
        raise ValueError(f"msdnet: reduction must be in [0, 1], got {reduction!r}")
    if not isinstance(bottleneck, bool):
        raise ValueError(f"msdnet: bottleneck must be true or false, got {bottleneck!r}")
    head = d["head_channels"] if head_channels is None else head_channels
    if head != "input" and (isinstance(head, bool) or not isinstance(head, int) or head < 1):
        raise ValueError(f"msdnet: head_channels must be a positive integer or 'input', got {head!r}")

    steps = block_steps(blocks, base, step, stepmode)
    plan = iter(scale_plan(sum(steps), S, prune))
    first: nn.Module | None = Stem(shape[0], [c * w for w in gw], stem)
    stages: list[nn.Module] = []
    exits: list[nn.Module] = []
    for n_layers in steps:
        layers: list[nn.Module] = []
        for _ in range(n_layers):
            n_in, n_out, transition = next(plan)
            layers.append(MSDLayer(c, growth, gw, bw if bottleneck else None, n_in, n_out))
            c += growth
            if transition and reduction > 0:
                c_new = math.floor(reduction * c)
                if c_new < 1:
                    raise ValueError(f"msdnet: reduction {reduction} leaves no channels (from {c})")
                kept = gw[S - n_out :]
                layers.append(Transition([c * w for w in kept], [c_new * w for w in kept]))
                c = c_new
        stages.append(MSDBlock(first, layers))
        first = None
        cin = c * gw[-1]
        exits.append(MSDExit(cin, cin if head == "input" else int(head), num_classes))
    net = StagedNet(stages, exits)
    _init_weights(net)
    return net


def _init_weights(net: nn.Module) -> None:
    # As released: He-normal convolutions (fan-out), batch norm at identity, zero linear biases.
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
