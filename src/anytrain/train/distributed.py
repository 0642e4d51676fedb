"""Data-parallel training on ``torch.distributed`` (DDP semantics, our own small implementation).

Every rank holds a full replica of the net, rule and optimizer, sees its own shard of each epoch
(``BatchLoader(rank=, world_size=)``) and the gradients are averaged over the ranks while the rule fills
``.grad``, with one coalesced all-reduce of a flat buffer per averaging point. Identical gradients into
identical optimizers keep the replicas bit-identical, so there is never a parameter broadcast after the first one.

What must be averaged, and where (the per-rule / per-optimizer contract). The trainer passes ``reduce=average_``
to the rule (or greedy procedure) on every step; on return, every gradient the call wrote is the rank average:

* Rules *linear* in the per-exit losses (``joint``, ``weighted``, amortized OSGD steps): the gradients of the
  weighted sum are averaged, one all-reduce: ``mean_r ∇ Σ_k w_k L_k^r = ∇ Σ_k w_k mean_r L_k^r``.
* Rules that combine the per-exit gradients *non-linearly* (OSGD, TorchJD aggregators): the ``K×P`` per-exit
  gradient matrix and the head gradients are averaged, in one call, *before* they are combined (Gram–Schmidt of
  the average, not average of Gram–Schmidts).
* Greedy procedures (``dgl``, ``sgl``): each module's gradients are averaged before its own optimizer steps.
* Rules with state computed from losses (``adaloss``) average the detached loss vector with the same ``reduce``
  before updating their running averages, so every rank computes the same weights.
* Optimizers whose state is a function of the gradients only (SGD, Adam, SLBI's ``z``/``Γ``) stay identical by
  themselves. Optimizers that read *activations* (the curvature optimizer's Kronecker factors) get the reducer
  through ``optimizer.set_reducer(fn)`` and average their factors before any eigendecomposition.
* BatchNorm: local batch statistics would make 2 ranks × B differ from 1 rank × 2B, so batch-norm layers are
  converted to synchronized batch norm (``torch.nn.SyncBatchNorm`` on CUDA; :class:`GlooSyncBatchNorm`, which
  also runs on CPU with gloo, elsewhere). Running statistics then stay identical on every rank.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); the
CLI calls :func:`init_from_env`. ``data.batch_size`` is the *per-rank* batch, as with DDP.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from anytrain.nets.modules import ModuleOptimizers
from anytrain.registry import ConfigError
from anytrain.rules._pergrad import average_grads_, grads_finite, reduce_tensors

Reducer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. ``world_size == 1``: not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_context() -> DistContext:
    """The context of the initialized default process group (single-process if there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistContext()


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when absent)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE must be an integer, got {raw!r}") from None


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Initialise the default process group from ``torchrun``'s environment, if ``WORLD_SIZE > 1``.

    Backend: ``nccl`` when training on CUDA, ``gloo`` otherwise. On CUDA the process is pinned to
    ``cuda:LOCAL_RANK``. Returns the context (``world_size == 1`` when not launched for several processes).
    """
    world = env_world_size()
    if world <= 1:
        return DistContext()
    if dist.is_initialized():
        return current_context()
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        init_method="env://",
        timeout=timedelta(seconds=timeout_s),
    )
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def barrier() -> None:
    """Wait for every rank (no-op single-process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- collectives --------------------------------------------------------------------------------------------
def average_(t: Tensor) -> Tensor:
    """Average ``t`` over all ranks, in place; returns ``t``. The identity without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


def all_agree(ok: bool, device: torch.device | None = None) -> bool:
    """True on every rank iff ``ok`` is true on every rank (one tiny all-reduce; no-op single-process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device or _collective_device())
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def first_bad_step(steps: Tensor) -> Tensor:
    """Element-wise minimum over ranks of "first bad step" markers (``-1`` = none); no-op single-process.

    Used at the trainer's log points so that every rank takes the same stop decision.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return steps
    big = torch.iinfo(torch.long).max
    t = torch.where(steps < 0, torch.full_like(steps, big), steps).to(torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return torch.where(t == big, torch.full_like(t, -1), t)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (one coalesced broadcast per dtype)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    tensors = [t.data for t in module.parameters()] + list(module.buffers())

    def from_src(flat: Tensor) -> Tensor:
        dist.broadcast(flat, src)
        return flat

    with torch.no_grad():
        torch._foreach_copy_(tensors, reduce_tensors(from_src, tensors))


# ---- synchronized batch norm that also runs on CPU (gloo) ---------------------------------------------------
class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` with its adjoint (again a sum over ranks) as backward."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g)
        return g


class GlooSyncBatchNorm(_BatchNorm):
    """Batch norm whose training-mode statistics are those of the *global* batch (all ranks together).

    Per channel ``c``, with a shift ``s_c`` identical on all ranks (the running mean; 0 without running stats)::

        S1 = Σ_ranks Σ_i (x_ic − s_c),   S2 = Σ_ranks Σ_i (x_ic − s_c)²,   N = Σ_ranks n_r
        μ_c = s_c + S1/N,                 σ²_c = S2/N − (S1/N)²           (shifted-data variance)
        y = γ_c (x − μ_c)/sqrt(σ²_c + ε) + β_c

    ``[S1, S2, N]`` travel in one all-reduce whose backward is again an all-reduce, so autograd gives the exact
    gradient of the global-batch normalisation. Running statistics use the unbiased ``σ²·N/(N−1)`` like
    ``nn.BatchNorm``. Outside training mode, or without an initialized process group, it is plain batch norm.
    Works with any backend (gloo on CPU included); ``nn.SyncBatchNorm`` needs CUDA.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input with at least 2 dimensions, got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        C = input.shape[1]
        shape = (1, C) + (1,) * (input.dim() - 2)
        dims = [0, *range(2, input.dim())]
        shift = (
            self.running_mean.detach().to(input.dtype)
            if self.running_mean is not None
            else torch.zeros(C, dtype=input.dtype, device=input.device)
        )
        xs = input - shift.view(shape)
        count = torch.full((1,), input.numel() // C, dtype=input.dtype, device=input.device)
        stats = _SumOverRanks.apply(torch.cat([xs.sum(dims), (xs * xs).sum(dims), count]))
        n = stats[2 * C]
        m1 = stats[:C] / n
        var = (stats[C : 2 * C] / n - m1 * m1).clamp_min(0.0)
        mean = shift + m1
        y = (input - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = float(self.momentum)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every batch-norm layer by a synchronized one, keeping the same ``Parameter`` objects and buffers
    (so optimizers and rules that hold parameter references stay valid). Returns the (possibly new) module."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlooSyncBatchNorm, nn.SyncBatchNorm)):
        new = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        ).to(device)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, device)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


# ---- wiring a run for data parallelism ----------------------------------------------------------------------
def _optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    if isinstance(optimizer, ModuleOptimizers):  # one optimizer per module (decoupled greedy learning)
        return [o for o in optimizer.optimizers if o is not None]
    return [optimizer]


def prepare(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Make one replica data-parallel: sync batch norm, rank 0's weights everywhere, the reducer on optimizers
    that expose ``set_reducer``. The rule gets ``reduce=average_`` from the trainer on every step."""
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    convert_sync_batchnorm(net, device)
    broadcast_module_(net)
    for opt in _optimizers(optimizer):
        set_reducer = getattr(opt, "set_reducer", None)
        if callable(set_reducer):
            set_reducer(average_)


__all__ = [
    "DistContext",
    "GlooSyncBatchNorm",
    "all_agree",
    "average_",
    "average_grads_",
    "barrier",
    "broadcast_module_",
    "convert_sync_batchnorm",
    "current_context",
    "first_bad_step",
    "grads_finite",
    "init_from_env",
    "prepare",
    "shutdown",
]
