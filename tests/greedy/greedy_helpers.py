"""Small nets and data shared by the greedy tests."""

from __future__ import annotations

import torch
from torch import nn

from anytrain.nets.heads import make_head
from anytrain.nets.staged import StagedNet


def small_net(
    num_stages: int = 3, width: int = 6, num_classes: int = 4, in_ch: int = 1, head: str = "linear"
) -> StagedNet:
    """A 1-D conv net with batch norm (so running statistics are part of the state) and one exit per stage."""
    stages, exits = [], []
    cin = in_ch
    for k in range(num_stages):
        stages.append(
            nn.Sequential(
                nn.Conv1d(cin, width, 3, padding=1, stride=1 if k == 0 else 2), nn.BatchNorm1d(width), nn.ReLU()
            )
        )
        exits.append(make_head(head, width, num_classes, 1))
        cin = width
    return StagedNet(stages, exits)


def batches(n: int, batch: int = 8, length: int = 16, num_classes: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 1, length, generator=g), torch.randint(0, num_classes, (batch,), generator=g))
        for _ in range(n)
    ]
