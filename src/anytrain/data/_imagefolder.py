"""Images in class folders on local disk (``root/<class>/*.png``), read with Pillow (a matplotlib dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from anytrain.data._bundle import DATASETS, DataBundle, normalize_channels, seeded_subset
from anytrain.data._digits import stratified_split
from anytrain.data.augment import RandomCropFlip
from anytrain.registry import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read(files: list[tuple[Path, int]], mode: str, size: tuple[int, int] | None) -> tuple[torch.Tensor, ...]:
    from PIL import Image

    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for path, label in files:
        try:
            with Image.open(path) as f:
                im = f.convert(mode)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise ConfigError(f"imagefolder: cannot read image {path}: {e}") from None
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
) -> DataBundle:
    """Local images: data_dir/{train,test}/<class>/ or data_dir/<class>/ (seeded stratified split)."""
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
        xtr, ytr = _read(listing(root / "train"), mode, hw)
        xte, yte = _read(listing(root / "test"), mode, hw)
        if xtr.shape[1:] != xte.shape[1:]:
            raise ConfigError(f"imagefolder: train images are {tuple(xtr.shape[2:])}, test {tuple(xte.shape[2:])}")
    else:
        if not 0.0 < float(test_fraction) < 1.0:
            raise ConfigError(f"imagefolder: test_fraction must be in (0, 1), got {test_fraction}")
        x, y = _read(listing(root), mode, hw)
        tr, te = stratified_split(y, float(test_fraction), seed)
        xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    if num_samples is not None:
        keep = seeded_subset(len(ytr), num_samples, seed, 0x1F0)
        xtr, ytr = xtr[keep], ytr[keep]
    xtr, xte, mean, std = normalize_channels(xtr, xte)
    pad = max(1, min(xtr.shape[2:]) // 8) if crop_padding is None else int(crop_padding)
    fill = [-m / s for m, s in zip(mean, std)]  # black, as in the CIFAR recipe
    return DataBundle(
        name="imagefolder",
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        num_classes=len(classes),
        input_shape=tuple(xtr.shape[1:]),
        augment=RandomCropFlip(padding=pad, fill=fill) if augment else None,
        mean=mean,
        std=std,
        classes=classes,
        description=f"image folder {root} ({len(classes)} classes)",
        info={"path": str(root)},
    )
