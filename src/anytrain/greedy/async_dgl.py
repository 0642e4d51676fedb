"""Asynchronous DGL with replay buffers, simulated in one process.

Each module ``j > 0`` reads ``(activation, label)`` batches from a bounded ``ReplayBuffer`` filled by module
``j-1``; module 0 reads the data stream. Heterogeneous speeds are simulated with a clock: at every tick, module
``j`` performs one step with probability ``p_j`` (``p_j = 1/S`` models a module ``S`` times slower than the
fastest). At a tick, modules act in order ``0..M-1``, so with all ``p_j = 1`` and capacity 1 every module
consumes the batch its producer has just written: exactly synchronous DGL (the test suite checks this).

One step of module ``j`` (Belilovsky et al., ICML 2020, §3.3, Algorithm 2)::

    (x, y) ~ U(B_j)                       uniform draw from the buffer (module 0: next data batch)
    z = f_j(x);  θ_j ← opt_j(∇_{θ_j} L(h_j(z), y))
    B_{j+1}.put(sg(z), y)                 drops the oldest entry when full

The run ends when module 0 has consumed ``epochs`` passes over the data (the end of the data stream); slower
modules have then made fewer steps, and consumers of a slow producer have re-used buffered batches. Both
effects are what the accuracy-vs-slow-down and accuracy-vs-buffer-size benchmarks measure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from anytrain.greedy.buffer import ReplayBuffer
from anytrain.greedy.modules import Partition, module_forward
from anytrain.nets.staged import StagedNet, detach_state


@dataclass(kw_only=True)
class AsyncConfig:
    """Options of the asynchronous simulation.

    Args:
        step_prob: ``p_j``, the probability that module ``j`` steps at a tick (one per module, in (0, 1]).
        buffer_size: capacity ``M`` of each inter-module buffer.
        draw: ``"uniform"`` (replay: sample a stored batch, it stays) or ``"fifo"`` (take the oldest out).
        seed: seeds the tick coins and the buffers' draws (the global torch RNG is not used).
        label_smoothing: of the cross-entropy losses.
    """

    step_prob: Sequence[float]
    buffer_size: int = 10
    draw: str = "uniform"
    seed: int = 0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        self.step_prob = [float(p) for p in self.step_prob]
        if not self.step_prob or any(not 0.0 < p <= 1.0 for p in self.step_prob):
            raise ValueError(f"step_prob must be a non-empty list of probabilities in (0, 1], got {self.step_prob}")
        if int(self.buffer_size) < 1:
            raise ValueError(f"buffer_size must be >= 1, got {self.buffer_size}")
        if self.draw not in ("uniform", "fifo"):
            raise ValueError(f"draw must be 'uniform' or 'fifo', got {self.draw!r}")


@dataclass
class AsyncStats:
    ticks: int = 0
    steps: list[int] = field(default_factory=list)
    skipped_empty: list[int] = field(default_factory=list)
    buffers: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _epochs(loader: Any, epochs: int) -> Iterator[tuple[Tensor, Tensor]]:
    for e in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(e)
        yield from loader


def train_async_dgl(
    net: StagedNet,
    partition: Partition,
    optimizers: Sequence[torch.optim.Optimizer | None],
    loader: Iterable[tuple[Tensor, Tensor]],
    epochs: int,
    config: AsyncConfig,
    on_step: Callable[[int], None] | None = None,
) -> AsyncStats:
    """Train ``net`` with asynchronous DGL (see the module docstring).

    Args:
        net: a staged network (``stages``/``exits``) in train mode.
        partition: stage indices per module (``partition_stages``).
        optimizers: one optimizer per module (``ModuleOptimizers.optimizers``).
        loader: yields ``(x, y)`` batches; ``set_epoch(e)`` is called before each pass if it exists.
        epochs: passes over the data made by module 0.
        config: speeds, buffer size and draw policy.
        on_step: called with the module index after each module step (e.g. to step its LR scheduler).

    Returns:
        ``AsyncStats``: ticks, steps and empty-buffer skips per module, buffer statistics, seconds.
    """
    m = len(partition)
    if len(config.step_prob) != m or len(optimizers) != m:
        raise ValueError(f"{m} modules but {len(config.step_prob)} step probabilities and {len(optimizers)} optimizers")
    gen = torch.Generator().manual_seed(int(config.seed))
    buffers: list[ReplayBuffer | None] = [None] + [
        ReplayBuffer(config.buffer_size, seed=int(config.seed) + 1000 + j) for j in range(1, m)
    ]
    stats = AsyncStats(steps=[0] * m, skipped_empty=[0] * m)
    probs = torch.tensor(config.step_prob)
    data = _epochs(loader, int(epochs))
    start = time.perf_counter()
    done = False
    while not done:
        stats.ticks += 1
        coins = torch.rand(m, generator=gen) < probs  # one draw per tick: the schedule is seed-determined
        for j in range(m):
            if not coins[j]:
                continue
            buf = buffers[j]
            if buf is None:
                batch = next(data, None)
                if batch is None:  # end of the data stream
                    done = True
                    break
            else:
                batch = buf.sample() if config.draw == "uniform" else buf.get()
                if batch is None:
                    stats.skipped_empty[j] += 1
                    continue
            x, y = batch
            opt = optimizers[j]
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            out, logits = module_forward(net, partition[j], x)
            loss = sum(F.cross_entropy(z, y, label_smoothing=config.label_smoothing) for z in logits)
            if opt is not None:
                loss.backward()  # type: ignore[union-attr]
                opt.step()
            nxt = buffers[j + 1] if j + 1 < m else None
            if nxt is not None:
                nxt.put(detach_state(out), y)
            stats.steps[j] += 1
            if on_step is not None:
                on_step(j)
    stats.seconds = time.perf_counter() - start
    stats.buffers = [b.stats() for b in buffers if b is not None]
    return stats


__all__ = ["AsyncConfig", "AsyncStats", "train_async_dgl"]
