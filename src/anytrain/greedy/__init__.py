"""Decoupled greedy learning (Belilovsky, Eickenberg & Oyallon, ICML 2020).

- ``modules``: partition of a staged net into greedy modules, the decoupled forward pass, ``ModuleOptimizers``
  (one optimizer per module, seen as one). The ``dgl``/``sgl`` gradient rules live in
  ``anytrain.rules.greedy_rules`` and build on these.
- ``buffer``: ``ReplayBuffer``, the bounded drop-oldest buffer between modules.
- ``async_dgl``: asynchronous DGL with replay buffers and heterogeneous module speeds, in one process.
- ``parallel``: one module per process on ``torch.distributed`` (``anytrain dgl-parallel`` / torchrun).
"""

from anytrain.greedy.async_dgl import AsyncConfig, AsyncStats, train_async_dgl
from anytrain.greedy.buffer import ReplayBuffer
from anytrain.greedy.modules import (
    ModuleOptimizers,
    build_module_optimizers,
    decoupled_forward,
    module_forward,
    module_parameters,
    partition_stages,
)

__all__ = [
    "AsyncConfig",
    "AsyncStats",
    "ModuleOptimizers",
    "ReplayBuffer",
    "build_module_optimizers",
    "decoupled_forward",
    "module_forward",
    "module_parameters",
    "partition_stages",
    "train_async_dgl",
]
