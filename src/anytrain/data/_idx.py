"""MNIST-format (IDX) image sets read from local files: Fashion-MNIST, MNIST, KMNIST.

Each is four files in one directory, gzipped or not::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

An IDX file is two zero bytes, a type code (0x08: unsigned byte), the number of dimensions ``d``, ``d``
big-endian 32-bit sizes, then the values in row-major order.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anytrain.data._bundle import DATASETS, DataBundle, normalize_channels, seeded_subset
from anytrain.registry import ConfigError

FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

_SETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {
        "default_dir": "/usr/share/datasets/fashion-mnist",
        "get": "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or the files of "
        "https://github.com/zalandoresearch/fashion-mnist",
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag"]
        + ["Ankle boot"],
    },
    "mnist": {"default_dir": None, "get": "the four files of the MNIST database (Y. LeCun et al.)", "classes": None},
    "kmnist": {
        "default_dir": None,
        "get": "the four MNIST-format files of https://github.com/rois-codh/kmnist",
        "classes": None,
    },
}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an IDX file (gzipped when its name ends in ``.gz``); one-line error if malformed."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ConfigError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:head])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - head != count:
        raise ConfigError(f"{path}: header says {shape} ({count} bytes) but {len(raw) - head} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def find_file(root: Path, stem: str, name: str) -> Path:
    for p in (root / stem, root / f"{stem}.gz"):
        if p.is_file():
            return p
    raise ConfigError(f"{name}: missing {root / stem}[.gz]; get it with {_SETS[name]['get']} (see docs/data.md)")


def load_idx_set(name: str, data_dir: str | None, seed: int, num_samples: int | None) -> DataBundle:
    spec = _SETS[name]
    if data_dir is None:
        default = spec["default_dir"]
        if default is None or not Path(default).is_dir():
            where = f" (default {default} does not exist)" if default else ""
            raise ConfigError(f"{name} needs data.data_dir: the directory of its four IDX files{where}")
        data_dir = default
    root = Path(data_dir).expanduser()
    arrays = {k: read_idx(find_file(root, stem, name)) for k, stem in FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError(f"{name} {split}: images {x.shape} and labels {y.shape} do not match in {root}")
        if len(y) and int(y.max()) >= 10:
            raise ConfigError(f"{name} {split}: labels outside [0, 10) in {root}")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ConfigError(f"{name}: train and test images differ in size in {root}")
    xtr = torch.from_numpy(arrays["x_train"].copy()).unsqueeze(1).float().div_(255.0)
    xte = torch.from_numpy(arrays["x_test"].copy()).unsqueeze(1).float().div_(255.0)
    ytr = torch.from_numpy(arrays["y_train"].astype(np.int64))
    yte = torch.from_numpy(arrays["y_test"].astype(np.int64))
    if num_samples is not None:
        keep = seeded_subset(len(ytr), num_samples, seed, 0x1D8)
        xtr, ytr = xtr[keep], ytr[keep]
    xtr, xte, mean, std = normalize_channels(xtr, xte)
    return DataBundle(
        name=name,
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        num_classes=10,
        input_shape=tuple(xtr.shape[1:]),
        augment=None,
        mean=mean,
        std=std,
        classes=spec["classes"],
        description=f"{name} from {root}",
        info={"path": str(root)},
    )


@DATASETS.register("fashion-mnist")
def fashion_mnist(
    *, data_dir: str | None = None, seed: int = 0, num_samples: int | None = None, augment: bool = True
) -> DataBundle:
    """Fashion-MNIST (IDX files; default dir /usr/share/datasets/fashion-mnist): 60k/10k 28×28 grey, 10 classes."""
    return load_idx_set("fashion-mnist", data_dir, seed, num_samples)


@DATASETS.register("mnist")
def mnist(
    *, data_dir: str | None = None, seed: int = 0, num_samples: int | None = None, augment: bool = True
) -> DataBundle:
    """MNIST from its four IDX files in data.data_dir: 60k/10k 28×28 grey digits."""
    return load_idx_set("mnist", data_dir, seed, num_samples)


@DATASETS.register("kmnist")
def kmnist(
    *, data_dir: str | None = None, seed: int = 0, num_samples: int | None = None, augment: bool = True
) -> DataBundle:
    """Kuzushiji-MNIST from its four IDX files in data.data_dir: 60k/10k 28×28 grey, 10 classes."""
    return load_idx_set("kmnist", data_dir, seed, num_samples)
