"""Images in class folders on local disk (``root/<class>/*.png``), read with Pillow (a matplotlib dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from anytrain.data._bundle import DATASETS, DataBundle, normalize_channels, seeded_subset
from anytrain.data._digits import stratified_split
from anytrain.data._stream import StreamingData
from anytrain.data.augment import RandomCropFlip
from anytrain.registry import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 ``(H, W)`` or ``(H, W, 3)``, resized to ``size`` (H, W) when given."""
    from PIL import Image

    try:
        with Image.open(path) as f:
            im = f.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise ConfigError(f"imagefolder: cannot read image {path}: {e}") from None


def _read(files: list[tuple[Path, int]], mode: str, size: tuple[int, int] | None) -> tuple[torch.Tensor, ...]:
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for path, label in files:
        a = _load(path, mode, size)
        if arrays and a.shape != arrays[0].shape:
            raise ConfigError(
                f"imagefolder: {path} is {a.shape[:2]} but {files[0][0]} is {arrays[0].shape[:2]}; "
                "set data.size to resize"
            )
        arrays.append(a)
        labels.append(label)
    x = torch.from_numpy(np.stack(arrays)).float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


class ImageFiles(torch.utils.data.Dataset):
    """Images read from disk on each access, as normalised float ``(C, H, W)`` tensors, with their labels.

    ``targets`` (the labels) lets the validation split be stratified without reading any image.
    """

    def __init__(
        self,
        files: list[tuple[Path, int]],
        mode: str,
        size: tuple[int, int] | None,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ) -> None:
        self.files, self.mode, self.size = files, mode, size
        self.targets = torch.tensor([label for _, label in files], dtype=torch.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self.shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i]
        a = _load(path, self.mode, self.size)
        x = torch.from_numpy(np.array(a, dtype=np.float32)).div_(255.0)
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        if self.shape is not None and tuple(x.shape) != self.shape:
            raise ConfigError(f"imagefolder: {path} is {tuple(x.shape)}, not {self.shape}; set data.size to resize")
        return (x - self.mean) / self.std, label


@DATASETS.register("imagefolder")
def imagefolder(
    *,
    data_dir: str | None = None,
    seed: int = 0,
    num_samples: int | None = None,
    augment: bool = True,
    size: int | Sequence[int] | None = None,
    grayscale: bool = False,
    test_fraction: float = 0.2,
    crop_padding: int | None = None,
    memory_limit_mb: float = 2048.0,
    num_workers: int = 2,
) -> DataBundle | StreamingData:
    """Local images: data_dir/{train,test}/<class>/ or data_dir/<class>/ (seeded stratified split); streamed
    from disk by DataLoader workers when larger than memory_limit_mb as float32."""
    if data_dir is None:
        raise ConfigError("imagefolder needs data.data_dir: a directory of <class>/ folders (or train/ and test/)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"imagefolder: data directory {root} does not exist")
    hw: tuple[int, int] | None = None
    if size is not None:
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(hw) <= 0:
            raise ConfigError(f"imagefolder: size must be positive, got {size}")
    mode = "L" if grayscale else "RGB"
    split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
    class_root = root / "train" if split_dirs else root
    classes = [p.name for p in _class_dirs(class_root)]
    if not classes:
        raise ConfigError(f"imagefolder: no class folders under {class_root}")
    index = {c: i for i, c in enumerate(classes)}

    def listing(base: Path) -> list[tuple[Path, int]]:
        out = []
        for d in _class_dirs(base):
            if d.name not in index:
                raise ConfigError(f"imagefolder: class folder {d} has no counterpart in {class_root}")
            out += [(p, index[d.name]) for p in _images(d)]
        if not out:
            raise ConfigError(f"imagefolder: no images ({', '.join(IMAGE_SUFFIXES)}) under {base}")
        return out

    if split_dirs:
        train_files, test_files = listing(root / "train"), listing(root / "test")
    else:
        if not 0.0 < float(test_fraction) < 1.0:
            raise ConfigError(f"imagefolder: test_fraction must be in (0, 1), got {test_fraction}")
        files = listing(root)
        tr, te = stratified_split(torch.tensor([c for _, c in files]), float(test_fraction), seed)
        train_files, test_files = [files[i] for i in tr.tolist()], [files[i] for i in te.tolist()]
    if num_samples is not None:
        keep = seeded_subset(len(train_files), num_samples, seed, 0x1F0)
        train_files = [train_files[i] for i in keep.tolist()]
    first = _load(train_files[0][0], mode, hw)
    nbytes = (len(train_files) + len(test_files)) * first.size * 4
    streaming = nbytes > float(memory_limit_mb) * 2**20
    if streaming:
        if int(num_workers) < 0:
            raise ConfigError(f"imagefolder: num_workers must be >= 0, got {num_workers}")
        # Channel statistics from a seeded sample of at most 1,000 training images (reading all would cost a
        # full pass over the data).
        pick = seeded_subset(len(train_files), min(1000, len(train_files)), seed, 0x1F1).tolist()
        sample, _ = _read([train_files[i] for i in pick], mode, hw)
        _, _, mean, std = normalize_channels(sample, sample[:1])
        shape = tuple(sample.shape[1:])
        train_set, test_set = (ImageFiles(f, mode, hw, mean, std) for f in (train_files, test_files))
        train_set.shape = test_set.shape = shape
    else:
        xtr, ytr = _read(train_files, mode, hw)
        xte, yte = _read(test_files, mode, hw)
        if xtr.shape[1:] != xte.shape[1:]:
            raise ConfigError(f"imagefolder: train images are {tuple(xtr.shape[2:])}, test {tuple(xte.shape[2:])}")
        xtr, xte, mean, std = normalize_channels(xtr, xte)
        shape = tuple(xtr.shape[1:])
    pad = max(1, min(shape[1:]) // 8) if crop_padding is None else int(crop_padding)
    fill = [-m / s for m, s in zip(mean, std)]  # black, as in the CIFAR recipe
    aug = RandomCropFlip(padding=pad, fill=fill) if augment else None
    description = f"image folder {root} ({len(classes)} classes{', streamed' if streaming else ''})"
    if streaming:
        return StreamingData(
            name="imagefolder",
            train=train_set,
            test=test_set,
            num_classes=len(classes),
            input_shape=shape,
            augment=aug,
            num_workers=int(num_workers),
            description=description,
            info={"path": str(root), "mean": mean, "std": std, "classes": classes},
        )
    return DataBundle(
        name="imagefolder",
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        num_classes=len(classes),
        input_shape=shape,
        augment=aug,
        mean=mean,
        std=std,
        classes=classes,
        description=description,
        info={"path": str(root)},
    )
