"""The ``DataBundle`` every loader returns, the ``DATASETS`` registry and ``load_dataset``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from anytrain.registry import ConfigError, Registry

Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class DataBundle:
    """In-memory train/test tensors of one data set, already normalised.

    ``x_*`` are float32 of shape ``(N, *input_shape)``; ``y_*`` int64 class indices in ``[0, num_classes)``.
    ``augment`` is a batch-level training transform ``augment(x, generator) -> x`` (or ``None``); it is
    applied by :class:`~anytrain.data.BatchLoader` on the device the batch lands on. ``mean``/``std`` are the
    per-channel statistics that were subtracted/divided (so ``x * std + mean`` recovers the raw values).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    augment: Augment | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: list[str] | None = None
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Cheap structural checks: every loader goes through here, so a wrong shape fails at load time, not in
        # the middle of training.
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.float32 or y.dtype != torch.int64:
                raise ValueError(f"{self.name} {split}: expected float32/int64, got {x.dtype}/{y.dtype}")
            if tuple(x.shape[1:]) != tuple(self.input_shape) or x.shape[0] != y.shape[0] or y.dim() != 1:
                raise ValueError(
                    f"{self.name} {split}: x {tuple(x.shape)} / y {tuple(y.shape)} do not match input_shape "
                    f"{self.input_shape}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{self.name} {split}: labels outside [0, {self.num_classes})")

    def __repr__(self) -> str:
        return (
            f"DataBundle(name={self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, "
            f"num_classes={self.num_classes}, augment={self.augment!r})"
        )


DATASETS: Registry[Callable[..., DataBundle]] = Registry("data set")


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    num_samples: int | None = None,
    augment: bool = True,
    **kwargs: Any,
) -> DataBundle:
    """Load the data set registered as ``name``.

    Args:
        name: registry name (``anytrain list`` shows them): mnist1d, digits, cifar10, cifar100, synthetic.
        data_dir: directory holding the files of a data set that is read from disk (CIFAR).
        seed: determines generated data (mnist1d, synthetic) and train/test splits or subsets.
        num_samples: size option; its meaning per data set is documented in ``docs/data.md``.
        augment: attach the data set's standard training augmentation (``bundle.augment``), if it has one.
        **kwargs: data-set specific options; unknown ones raise ``ConfigError`` listing the allowed ones.

    Example:
        >>> b = load_dataset("synthetic", n_train=64, n_test=32)
        >>> b.x_train.shape, b.num_classes
        (torch.Size([64, 1, 16]), 4)
    """
    builder = DATASETS.get(name)
    params = inspect.signature(builder).parameters
    allowed = sorted(k for k in params if k not in ("data_dir", "seed", "num_samples", "augment"))
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(
            f"data set {name!r}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}"
        )
    if num_samples is not None and (isinstance(num_samples, bool) or int(num_samples) <= 0):
        raise ConfigError(f"data set {name!r}: num_samples must be a positive integer, got {num_samples!r}")
    return builder(
        data_dir=data_dir,
        seed=int(seed),
        num_samples=None if num_samples is None else int(num_samples),
        augment=bool(augment),
        **kwargs,
    )


def normalize_channels(
    x_train: Tensor, x_test: Tensor, mean: Tensor | None = None, std: Tensor | None = None
) -> tuple[Tensor, Tensor, tuple[float, ...], tuple[float, ...]]:
    """Subtract/divide per-channel (dim 1) statistics; by default those of the *training* set only, so no test
    information leaks into the inputs. Computed in float64 for accuracy, returned as float32."""
    c = x_train.shape[1]
    if mean is None or std is None:
        flat = x_train.double().transpose(0, 1).reshape(c, -1)
        mean = flat.mean(1)
        std = flat.std(1, correction=0).clamp_min(1e-12)
    shape = (1, c) + (1,) * (x_train.dim() - 2)
    m, s = mean.double().reshape(shape), std.double().reshape(shape)
    xtr = ((x_train.double() - m) / s).float()
    xte = ((x_test.double() - m) / s).float()
    return xtr, xte, tuple(float(v) for v in mean), tuple(float(v) for v in std)


def seeded_subset(n: int, k: int, seed: int, stream: int) -> Tensor:
    """A seeded random subset of ``k`` of ``range(n)`` (sorted, so the original order is kept)."""
    if k > n:
        raise ConfigError(f"num_samples={k} exceeds the {n} available training samples")
    g = torch.Generator().manual_seed(derive_seed(seed, stream))
    return torch.randperm(n, generator=g)[:k].sort().values


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers ``parts`` (independent streams per tuple)."""
    import numpy as np

    words = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])
