"""Learning-rate schedules, stepped once per training step (so they are exact under resume)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from anytrain.registry import Registry

SCHEDULES: Registry = Registry("schedule")


def _warm(fn: Callable[[int], float], warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return fn(step)

    return f


@SCHEDULES.register("none", "constant learning rate")
def _none(total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0) -> Callable[[int], float]:
    return _warm(lambda s: 1.0, int(warmup_epochs * steps_per_epoch))


@SCHEDULES.register("cosine", "cosine decay to final_factor·lr over the run")
def _cosine(
    total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0, final_factor: float = 0.0
) -> Callable[[int], float]:
    w = int(warmup_epochs * steps_per_epoch)
    span = max(1, total_steps - w)

    def f(step: int) -> float:
        t = min(1.0, (step - w) / span)
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return _warm(f, w)


@SCHEDULES.register("step", "multiply lr by gamma at each epoch in milestones")
def _step(
    total_steps: int,
    steps_per_epoch: int,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> Callable[[int], float]:
    ms = sorted(float(m) for m in milestones)

    def f(step: int) -> float:
        epoch = step / steps_per_epoch
        return gamma ** sum(epoch >= m for m in ms)

    return _warm(f, int(warmup_epochs * steps_per_epoch))


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, **options: Any
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule registered as ``name`` over ``total_steps`` steps, on ``optimizer``'s learning rates; a bad
    option is a one-line ``ConfigError``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES.build(name, total_steps, steps_per_epoch, **options))
