"""CIFAR-10 / CIFAR-100 read from the official python-pickle directories (no download, no torchvision).

Expected layout (as extracted from ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``)::

    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/     train, test, meta

``data_dir`` may point at that folder or at its parent.

The files are Python pickles. They are meant to be the trusted local files from the official archive, and
we still never run ``pickle.load`` with the default class lookup: :class:`_ArrayUnpickler` admits only the
three globals a numpy array needs (``_reconstruct``, ``ndarray``, ``dtype``), so a tampered file cannot
import or call anything else. What was loaded is then checked for shape, dtype and label range.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anytrain.data._bundle import DATASETS, DataBundle, seeded_subset
from anytrain.data.augment import RandomCropFlip
from anytrain.registry import ConfigError

# Standard per-channel statistics of the training images (pixel values scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_SPECS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
    },
}


def _reconstruct_fn() -> Any:
    # The array-rebuild functions numpy itself writes into pickles (protocol <= 4 and protocol 5); taken from
    # numpy rather than imported by path because the module moved between numpy 1 and 2.
    return np.empty(0).__reduce__()[0]


def _frombuffer_fn() -> Any:
    return np.empty(1).__reduce_ex__(5)[0]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays; anything else is refused.

    ``_codecs.encode`` is how Python 3 writes ``bytes`` at protocol 2 (str -> bytes, no side effects); the
    official files, written by Python 2, use plain string opcodes instead.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_fn,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_fn,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer_fn,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer_fn,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        fn = self._ALLOWED.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR pickle")
        return fn()


def _unpickle(path: Path) -> Any:
    with path.open("rb") as f:
        blob = f.read()
    try:
        return _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # any failure to parse is a bad file, reported in one line
        raise ConfigError(f"cannot read CIFAR file {path}: {type(e).__name__}: {e}") from None


def find_cifar_dir(name: str, data_dir: str | None) -> Path:
    """The directory holding the pickles of ``name`` (``data_dir`` itself or ``data_dir/<folder>``)."""
    spec = _SPECS[name]
    files = [*spec["train"], *spec["test"], spec["meta"]]
    expected = f"{spec['folder']}/{{{','.join(files)}}}"
    if data_dir is None:
        raise ConfigError(f"{name} needs data.data_dir: a directory with {expected}; none was given")
    root = Path(data_dir).expanduser()
    candidates = [root / spec["folder"], root]
    for c in candidates:
        if all((c / f).is_file() for f in files):
            return c
    searched = " or ".join(str(c) for c in candidates)
    present = [c for c in candidates if c.is_dir() and any((c / f).exists() for f in files)]
    if present:
        missing = [f for f in files if not (present[0] / f).is_file()]
        raise ConfigError(
            f"{name}: incomplete data directory {present[0]} (missing {', '.join(missing)}); expected {expected}"
        )
    raise ConfigError(f"{name}: expected {expected} under {searched}; not found")


def _read_split(d: Path, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        obj = _unpickle(d / f)
        if not isinstance(obj, dict) or b"data" not in obj or label_key not in obj:
            raise ConfigError(f"CIFAR file {d / f} lacks keys b'data' and {label_key!r}")
        x, y = obj[b"data"], np.asarray(obj[label_key])
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            got = (getattr(x, "dtype", type(x).__name__), getattr(x, "shape", None))
            raise ConfigError(f"CIFAR file {d / f}: data must be uint8 of shape (N, 3072), got {got}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"CIFAR file {d / f}: {len(y)} labels for {len(x)} images, or non-integer")
        xs.append(x)
        ys.append(y.astype(np.int64))
    # Rows are channel-major 3×32×32 (R plane, G plane, B plane), so a plain reshape gives (N, C, H, W).
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys)


def _labels_names(meta: Any, key: bytes) -> list[str] | None:
    if isinstance(meta, dict) and isinstance(meta.get(key), list):
        return [v.decode() if isinstance(v, bytes) else str(v) for v in meta[key]]
    return None


def _normalize_uint8(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    t = torch.from_numpy(x).float().div_(255.0)
    m = torch.tensor(mean).reshape(1, 3, 1, 1)
    s = torch.tensor(std).reshape(1, 3, 1, 1)
    return t.sub_(m).div_(s)


def load_cifar(
    name: str,
    data_dir: str | None,
    seed: int,
    num_samples: int | None,
    augment: bool,
    label_mode: str = "fine",
) -> DataBundle:
    spec = _SPECS[name]
    if name == "cifar100":
        if label_mode not in ("fine", "coarse"):
            raise ConfigError(f"cifar100: label_mode must be 'fine' or 'coarse', got {label_mode!r}")
        label_key = b"fine_labels" if label_mode == "fine" else b"coarse_labels"
        num_classes = 100 if label_mode == "fine" else 20
        names_key = b"fine_label_names" if label_mode == "fine" else b"coarse_label_names"
    else:
        label_key, num_classes, names_key = b"labels", 10, b"label_names"
    d = find_cifar_dir(name, data_dir)
    xtr, ytr = _read_split(d, spec["train"], label_key)
    xte, yte = _read_split(d, spec["test"], label_key)
    for split, y in (("train", ytr), ("test", yte)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ConfigError(f"{name} {split} labels outside [0, {num_classes}) in {d}")
    classes = _labels_names(_unpickle(d / spec["meta"]), names_key)
    if num_samples is not None:
        keep = seeded_subset(len(ytr), num_samples, seed, 0xC1F).numpy()
        xtr, ytr = xtr[keep], ytr[keep]
    mean, std = spec["mean"], spec["std"]
    # Pad with black, as RandomCrop(32, padding=4) on the raw image does: black is -mean/std once normalised.
    fill = [-m / s for m, s in zip(mean, std)]
    return DataBundle(
        name=name,
        x_train=_normalize_uint8(xtr, mean, std),
        y_train=torch.from_numpy(ytr),
        x_test=_normalize_uint8(xte, mean, std),
        y_test=torch.from_numpy(yte),
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        augment=RandomCropFlip(padding=4, flip_prob=0.5, fill=fill) if augment else None,
        mean=mean,
        std=std,
        classes=classes if classes is not None and len(classes) == num_classes else None,
        description=f"{name} from {d}",
        info={"path": str(d)},
    )


@DATASETS.register("cifar10")
def cifar10(
    *, data_dir: str | None = None, seed: int = 0, num_samples: int | None = None, augment: bool = True
) -> DataBundle:
    """CIFAR-10 from a local cifar-10-batches-py directory; crop+flip augmentation."""
    return load_cifar("cifar10", data_dir, seed, num_samples, augment)


@DATASETS.register("cifar100")
def cifar100(
    *,
    data_dir: str | None = None,
    seed: int = 0,
    num_samples: int | None = None,
    augment: bool = True,
    label_mode: str = "fine",
) -> DataBundle:
    """CIFAR-100 from a local cifar-100-python directory (fine or coarse labels); crop+flip augmentation."""
    return load_cifar("cifar100", data_dir, seed, num_samples, augment, label_mode)
