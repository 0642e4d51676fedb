"""A small generated classification set for tests and smoke runs: class templates plus Gaussian noise."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from anytrain.data._bundle import DATASETS, DataBundle, derive_seed, normalize_channels
from anytrain.registry import ConfigError


@DATASETS.register("synthetic")
def synthetic(
    *,
    data_dir: str | None = None,
    seed: int = 0,
    num_samples: int | None = None,
    augment: bool = True,
    shape: Sequence[int] = (1, 16),
    num_classes: int = 4,
    n_train: int = 512,
    n_test: int = 256,
    noise: float = 1.0,
) -> DataBundle:
    """Synthetic: x = template[y] + noise·N(0, I), templates N(0, I); shape/classes/sizes configurable.

    The Bayes classifier (nearest template) is far above chance for the defaults, so nets learn it quickly.
    ``num_samples`` (if given) overrides the sizes with an 80/20 split of that many samples.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s <= 0 for s in shape):
        raise ConfigError(f"synthetic: shape must be positive sizes, got {shape}")
    if int(num_classes) < 2:
        raise ConfigError(f"synthetic: num_classes must be >= 2, got {num_classes}")
    if num_samples is not None:
        n_train = int(0.8 * num_samples)
        n_test = num_samples - n_train
    if int(n_train) <= 0 or int(n_test) <= 0:
        raise ConfigError(f"synthetic: n_train and n_test must be positive, got {n_train}, {n_test}")
    if float(noise) < 0:
        raise ConfigError(f"synthetic: noise must be >= 0, got {noise}")
    g = torch.Generator().manual_seed(derive_seed(seed, 0x5E7))
    templates = torch.randn((int(num_classes), *shape), generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, int(num_classes), (n,), generator=g)
        x = templates[y] + float(noise) * torch.randn((n, *shape), generator=g)
        return x, y

    xtr, ytr = draw(int(n_train))
    xte, yte = draw(int(n_test))
    xtr, xte, mean, std = normalize_channels(xtr, xte)
    return DataBundle(
        name="synthetic",
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        num_classes=int(num_classes),
        input_shape=shape,
        augment=None,
        mean=mean,
        std=std,
        description=f"synthetic: shape {shape}, {num_classes} classes, noise {noise}, seed {seed}",
        info={"templates": templates},
    )
