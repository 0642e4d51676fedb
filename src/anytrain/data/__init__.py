"""Data sets with train/validation/test splits, in memory or streamed, and deterministic, shardable loaders.

``load_dataset(name, data_dir=None, seed=0, num_samples=None, augment=True, val_size="auto", **options)``
returns a ``DataBundle`` (in-memory tensors) or a ``StreamingData`` (datasets read on the fly);
``from_datasets(train, test, ...)`` wraps a user's own map-style datasets. ``train_loader`` gives the
``BatchLoader`` / ``StreamLoader`` for either. Registered data sets: mnist1d, digits, fashion-mnist, mnist,
kmnist, cifar10, cifar100, synthetic, imagefolder. See ``docs/data.md``.
"""

from anytrain.data import _cifar, _digits, _idx, _imagefolder, _mnist1d, _synthetic  # noqa: F401  (registers them)
from anytrain.data._bundle import (
    DATASETS,
    DataBundle,
    load_dataset,
    normalize_channels,
    validation_count,
    validation_indices,
)
from anytrain.data._cache import cache_dir
from anytrain.data._idx import read_idx
from anytrain.data._stream import StreamingData, collate, from_datasets
from anytrain.data.augment import RandomCropFlip, crop_flip
from anytrain.data.loader import BatchLoader, StreamLoader, shard_indices, train_loader

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DataBundle",
    "RandomCropFlip",
    "StreamLoader",
    "StreamingData",
    "cache_dir",
    "collate",
    "crop_flip",
    "from_datasets",
    "load_dataset",
    "normalize_channels",
    "read_idx",
    "shard_indices",
    "train_loader",
    "validation_count",
    "validation_indices",
]
