"""Streaming path: StreamLoader yields exactly BatchLoader's batches, user datasets, imagefolder on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from anytrain.data import (
    BatchLoader,
    RandomCropFlip,
    StreamingData,
    StreamLoader,
    from_datasets,
    load_dataset,
    train_loader,
    validation_count,
    validation_indices,
)
from anytrain.registry import ConfigError


class Images(torch.utils.data.Dataset):
    """A map-style dataset over tensors that is *not* a TensorDataset (returns a plain int label)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.targets = y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("drop_last", [True, False])
def test_stream_loader_equals_batch_loader_per_rank(workers, drop_last):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(53, 2, 6, 6, generator=g), torch.randint(0, 5, (53,), generator=g)
    aug = RandomCropFlip(padding=1)
    for world in (1, 3):
        seen = []
        for rank in range(world):
            kw = dict(seed=4, augment=aug, drop_last=drop_last, rank=rank, world_size=world)
            ref = BatchLoader(x, y, 8, **kw)
            st = StreamLoader(Images(x, y), 8, num_workers=workers, **kw)
            assert len(st) == len(ref)
            for epoch in (0, 3):
                a, b = batches(ref, epoch), batches(st, epoch)
                assert len(a) == len(b) == len(ref)
                for (xa, ya), (xb, yb) in zip(a, b):
                    assert torch.equal(xa, xb) and torch.equal(ya, yb)
            seen.append(torch.cat([yb for _, yb in batches(st, 1)]))
            # a pure function of (seed, epoch): iterating again gives the same batches
            assert all(torch.equal(p[0], q[0]) for p, q in zip(batches(st, 1), batches(st, 1)))
        if drop_last:  # shards are disjoint: each sample index is visited by at most one rank
            idx = [
                StreamLoader(Images(x, y), 8, seed=4, drop_last=True, rank=r, world_size=world) for r in range(world)
            ]
            for loader in idx:
                loader.set_epoch(1)
            flat = torch.cat([loader.epoch_indices() for loader in idx])
            assert len(flat.unique()) == len(flat) == 53 // world * world


def test_validation_split_is_stratified_seeded_and_sized():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    assert validation_count("auto", 100) == 10 and validation_count("auto", 100_000) == 5000
    assert validation_count(0.25, 100) == 25 and validation_count(7, 100) == 7 and validation_count(None, 9) == 0
    for bad in (1.5, -1, 100, "ten", True):
        with pytest.raises(ConfigError):
            validation_count(bad, 100)
    tr, va = validation_indices(y, 100, 10, seed=3)
    assert torch.equal(torch.sort(torch.cat([tr, va])).values, torch.arange(100))
    assert torch.bincount(y[va], minlength=3).tolist() == [5, 3, 2]  # exactly proportional here
    tr2, va2 = validation_indices(y, 100, 10, seed=3)
    assert torch.equal(va, va2) and not torch.equal(va, validation_indices(y, 100, 10, seed=4)[1])
    for k in (1, 7, 33, 99):  # every class within one of its share, total exact
        _, v = validation_indices(y, 100, k, seed=0)
        counts = torch.bincount(y[v], minlength=3).float()
        assert len(v) == k and ((counts - k * torch.tensor([0.5, 0.3, 0.2])).abs() <= 1).all()


def test_load_dataset_carves_validation_from_training():
    full = load_dataset("digits", val_size=0)
    b = load_dataset("digits")
    n = len(full.y_train)
    assert len(b.y_val) == round(0.1 * n) and len(b.y_train) + len(b.y_val) == n
    assert torch.equal(b.x_test, full.x_test)  # the test split is untouched
    rows = {tuple(r.flatten().tolist()) for r in full.x_train}
    assert all(tuple(r.flatten().tolist()) in rows for r in b.x_val)
    assert len(load_dataset("digits", val_size=0.5).y_val) == round(0.5 * n)
    with pytest.raises(ConfigError, match="leaves no training samples"):
        load_dataset("digits", val_size=n)


def test_from_datasets_and_train_loader():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 1, 8, generator=g), torch.arange(40) % 4
    d = from_datasets(Images(x, y), Images(x[:10], y[:10]), seed=2)
    assert isinstance(d, StreamingData) and d.num_classes == 4 and d.input_shape == (1, 8)
    assert d.split_len("train") == 36 and d.split_len("val") == 4 and d.info["val_split"] == "stratified"
    vy = torch.cat([b for _, b in d.batches("val", 3)])
    assert sorted(vy.tolist()) == [0, 1, 2, 3]
    plain = from_datasets(TensorDataset(x, y), TensorDataset(x, y), num_classes=4, val_size=0.25)
    assert plain.split_len("val") == 10 and plain.info["val_split"] == "random"
    with pytest.raises(ConfigError, match="num_classes"):
        from_datasets(TensorDataset(x, y), TensorDataset(x, y))
    assert isinstance(train_loader(d, 8, seed=0), StreamLoader)


def write_images(root: Path, per_class: int = 12, classes: int = 3, hw: int = 8) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            a = np.clip(rng.normal(60 + 60 * c, 30, (hw, hw)), 0, 255).astype(np.uint8)
            Image.fromarray(a, mode="L").save(root / f"c{c}" / f"{i}.png")


def test_imagefolder_streams_above_memory_limit_with_same_batches(tmp_path):
    write_images(tmp_path / "img")
    kw = dict(data_dir=str(tmp_path / "img"), grayscale=True, seed=1, val_size=3)
    mem = load_dataset("imagefolder", **kw)
    st = load_dataset("imagefolder", memory_limit_mb=1e-4, num_workers=0, **kw)
    assert isinstance(st, StreamingData) and not isinstance(mem, StreamingData)
    assert st.input_shape == mem.input_shape and st.num_classes == mem.num_classes == 3
    for split in ("train", "val", "test"):
        assert st.split_len(split) == mem.split_len(split)
        xs, ys = zip(*st.batches(split, 5))
        xm, ym = zip(*mem.batches(split, 5))
        torch.testing.assert_close(torch.cat(xs), torch.cat(xm), rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.cat(ys), torch.cat(ym))
    a = batches(train_loader(mem, 4, seed=0, augment=mem.augment, drop_last=True), 2)
    b = batches(train_loader(st, 4, seed=0, augment=st.augment, drop_last=True), 2)
    for (xa, ya), (xb, yb) in zip(a, b):
        torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-5)
        assert torch.equal(ya, yb)
