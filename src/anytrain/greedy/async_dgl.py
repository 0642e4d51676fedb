"""Asynchronous DGL with replay buffers, simulated in one process.

Each module ``j > 0`` reads ``(activation, label)`` batches from a bounded ``ReplayBuffer`` filled by module
``j-1``; module 0 reads the data stream. Heterogeneous speeds are simulated with a clock: at every tick, module
``j`` performs one step with probability ``p_j`` (``p_j = 1/S`` models a module ``S`` times slower than the
fastest). At a tick, modules act in order ``0..M-1``, so with all ``p_j = 1`` and capacity 1 every module
consumes the batch its producer has just written: exactly synchronous DGL (the test suite checks this).

One step of module ``j`` (Belilovsky et al., ICML 2020, §3.3, Algorithm 2)::

    (x, y) ~ B_j                          a draw from the buffer (module 0: next data batch)
    z = f_j(x);  θ_j ← opt_j(∇_{θ_j} L(h_j(z), y))     anytrain.greedy.module_step, as in synchronous DGL
    B_{j+1}.put(sg(z), y)                 drops the oldest entry when full

Two choices (``AsyncConfig``):

- ``sampling``: how a consumer draws from its buffer: ``uniform`` (at random), ``least_used`` (an entry used
  the fewest times, the freshest among ties: the rule the DGL authors describe), or ``fifo`` (take the oldest
  out; no replay).
- ``updates``: when the run ends. ``until_first_done``: when module 0 has consumed ``epochs`` passes over the
  data; slower modules have then made fewer updates. ``equal`` (as the authors' code): every module makes
  exactly ``epochs × len(loader)`` updates; a module that has made them stops updating but, while a later
  module still needs updates, keeps forwarding batches in eval mode without gradients (module 0 keeps reading
  the data, pass after pass), so its consumer is fed fresh inputs rather than an ever-staler buffer. Under
  ``equal`` a slow module costs only staleness and re-use, not updates: comparing the two separates the effects.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from anytrain.greedy.buffer import ReplayBuffer
from anytrain.greedy.dgl import module_step
from anytrain.nets.modules import Partition
from anytrain.nets.staged import StagedNet, detach_state


@dataclass(kw_only=True)
class AsyncConfig:
    """Options of the asynchronous simulation.

    Args:
        step_prob: ``p_j``, the probability that module ``j`` steps at a tick (one per module, in (0, 1]).
        buffer_size: capacity ``M`` of each inter-module buffer.
        sampling: ``"uniform"`` or ``"least_used"`` (replay: draw a stored batch, it stays), or ``"fifo"``
            (take the oldest out).
        updates: ``"until_first_done"`` (the run ends with module 0's data) or ``"equal"`` (every module makes
            ``epochs × len(loader)`` updates; see the module docstring).
        seed: seeds the tick coins and the buffers' draws (the global torch RNG is not used).
        label_smoothing: of the cross-entropy losses.
    """

    step_prob: Sequence[float]
    buffer_size: int = 10
    sampling: str = "uniform"
    updates: str = "until_first_done"
    seed: int = 0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        self.step_prob = [float(p) for p in self.step_prob]
        if not self.step_prob or any(not 0.0 < p <= 1.0 for p in self.step_prob):
            raise ValueError(f"step_prob must be a non-empty list of probabilities in (0, 1], got {self.step_prob}")
        if int(self.buffer_size) < 1:
            raise ValueError(f"buffer_size must be >= 1, got {self.buffer_size}")
        if self.sampling not in ("uniform", "least_used", "fifo"):
            raise ValueError(f"sampling must be 'uniform', 'least_used' or 'fifo', got {self.sampling!r}")
        if self.updates not in ("until_first_done", "equal"):
            raise ValueError(f"updates must be 'until_first_done' or 'equal', got {self.updates!r}")


@dataclass
class AsyncStats:
    ticks: int = 0
    steps: list[int] = field(default_factory=list)
    forward_only: list[int] = field(default_factory=list)
    skipped_empty: list[int] = field(default_factory=list)
    buffers: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _epochs(loader: Any, epochs: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    for e in range(epochs) if epochs is not None else itertools.count():
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
        loader: yields ``(x, y)`` batches (``len(loader)`` of them per pass under ``updates="equal"``);
            ``set_epoch(e)`` is called before each pass if it exists.
        epochs: passes over the data that module 0 trains on.
        config: speeds, buffer size and draw policy.
        on_step: called with the module index after each module step (e.g. to step its LR scheduler).

    Returns:
        ``AsyncStats``: ticks, updates (``steps``), forward-only steps and empty-buffer skips per module, buffer
        statistics, seconds.
    """
    m = len(partition)
    if len(config.step_prob) != m or len(optimizers) != m:
        raise ValueError(f"{m} modules but {len(config.step_prob)} step probabilities and {len(optimizers)} optimizers")
    gen = torch.Generator().manual_seed(int(config.seed))
    equal = config.updates == "equal"
    if equal and not isinstance(loader, Sized):
        raise ValueError("updates='equal' needs a loader with a length (batches per pass)")
    limit = float(int(epochs) * len(loader)) if isinstance(loader, Sized) and equal else math.inf
    sampling = "uniform" if config.sampling == "fifo" else config.sampling
    buffers: list[ReplayBuffer | None] = [None] + [
        ReplayBuffer(config.buffer_size, seed=int(config.seed) + 1000 + j, sampling=sampling) for j in range(1, m)
    ]
    stats = AsyncStats(steps=[0] * m, forward_only=[0] * m, skipped_empty=[0] * m)
    probs = torch.tensor(config.step_prob)
    data = _epochs(loader, None if equal else int(epochs))
    loss_fn = functools.partial(F.cross_entropy, label_smoothing=config.label_smoothing)
    start = time.perf_counter()
    done = limit == 0
    while not done:
        stats.ticks += 1
        coins = torch.rand(m, generator=gen) < probs  # one draw per tick: the schedule is seed-determined
        for j in range(m):
            finished = stats.steps[j] >= limit
            if not coins[j] or (finished and (j + 1 == m or stats.steps[j + 1] >= limit)):
                continue  # a finished module with no consumer left to feed idles
            buf = buffers[j]
            if buf is None:
                batch = next(data, None)
                if batch is None:  # end of the data stream
                    done = True
                    break
            else:
                batch = buf.get() if config.sampling == "fifo" else buf.sample()
                if batch is None:
                    stats.skipped_empty[j] += 1
                    continue
            x, y = batch
            if finished:  # forward only, in eval mode: feeds the consumer without changing this module
                cast(ReplayBuffer, buffers[j + 1]).put(_frozen_forward(net, partition[j], x), y)
                stats.forward_only[j] += 1
                continue
            out = module_step(net, partition[j], x, y, optimizers[j], loss_fn=loss_fn).output
            nxt = buffers[j + 1] if j + 1 < m else None
            if nxt is not None:
                nxt.put(out, y)
            stats.steps[j] += 1
            if on_step is not None:
                on_step(j)
        if all(s >= limit for s in stats.steps):
            done = True
    if equal:  # modules that finished early were left in eval mode
        for j in range(m):
            _set_mode(net, partition[j], True)
    stats.seconds = time.perf_counter() - start
    stats.buffers = [b.stats() for b in buffers if b is not None]
    return stats


def _set_mode(net: StagedNet, stages: Sequence[int], train: bool) -> None:
    for k in stages:
        net.stages[k].train(train)
        net.exits[k].train(train)


@torch.no_grad()
def _frozen_forward(net: StagedNet, stages: Sequence[int], x: Any) -> Any:
    _set_mode(net, stages, False)  # batch-norm statistics of a finished module no longer move
    for k in stages:
        x = net.stages[k](x)
    return detach_state(x)


__all__ = ["AsyncConfig", "AsyncStats", "train_async_dgl"]
