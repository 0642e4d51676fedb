"""Data sets as in-memory tensors, and a deterministic, shardable batch loader.

``load_dataset(name, data_dir=None, seed=0, num_samples=None, augment=True, **options) -> DataBundle``;
``BatchLoader(x, y, batch_size, ...)``. Registered data sets: mnist1d, digits, cifar10, cifar100, synthetic,
imagefolder. See ``docs/data.md``.
"""

from anytrain.data import _cifar, _digits, _imagefolder, _mnist1d, _synthetic  # noqa: F401  (registers them)
from anytrain.data._bundle import DATASETS, DataBundle, load_dataset, normalize_channels
from anytrain.data._cache import cache_dir
from anytrain.data.augment import RandomCropFlip, crop_flip
from anytrain.data.loader import BatchLoader

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DataBundle",
    "RandomCropFlip",
    "cache_dir",
    "crop_flip",
    "load_dataset",
    "normalize_channels",
]
