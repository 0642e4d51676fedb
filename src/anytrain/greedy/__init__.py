"""Decoupled greedy learning (Belilovsky, Eickenberg & Oyallon, ICML 2020): procedures over (blocks, heads).

- ``dgl``: :func:`module_step` (one module: forward on a detached input, its exits' losses, backward, its own
  optimizer's step) and the synchronous procedures built on it, ``DGL`` and ``SGL``. Importing this package
  registers them under the config names ``rule: {name: dgl}`` / ``{name: sgl}``.
- ``async_dgl``: asynchronous DGL with replay buffers and heterogeneous module speeds, in one process.
- ``buffer``: ``ReplayBuffer``, the bounded drop-oldest buffer between modules.
- re-exported from ``anytrain.nets.modules``: the partition of a staged net into modules and
  ``ModuleOptimizers`` (one optimizer per module, seen as one).

One module per process on ``torch.distributed`` (``anytrain dgl-parallel`` / torchrun) is a training loop, so it
lives in ``anytrain.train.parallel``; it steps its module with :func:`module_step` too.
"""

from anytrain.greedy.async_dgl import AsyncConfig, AsyncStats, train_async_dgl
from anytrain.greedy.buffer import ReplayBuffer
from anytrain.greedy.dgl import DGL, SGL, GreedyProcedure, ModuleStep, module_step
from anytrain.nets.modules import (
    ModuleOptimizers,
    build_module_optimizers,
    module_forward,
    module_parameters,
    partition_stages,
)
from anytrain.rules import RULES

RULES.register("dgl", "decoupled greedy learning: each module learns only from its own exit")(DGL)
RULES.register("sgl", "sequential greedy learning: one module at a time, earlier ones frozen")(SGL)

__all__ = [
    "DGL",
    "SGL",
    "AsyncConfig",
    "AsyncStats",
    "GreedyProcedure",
    "ModuleOptimizers",
    "ModuleStep",
    "ReplayBuffer",
    "build_module_optimizers",
    "module_forward",
    "module_parameters",
    "module_step",
    "partition_stages",
    "train_async_dgl",
]
