"""Data that is not held in memory: any map-style ``torch.utils.data.Dataset``, read batch by batch.

``StreamingData`` is the streamed counterpart of :class:`~anytrain.data.DataBundle`: train/validation/test
datasets whose items are ``(x, y)`` pairs (``x`` a float tensor of ``input_shape``, ``y`` an integer class).
The trainer reads its training batches with :class:`~anytrain.data.StreamLoader` and evaluates with
:meth:`StreamingData.batches`; ``from_datasets`` wraps a user's own datasets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from anytrain.data._bundle import Augment, validation_count, validation_indices
from anytrain.registry import ConfigError


def collate(items: Sequence[tuple[Any, Any]]) -> tuple[Tensor, Tensor]:
    """Stack ``(x, y)`` items into a float32 batch and an int64 label vector."""
    xs, ys = zip(*items)
    x = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in xs])
    return x, torch.tensor([int(v) for v in ys], dtype=torch.int64)


def dataset_labels(ds: Dataset) -> Tensor | None:
    """The class labels of ``ds`` when it exposes them without reading samples: a ``targets`` attribute (the
    torchvision convention), or a ``Subset`` of such a dataset. ``None`` otherwise."""
    if isinstance(ds, Subset):
        inner = dataset_labels(ds.dataset)
        return None if inner is None else inner[torch.as_tensor(ds.indices, dtype=torch.int64)]
    t = getattr(ds, "targets", None)
    return None if t is None else torch.as_tensor(t, dtype=torch.int64)


@dataclass
class StreamingData:
    """Train/validation/test ``Dataset``\\ s read from disk (or computed) on the fly.

    ``augment`` is a batch-level training transform applied after a batch is on its device (as for
    ``DataBundle``); ``num_workers`` is the number of ``DataLoader`` worker processes for every split.
    Batch order is a pure function of (seed, epoch) provided each dataset's ``__getitem__`` is deterministic
    (no unseeded random per-sample transforms).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    val: Dataset | None = None
    augment: Augment | None = None
    num_workers: int = 0
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def split_len(self, split: str) -> int:
        ds = {"train": self.train, "val": self.val, "test": self.test}[split]
        return 0 if ds is None else len(ds)  # type: ignore[arg-type]

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, y)`` batches of ``split`` in order, for evaluation."""
        ds = {"train": self.train, "val": self.val, "test": self.test}[split]
        if ds is None:
            raise ValueError(f"{self.name} has no {split} split")
        yield from torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=collate
        )

    def with_validation(self, val_size: int | float | str | None, seed: int) -> StreamingData:
        """``val_size`` training samples moved to validation, stratified when the training set exposes its
        labels (``targets``), else a seeded random subset (recorded in ``info["val_split"]``)."""
        if self.val is not None:
            if val_size == "auto":
                return self
            raise ConfigError(f"{self.name} has an official validation split; leave data.val_size at 'auto'")
        n = len(self.train)  # type: ignore[arg-type]
        k = validation_count(val_size, n)
        if k == 0:
            return self
        labels = dataset_labels(self.train)
        tr, va = validation_indices(labels, n, k, seed)
        info = {**self.info, "val_split": "random" if labels is None else "stratified"}
        return replace(self, train=Subset(self.train, tr.tolist()), val=Subset(self.train, va.tolist()), info=info)

    def __repr__(self) -> str:
        return (
            f"StreamingData(name={self.name!r}, train={self.split_len('train')}, val={self.split_len('val')}, "
            f"test={self.split_len('test')}, num_classes={self.num_classes}, workers={self.num_workers})"
        )


def from_datasets(
    train: Dataset,
    test: Dataset,
    *,
    val: Dataset | None = None,
    num_classes: int | None = None,
    val_size: int | float | str | None = "auto",
    seed: int = 0,
    augment: Augment | None = None,
    num_workers: int = 0,
    name: str = "custom",
) -> StreamingData:
    """Wrap a user's map-style datasets of ``(x, y)`` items for the trainer.

    Without ``val``, ``val_size`` samples of ``train`` become the validation split (see ``load_dataset``).
    ``num_classes`` defaults to ``max(train.targets) + 1`` when the dataset has ``targets``.

    Example:
        >>> xs, ys = torch.randn(50, 1, 8), torch.arange(50) % 5
        >>> ds = torch.utils.data.TensorDataset(xs, ys)
        >>> d = from_datasets(ds, ds, num_classes=5)
        >>> d.split_len("train"), d.split_len("val"), d.input_shape
        (45, 5, (1, 8))
    """
    if num_classes is None:
        labels = dataset_labels(train)
        if labels is None:
            raise ConfigError("from_datasets: pass num_classes (the training set has no `targets`)")
        num_classes = int(labels.max()) + 1
    if len(train) == 0 or len(test) == 0:  # type: ignore[arg-type]
        raise ConfigError("from_datasets: the training and test sets must be non-empty")
    x0 = torch.as_tensor(train[0][0])
    data = StreamingData(
        name=name,
        train=train,
        test=test,
        num_classes=int(num_classes),
        input_shape=tuple(x0.shape),
        val=val,
        augment=augment,
        num_workers=int(num_workers),
        description=f"user datasets ({type(train).__name__})",
    )
    return data.with_validation(val_size, seed)
