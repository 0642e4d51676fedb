"""Training batches that are a pure function of (seed, epoch) and shard disjointly across ranks.

``BatchLoader`` gathers minibatches from in-memory tensors (the fast path); ``StreamLoader`` reads the same
index batches from any map-style ``torch.utils.data.Dataset`` through ``DataLoader`` workers. Both draw their
order from :func:`shard_indices`, so on the same data they yield the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from anytrain.data._bundle import Augment, DataBundle, derive_seed
from anytrain.data._stream import StreamingData, collate

# Independent random streams derived from (seed, epoch, stream).
_PERM_STREAM = 0
_AUG_STREAM = 1


def _device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` when that device type has one, else on the CPU."""
    try:
        g = torch.Generator(device=device)
    except (RuntimeError, TypeError):
        g = torch.Generator()
    return g.manual_seed(seed)


def shard_indices(
    n: int, seed: int, epoch: int, *, shuffle: bool = True, rank: int = 0, world_size: int = 1, drop_last: bool = False
) -> Tensor:
    """The sample indices rank ``rank`` visits in epoch ``epoch``, in order (CPU int64); see
    :class:`BatchLoader` for the permutation, truncation and padding rules."""
    if shuffle:
        g = torch.Generator().manual_seed(derive_seed(seed, epoch, _PERM_STREAM))
        perm = torch.randperm(n, generator=g)
    else:
        perm = torch.arange(n)
    per_rank = n // world_size if drop_last else math.ceil(n / world_size)
    total = per_rank * world_size
    if total > n:  # pad by wrapping (possibly several times when world_size > n)
        perm = perm.repeat(math.ceil(total / max(n, 1)))
    return perm[:total][rank::world_size]


class _ShardedBatches:
    """Sizes, epoch order and augmentation generator shared by the two loaders."""

    n: int
    batch_size: int
    shuffle: bool
    seed: int
    epoch: int
    drop_last: bool
    rank: int
    world_size: int
    device: torch.device
    augment: Augment | None

    def _setup(
        self, n: int, batch_size: int, shuffle: bool, seed: int, augment: Augment | None, drop_last: bool,
        rank: int, world_size: int,
    ) -> None:  # fmt: skip
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if int(world_size) <= 0 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.augment = augment
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0

    @property
    def samples_per_rank(self) -> int:
        if self.drop_last:
            return self.n // self.world_size
        return math.ceil(self.n / self.world_size)

    def __len__(self) -> int:
        m = self.samples_per_rank
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self) -> Tensor:
        """The sample indices this rank visits in the current epoch, in order (CPU int64)."""
        return shard_indices(
            self.n,
            self.seed,
            self.epoch,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
        )

    def _aug_generator(self) -> torch.Generator | None:
        if self.augment is None:
            return None
        return _device_generator(self.device, derive_seed(self.seed, self.epoch, _AUG_STREAM))


class BatchLoader(_ShardedBatches):
    """Iterates ``(x, y)`` minibatches of in-memory tensors.

    * The order of an epoch is ``torch.randperm`` from a CPU generator seeded by ``(seed, epoch)``; the
      augmentation generator (on the target device if its type supports one, else CPU) is seeded by
      ``(seed, epoch)`` too. So everything an epoch yields is a pure function of ``(seed, epoch)``: iterating
      twice gives the same batches, and a run resumed at an epoch boundary sees exactly the batches of an
      uninterrupted run.
    * Sharding (``world_size > 1``): all ranks draw the same epoch permutation and rank ``r`` takes positions
      ``r, r + world_size, ...`` of it, so shards are disjoint. To make every rank yield the same number of
      batches the permutation is first *truncated* to a multiple of ``world_size`` when ``drop_last`` is true,
      otherwise *padded by wrapping around* to the next multiple (a few samples then appear twice in that
      epoch, as with ``torch.utils.data.DistributedSampler``).
    * ``drop_last`` also drops a final incomplete batch of each rank.
    * With ``device`` set, the data are moved there once (``preload=True``, the default) and batches are
      gathered on the device; with ``preload=False`` each batch is gathered on the CPU and copied (pinned,
      non-blocking for CUDA). ``augment`` is applied to ``x`` after it is on the device.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        augment: Augment | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        rank: int = 0,
        world_size: int = 1,
        preload: bool = True,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self._setup(len(y), batch_size, shuffle, seed, augment, drop_last, rank, world_size)
        self.device = torch.device(device) if device is not None else x.device
        self._on_device = preload and device is not None
        if self._on_device:
            self.x, self.y = x.to(self.device), y.to(self.device)
        else:
            self.x, self.y = x, y
        self._pin = (not self._on_device) and self.device.type == "cuda"

    # ---- iteration ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self.epoch_indices()
        if self._on_device:
            idx = idx.to(self.device)
        aug, gen = self.augment, self._aug_generator()
        for i in range(len(self)):
            bi = idx[i * self.batch_size : (i + 1) * self.batch_size]
            xb, yb = self.x[bi], self.y[bi]
            if not self._on_device:
                if self._pin:
                    xb, yb = xb.pin_memory(), yb.pin_memory()
                xb = xb.to(self.device, non_blocking=True)
                yb = yb.to(self.device, non_blocking=True)
            if aug is not None and gen is not None:
                xb = aug(xb, gen)
            yield xb, yb

    def __repr__(self) -> str:
        return (
            f"BatchLoader(n={self.n}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, "
            f"drop_last={self.drop_last}, rank={self.rank}/{self.world_size}, device={self.device})"
        )


class StreamLoader(_ShardedBatches):
    """Iterates ``(x, y)`` minibatches of a map-style ``Dataset`` read by ``DataLoader`` workers.

    The index batches are exactly those :class:`BatchLoader` would gather for the same ``n`` and arguments
    (same permutation, sharding, ``drop_last``), and the batch-level ``augment`` draws from the same generator,
    so what an epoch yields is a pure function of ``(seed, epoch)`` as long as the dataset's ``__getitem__``
    is deterministic. Samples go through ``num_workers`` worker processes (``0``: read in this process) and are
    stacked by :func:`~anytrain.data.collate`; batches are copied to ``device`` (pinned, non-blocking on CUDA).
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        augment: Augment | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self._setup(len(dataset), batch_size, shuffle, seed, augment, drop_last, rank, world_size)  # type: ignore[arg-type]
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_workers = int(num_workers)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self.epoch_indices()
        index_batches = [idx[i * self.batch_size : (i + 1) * self.batch_size].tolist() for i in range(len(self))]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=index_batches,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )
        gen = self._aug_generator()
        for xb, yb in loader:
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
            if self.augment is not None and gen is not None:
                xb = self.augment(xb, gen)
            yield xb, yb

    def __repr__(self) -> str:
        return (
            f"StreamLoader(n={self.n}, batch_size={self.batch_size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"drop_last={self.drop_last}, rank={self.rank}/{self.world_size}, workers={self.num_workers}, "
            f"device={self.device})"
        )


def train_loader(data: DataBundle | StreamingData, batch_size: int, **kwargs: Any) -> BatchLoader | StreamLoader:
    """The training loader of ``data``: :class:`BatchLoader` over in-memory tensors, :class:`StreamLoader`
    (with the data's ``num_workers``) over a streamed data set. ``kwargs`` go to the loader."""
    if isinstance(data, DataBundle):
        return BatchLoader(data.x_train, data.y_train, batch_size, **kwargs)
    return StreamLoader(data.train, batch_size, num_workers=data.num_workers, **kwargs)
