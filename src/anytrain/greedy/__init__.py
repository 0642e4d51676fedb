"""Decoupled greedy learning (Belilovsky, Eickenberg & Oyallon, ICML 2020).

- re-exported from ``anytrain.nets.modules`` (a lower layer, so the ``dgl``/``sgl`` gradient rules of
  ``anytrain.rules`` build on it too): partition of a staged net into greedy modules, the decoupled forward
  pass, ``ModuleOptimizers`` (one optimizer per module, seen as one).
- ``buffer``: ``ReplayBuffer``, the bounded drop-oldest buffer between modules.
- ``async_dgl``: asynchronous DGL with replay buffers and heterogeneous module speeds, in one process.

One module per process on ``torch.distributed`` (``anytrain dgl-parallel`` / torchrun) is a training loop, so it
lives in ``anytrain.train.parallel``.
"""

from anytrain.greedy.async_dgl import AsyncConfig, AsyncStats, train_async_dgl
from anytrain.greedy.buffer import ReplayBuffer
from anytrain.nets.modules import (
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
