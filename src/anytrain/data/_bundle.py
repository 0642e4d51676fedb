"""The ``DataBundle`` every loader returns, the ``DATASETS`` registry and ``load_dataset``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from anytrain.registry import ConfigError, Registry

Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class DataBundle:
    """In-memory train/validation/test tensors of one data set, already normalised.

    ``x_*`` are float32 of shape ``(N, *input_shape)``; ``y_*`` int64 class indices in ``[0, num_classes)``.
    ``x_val``/``y_val`` hold the validation split (``None`` when there is none): :func:`load_dataset` carves it
    from the training set (:func:`carve_validation`), so ``x_train`` no longer contains those samples.
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
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    def __post_init__(self) -> None:
        # Cheap structural checks: every loader goes through here, so a wrong shape fails at load time, not in
        # the middle of training.
        splits = [("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)]
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError(f"{self.name}: x_val and y_val must both be set or both be None")
        if self.x_val is not None and self.y_val is not None:
            splits.append(("val", self.x_val, self.y_val))
        for split, x, y in splits:
            if x.dtype != torch.float32 or y.dtype != torch.int64:
                raise ValueError(f"{self.name} {split}: expected float32/int64, got {x.dtype}/{y.dtype}")
            if tuple(x.shape[1:]) != tuple(self.input_shape) or x.shape[0] != y.shape[0] or y.dim() != 1:
                raise ValueError(
                    f"{self.name} {split}: x {tuple(x.shape)} / y {tuple(y.shape)} do not match input_shape "
                    f"{self.input_shape}"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{self.name} {split}: labels outside [0, {self.num_classes})")

    def split_len(self, split: str) -> int:
        """Number of samples in ``split`` (``train``, ``val``, ``test``); 0 for a missing validation split."""
        y = {"train": self.y_train, "val": self.y_val, "test": self.y_test}[split]
        return 0 if y is None else len(y)

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, y)`` batches of ``split`` in order (views of the stored tensors), for evaluation."""
        x = {"train": self.x_train, "val": self.x_val, "test": self.x_test}[split]
        y = {"train": self.y_train, "val": self.y_val, "test": self.y_test}[split]
        if x is None or y is None:
            raise ValueError(f"{self.name} has no {split} split")
        for i in range(0, len(y), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]

    def with_validation(self, val_size: int | float | str | None, seed: int) -> DataBundle:
        """This bundle with ``val_size`` training samples moved to the validation split (see
        :func:`load_dataset`); an official validation split is kept as it is under ``"auto"``."""
        if self.x_val is not None:
            if val_size == "auto":
                return self
            raise ConfigError(f"{self.name} has an official validation split; leave data.val_size at 'auto'")
        k = validation_count(val_size, len(self.y_train))
        if k == 0:
            return self
        tr, va = validation_indices(self.y_train, len(self.y_train), k, seed)
        x, y = self.x_train, self.y_train
        return replace(self, x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va])

    def __repr__(self) -> str:
        val = None if self.x_val is None else tuple(self.x_val.shape)
        return (
            f"DataBundle(name={self.name!r}, train={tuple(self.x_train.shape)}, val={val}, "
            f"test={tuple(self.x_test.shape)}, "
            f"num_classes={self.num_classes}, augment={self.augment!r})"
        )


DATASETS: Registry[Callable[..., Any]] = Registry("data set")  # builders return DataBundle or StreamingData


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    num_samples: int | None = None,
    augment: bool = True,
    val_size: int | float | str | None = "auto",
    **kwargs: Any,
) -> Any:
    """Load the data set registered as ``name``, with a validation split carved from its training set.

    Args:
        name: registry name (``anytrain list`` shows them): mnist1d, digits, fashion-mnist, mnist, kmnist,
            cifar10, cifar100, synthetic, imagefolder.
        data_dir: directory holding the files of a data set that is read from disk (IDX, CIFAR, images).
        seed: determines generated data (mnist1d, synthetic), train/test/validation splits and subsets.
        num_samples: size option; its meaning per data set is documented in ``docs/data.md``.
        augment: attach the data set's standard training augmentation (``bundle.augment``), if it has one.
        val_size: validation samples taken from the training set (seeded, stratified by class): ``"auto"``
            (``min(10 %, 5000)``, or the data set's official validation split when it has one), a count
            (``0`` or ``None``: no validation split), or a fraction in (0, 1).
        **kwargs: data-set specific options; unknown ones raise ``ConfigError`` listing the allowed ones.

    Returns:
        A :class:`DataBundle` (in memory) or, for data streamed from disk, a
        :class:`~anytrain.data.StreamingData`.

    Example:
        >>> b = load_dataset("synthetic", n_train=64, n_test=32)
        >>> b.x_train.shape, b.x_val.shape, b.num_classes
        (torch.Size([58, 1, 16]), torch.Size([6, 1, 16]), 4)
    """
    if num_samples is not None and (isinstance(num_samples, bool) or int(num_samples) <= 0):
        raise ConfigError(f"data set {name!r}: num_samples must be a positive integer, got {num_samples!r}")
    _check_options(name, kwargs)
    bundle = DATASETS.build(
        name,
        data_dir=data_dir,
        seed=int(seed),
        num_samples=None if num_samples is None else int(num_samples),
        augment=bool(augment),
        **kwargs,
    )
    return bundle.with_validation(val_size, int(seed))


#: Keywords ``load_dataset`` passes to every data set's builder: not data-set options.
_COMMON = ("data_dir", "seed", "num_samples", "augment")


def dataset_options(name: str) -> list[str] | None:
    """The options data set ``name`` takes (``data.options``), in its builder's order; ``None`` when its builder
    takes any keyword."""
    params = inspect.signature(DATASETS.get(name)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name not in _COMMON]


def _check_options(name: str, options: dict[str, Any]) -> None:
    """A one-line ``ConfigError`` for options data set ``name`` does not take: which ones, what it does take
    (or that it takes none), and the ``data`` section's own keys, which belong beside ``options``."""
    from anytrain.config import DataConfig  # a lower layer: the keys of the config's data section

    allowed = dataset_options(name)
    unknown = sorted(set(options) - set(allowed)) if allowed is not None else []
    if not unknown:
        return
    own = [f.name for f in fields(DataConfig) if f.name != "options"]
    got = ", ".join(unknown)
    if allowed:
        msg = f"data set {name!r}: unknown option(s) {got} in data.options; it takes {', '.join(allowed)}"
    else:
        msg = f"data set {name!r} takes no options, got data.options {got}"
    misplaced = [k for k in unknown if k in own]
    if misplaced:
        msg += f" ({misplaced[0]} is a key of the data section: set data.{misplaced[0]})"
    raise ConfigError(f"{msg}; the data section's own keys are {', '.join(own)}")


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


def validation_count(val_size: int | float | str | None, n: int) -> int:
    """How many of ``n`` training samples ``val_size`` asks for (see :func:`load_dataset`)."""
    if val_size is None:
        return 0
    if val_size == "auto":
        return min(round(0.1 * n), 5000)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ConfigError(f"data.val_size must be 'auto', a count or a fraction in (0, 1), got {val_size!r}")
    if isinstance(val_size, float) and not val_size.is_integer():
        if not 0.0 < val_size < 1.0:
            raise ConfigError(f"data.val_size: a fraction must be in (0, 1), got {val_size}")
        k = round(val_size * n)
    else:
        k = int(val_size)
    if k < 0 or k >= n:
        raise ConfigError(f"data.val_size={val_size!r} leaves no training samples (the training set has {n})")
    return k


def validation_indices(labels: Tensor | None, n: int, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded, class-stratified choice of ``k`` of ``range(n)`` for validation; returns sorted
    ``(train_idx, val_idx)``.

    Each class's samples are put in a random order and the ``i``-th of ``n_c`` gets the key ``(i + ½) / n_c``;
    the ``k`` smallest keys (ties in a random order) go to validation. So every class contributes
    ``k · n_c / n`` samples up to rounding (within one) and the total is exactly ``k``. Without ``labels``
    (a data set that does not expose them) the choice is a plain seeded random subset.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, 0x7A1))
    if labels is None:
        order = torch.randperm(n, generator=g)
    else:
        key = torch.empty(n, dtype=torch.float64)
        for c in torch.unique(labels).tolist():
            idx = torch.nonzero(labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            key[idx] = (torch.arange(len(idx), dtype=torch.float64) + 0.5) / len(idx)
        tiebreak = torch.randperm(n, generator=g)
        order = tiebreak[torch.argsort(key[tiebreak], stable=True)]
    val = order[:k].sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val


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
