"""Networks and helpers shared by the inference tests."""

from __future__ import annotations

import torch
from torch import nn

from anytrain.eval import NEVER
from anytrain.nets import StagedNet, build_model

MSD_TINY = dict(blocks=3, base=1, step=1, scales=2, channels=2, growth=2, scale_widths=[1, 2], bottleneck_widths=[1, 2])
NETS = {
    "branched": lambda: build_model("cnn1d-exits", in_shape=(1, 40), num_classes=5, width=8),
    "nested-width": lambda: build_model("nested-width", in_shape=(1, 40), num_classes=5, stages=3),
    "nested-depth": lambda: build_model("nested-depth", in_shape=(1, 40), num_classes=5, stages=3),
    "nested-width-depth": lambda: build_model("nested-width-depth", in_shape=(1, 8, 8), num_classes=5, stages=3),
    "msdnet": lambda: build_model("msdnet", in_shape=(1, 8, 8), num_classes=5, head_channels=4, **MSD_TINY),
    "own": lambda: own_net(),
}
SHAPES = {"branched": (1, 40), "nested-width": (1, 40), "nested-depth": (1, 40)}


class _TwoTensorState(nn.Module):
    """A user's stage whose state is a dict of two tensors (a pytree the predictor must carry row by row)."""

    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d_in, d), nn.Linear(d_in, d)

    def forward(self, s: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        h = s if isinstance(s, torch.Tensor) else torch.cat([s["h"], s["skip"]], 1)
        return {"h": torch.relu(self.a(h.flatten(1))), "skip": torch.tanh(self.b(h.flatten(1)))}


class _Head(nn.Module):
    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * d, c)

    def forward(self, s: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat([s["h"], s["skip"]], 1))


def own_net() -> StagedNet:
    return StagedNet(
        [_TwoTensorState(12, 6), _TwoTensorState(12, 6), _TwoTensorState(12, 6)], [_Head(6, 5) for _ in range(3)]
    )


def shape_of(name: str) -> tuple[int, ...]:
    return SHAPES.get(name, (12,) if name == "own" else (1, 8, 8))


def safe_thresholds(conf: torch.Tensor, q: float) -> list[float]:
    """Per exit, a threshold near quantile ``q`` of the confidences that lies midway in a gap > 1e-4 (so float
    rounding between batch sizes cannot flip a decision)."""
    out = []
    for c in conf[:-1]:
        s = c.sort().values
        gaps = (s[1:] - s[:-1]) > 1e-4
        i = int(q * (len(s) - 1))
        j = next((j for j in list(range(i, len(s) - 1)) + list(range(i - 1, -1, -1)) if gaps[j]), None)
        out.append(NEVER if j is None else float(s[j] + s[j + 1]) / 2)
    return out


def reference(net: StagedNet, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return torch.stack(net(x))
