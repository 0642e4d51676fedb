"""``BatchLoader``: minibatches of in-memory tensors, a pure function of (seed, epoch), shardable."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from anytrain.data._bundle import Augment, derive_seed

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


class BatchLoader:
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
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if int(world_size) <= 0 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.augment = augment
        self.drop_last = bool(drop_last)
        self.device = torch.device(device) if device is not None else x.device
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.n = len(y)
        self._on_device = preload and device is not None
        if self._on_device:
            self.x, self.y = x.to(self.device), y.to(self.device)
        else:
            self.x, self.y = x, y
        self._pin = (not self._on_device) and self.device.type == "cuda"

    # ---- sizes --------------------------------------------------------------------------------------------
    @property
    def samples_per_rank(self) -> int:
        if self.drop_last:
            return self.n // self.world_size
        return math.ceil(self.n / self.world_size)

    def __len__(self) -> int:
        m = self.samples_per_rank
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    # ---- randomness ---------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self) -> Tensor:
        """The sample indices this rank visits in the current epoch, in order (CPU int64)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _PERM_STREAM))
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        total = self.samples_per_rank * self.world_size
        if total > self.n:  # pad by wrapping (possibly several times when world_size > n)
            perm = perm.repeat(math.ceil(total / max(self.n, 1)))
        perm = perm[:total]
        return perm[self.rank :: self.world_size]

    # ---- iteration ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self.epoch_indices()
        if self._on_device:
            idx = idx.to(self.device)
        aug, gen = self.augment, None
        if aug is not None:
            gen = _device_generator(self.device, derive_seed(self.seed, self.epoch, _AUG_STREAM))
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
