"""scikit-learn's 8×8 handwritten digits (bundled with scikit-learn; no download)."""

from __future__ import annotations

import torch

from anytrain.data._bundle import DATASETS, DataBundle, derive_seed, normalize_channels, seeded_subset
from anytrain.registry import ConfigError


def stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified split: from each class, ``round(test_fraction * n_class)`` random samples go to the
    test set. Returns sorted (train_idx, test_idx)."""
    g = torch.Generator().manual_seed(derive_seed(seed, 0x5D1))
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


@DATASETS.register("digits")
def digits(
    *,
    data_dir: str | None = None,
    seed: int = 0,
    num_samples: int | None = None,
    augment: bool = True,
    test_fraction: float = 0.2,
) -> DataBundle:
    """scikit-learn digits: 1797 grey 8×8 images, 10 classes; seeded stratified 80/20 split."""
    from sklearn.datasets import load_digits

    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.as_tensor(d.target, dtype=torch.int64)
    tr, te = stratified_split(y, float(test_fraction), seed)
    if num_samples is not None:
        tr = tr[seeded_subset(len(tr), num_samples, seed, 0x5D2)]
    xtr, xte, mean, std = normalize_channels(x[tr], x[te])
    return DataBundle(
        name="digits",
        x_train=xtr,
        y_train=y[tr],
        x_test=xte,
        y_test=y[te],
        num_classes=10,
        input_shape=(1, 8, 8),
        augment=None,
        mean=mean,
        std=std,
        classes=[str(i) for i in range(10)],
        description=f"scikit-learn digits, stratified split (test fraction {test_fraction}, seed {seed})",
    )
