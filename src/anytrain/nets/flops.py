"""FLOPs (multiply-adds) per stage and per exit head.

Counted from what actually runs: each stage and head is executed once on one sample under
``torch.utils.flop_counter.FlopCounterMode``, which sums the analytic cost of every matmul and convolution
kernel dispatched (2 FLOPs per multiply-add, so we halve it). Elementwise ops, normalisation and pooling are not
counted, which is the usual convention for MACs. Because the count follows dispatched kernels, functional
code (nested networks slicing weights) is counted the same way as ``nn.Conv2d``/``nn.Linear`` modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class Staged(Protocol):
    """What the counter needs of a staged net (``anytrain.nets.StagedNet`` has it; no import of it here)."""

    stages: nn.ModuleList
    exits: nn.ModuleList
    training: bool

    @property
    def num_exits(self) -> int: ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


def staged_macs(net: Staged, input_shape: Sequence[int]) -> tuple[list[int], list[int]]:
    was_training = net.training
    net.eval()
    try:
        p = next(net.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        state = torch.zeros(1, *input_shape, device=device, dtype=dtype)
        stage_macs, head_macs = [], []
        with torch.no_grad():
            for k in range(net.num_exits):
                stage_macs.append(macs_of(net.stages[k], state))
                state = net.stages[k](state)
                head_macs.append(macs_of(net.exits[k], state))
        return stage_macs, head_macs
    finally:
        net.train(was_training)


def macs_of(fn: Any, *args: Any) -> int:
    """Multiply-adds that ``fn(*args)`` performs in matmul/conv kernels, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return int(counter.get_total_flops()) // 2
