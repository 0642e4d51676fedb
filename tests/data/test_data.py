"""Tests for anytrain.data: data sets, normalisation, cache, CIFAR reader, augmentation and BatchLoader."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anytrain.data import DATASETS, BatchLoader, DataBundle, RandomCropFlip, crop_flip, load_dataset
from anytrain.data import _mnist1d as m1d
from anytrain.data._bundle import dataset_options
from anytrain.data._cache import cache_dir
from anytrain.data._cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from anytrain.registry import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# helpers


def check_bundle(b: DataBundle, shape: tuple[int, ...], classes: int, n_train: int, n_test: int) -> None:
    assert b.input_shape == shape
    assert b.num_classes == classes
    assert b.x_train.shape == (n_train, *shape) and b.x_test.shape == (n_test, *shape)
    assert b.x_train.dtype == torch.float32 and b.x_test.dtype == torch.float32
    assert b.y_train.dtype == torch.int64 and b.y_test.dtype == torch.int64
    assert b.y_train.shape == (n_train,) and b.y_test.shape == (n_test,)
    assert int(b.y_train.min()) >= 0 and int(b.y_train.max()) < classes
    assert torch.isfinite(b.x_train).all() and torch.isfinite(b.x_test).all()


def assert_standardised(x: torch.Tensor) -> None:
    """Per channel (dim 1) mean 0 and std 1 over all other dims."""
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(x.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        flat.std(1, correction=0), torch.ones(x.shape[1], dtype=torch.float64), atol=1e-4, rtol=0
    )


def same_bundle(a: DataBundle, b: DataBundle) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x_train", "y_train", "x_test", "y_test"))


# ---------------------------------------------------------------------------------------------------------------
# registry and options


def test_registry_names_and_unknown() -> None:
    assert {"mnist1d", "digits", "cifar10", "cifar100", "synthetic"} <= set(DATASETS)
    with pytest.raises(ConfigError, match=r"unknown data set 'nope'; known: .*mnist1d"):
        load_dataset("nope")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) bogus in data.options; it takes test_fraction"):
        load_dataset("digits", bogus=1)
    with pytest.raises(ConfigError, match="num_samples"):
        load_dataset("synthetic", num_samples=0)


# ---------------------------------------------------------------------------------------------------------------
# mnist1d


def test_mnist1d_default_split_matches_reference_generator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANYTRAIN_CACHE", str(tmp_path))
    b = load_dataset("mnist1d", val_size=0)
    check_bundle(b, (1, 40), 10, 4000, 1000)
    assert b.augment is None
    assert_standardised(b.x_train)
    # Independent reference: the package's own generator with its reference seed 42, normalised by the training
    # mean/std computed here.
    from mnist1d.data import get_dataset_args, make_dataset

    ref = make_dataset(get_dataset_args())
    xtr, xte = ref["x"].astype(np.float64), ref["x_test"].astype(np.float64)
    mu, sd = xtr.mean(), xtr.std()
    np.testing.assert_allclose(b.x_train[:, 0].numpy(), (xtr - mu) / sd, atol=1e-5)
    np.testing.assert_allclose(b.x_test[:, 0].numpy(), (xte - mu) / sd, atol=1e-5)
    np.testing.assert_array_equal(b.y_train.numpy(), ref["y"])
    np.testing.assert_array_equal(b.y_test.numpy(), ref["y_test"])
    assert b.mean[0] == pytest.approx(mu, abs=1e-6) and b.std[0] == pytest.approx(sd, rel=1e-6)
    assert np.bincount(ref["y"], minlength=10).min() > 300  # all classes present


def test_mnist1d_num_samples_seed_and_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANYTRAIN_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    b = load_dataset("mnist1d", val_size=0, num_samples=300, seed=1)
    check_bundle(b, (1, 40), 10, 240, 60)
    files = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(files) == 1
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind

    # A second load comes from the cache: generation must not be called.
    def boom(args: dict) -> dict:
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(m1d, "generate_mnist1d", boom)
    assert same_bundle(load_dataset("mnist1d", val_size=0, num_samples=300, seed=1), b)
    monkeypatch.undo()
    monkeypatch.setenv("ANYTRAIN_CACHE", str(tmp_path))

    # Corrupt cache files (garbage, truncated zip) are regenerated, not fatal, and the result is the same.
    for garbage in (b"not a zip file", files[0].read_bytes()[:100]):
        files[0].write_bytes(garbage)
        assert same_bundle(load_dataset("mnist1d", val_size=0, num_samples=300, seed=1), b)

    # Other seeds give other data; same seed the same (also without cache).
    c = load_dataset("mnist1d", val_size=0, num_samples=300, seed=2)
    assert not torch.equal(c.x_train, b.x_train)
    assert same_bundle(load_dataset("mnist1d", val_size=0, num_samples=300, seed=1, cache=False), b)


def test_mnist1d_leaves_global_rng_untouched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # mnist1d's generator reseeds the legacy global numpy RNG and `random`; loading must restore both.
    monkeypatch.setenv("ANYTRAIN_CACHE", str(tmp_path))
    legacy = np.random.mtrand._rand  # the global RandomState behind np.random.*
    legacy.seed(123)
    random.seed(123)
    expect_np, expect_py = legacy.random_sample(3), [random.random() for _ in range(3)]
    legacy.seed(123)
    random.seed(123)
    load_dataset("mnist1d", val_size=0, num_samples=100, cache=False)
    np.testing.assert_array_equal(legacy.random_sample(3), expect_np)
    assert [random.random() for _ in range(3)] == expect_py


# ---------------------------------------------------------------------------------------------------------------
# digits


def test_digits_split_is_stratified_deterministic_and_complete() -> None:
    from sklearn.datasets import load_digits

    b = load_dataset("digits", val_size=0, seed=0)
    check_bundle(b, (1, 8, 8), 10, 1438, 359)
    assert_standardised(b.x_train)
    # The split partitions the 1797 raw images: un-normalise and match against the originals as a multiset.
    raw = torch.cat([b.x_train, b.x_test]) * b.std[0] + b.mean[0]
    torch.testing.assert_close(raw, raw.round(), atol=1e-4, rtol=0)  # pixel values are integers 0..16
    d = load_digits()
    key = lambda x: sorted(map(tuple, x.reshape(len(x), -1).round().long().tolist()))  # noqa: E731
    assert key(raw) == key(torch.as_tensor(d.images))
    # Stratified: each class has round(0.2 n_c) test samples.
    counts = np.bincount(d.target, minlength=10)
    np.testing.assert_array_equal(np.bincount(b.y_test.numpy(), minlength=10), np.round(0.2 * counts))
    assert same_bundle(load_dataset("digits", val_size=0, seed=0), b)
    assert not torch.equal(load_dataset("digits", val_size=0, seed=1).y_test, b.y_test)
    assert load_dataset("digits", val_size=0, num_samples=100).x_train.shape[0] == 100


# ---------------------------------------------------------------------------------------------------------------
# synthetic


@pytest.mark.parametrize("shape", [(1, 16), (3, 8, 8)])
def test_synthetic_shapes_determinism_and_learnable(shape: tuple[int, ...]) -> None:
    b = load_dataset("synthetic", val_size=0, shape=shape, num_classes=5, n_train=400, n_test=200, seed=3)
    check_bundle(b, shape, 5, 400, 200)
    assert_standardised(b.x_train)
    assert same_bundle(
        b, load_dataset("synthetic", val_size=0, shape=shape, num_classes=5, n_train=400, n_test=200, seed=3)
    )
    assert not torch.equal(
        b.x_train,
        load_dataset("synthetic", val_size=0, shape=shape, num_classes=5, n_train=400, n_test=200, seed=4).x_train,
    )
    # Learnable: a nearest class-mean classifier fitted on train is far above chance (0.2) on test.
    means = torch.stack([b.x_train[b.y_train == c].mean(0) for c in range(5)]).flatten(1)
    pred = torch.cdist(b.x_test.flatten(1), means).argmin(1)
    assert (pred == b.y_test).float().mean() > 0.8
    assert load_dataset("synthetic", val_size=0, num_samples=50).x_train.shape[0] == 40


# ---------------------------------------------------------------------------------------------------------------
# CIFAR from a fake pickle directory


def _write_pickle(path: Path, obj: object) -> None:
    # Protocol 2, numpy arrays referenced through numpy.core (as in the official Python-2 files).
    blob = pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(blob)


def make_fake_cifar(root: Path, kind: str, per_file: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw: dict[str, list[np.ndarray]] = {"x": [], "y": [], "x_test": [], "y_test": [], "coarse": []}
    if kind == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            x = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            y = rng.integers(0, 10, per_file).tolist()
            _write_pickle(d / name, {b"batch_label": b"x", b"labels": y, b"data": x, b"filenames": [b"f"] * per_file})
            raw["x_test" if name == "test_batch" else "x"].append(x)
            raw["y_test" if name == "test_batch" else "y"].append(np.array(y))
        _write_pickle(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072})
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        for name, n in (("train", 2 * per_file), ("test", per_file)):
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            fine = rng.integers(0, 100, n).tolist()
            coarse = [f // 5 for f in fine]
            _write_pickle(d / name, {b"fine_labels": fine, b"coarse_labels": coarse, b"data": x})
            raw["x_test" if name == "test" else "x"].append(x)
            raw["y_test" if name == "test" else "y"].append(np.array(fine))
        _write_pickle(
            d / "meta",
            {
                b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"k{i}".encode() for i in range(20)],
            },
        )
    return {k: np.concatenate(v) for k, v in raw.items() if v}


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_reader_on_fake_directory(tmp_path: Path, kind: str) -> None:
    raw = make_fake_cifar(tmp_path, kind)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if kind == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    n_tr, n_te = len(raw["y"]), len(raw["y_test"])
    folder = tmp_path / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    for where in (tmp_path, folder):  # parent or the folder itself
        b = load_dataset(kind, data_dir=str(where), val_size=0)
        check_bundle(b, (3, 32, 32), 10 if kind == "cifar10" else 100, n_tr, n_te)
        # Pixel (c, h, w) of image i is byte c*1024 + h*32 + w of row i, scaled to [0,1] and standardised.
        i, c, h, w = 3, 2, 5, 17
        expect = (raw["x"][i, c * 1024 + h * 32 + w] / 255.0 - mean[c]) / std[c]
        assert float(b.x_train[i, c, h, w]) == pytest.approx(expect, abs=1e-5)
        want = torch.from_numpy(raw["x"]).float().reshape(-1, 3, 32, 32) / 255
        want = (want - torch.tensor(mean).reshape(1, 3, 1, 1)) / torch.tensor(std).reshape(1, 3, 1, 1)
        torch.testing.assert_close(b.x_train, want)
        np.testing.assert_array_equal(b.y_train.numpy(), raw["y"])
        np.testing.assert_array_equal(b.y_test.numpy(), raw["y_test"])
        assert isinstance(b.augment, RandomCropFlip)
        assert b.classes is not None and len(b.classes) == b.num_classes
    assert load_dataset(kind, data_dir=str(tmp_path), augment=False).augment is None
    sub = load_dataset(kind, data_dir=str(tmp_path), num_samples=5, seed=1)
    assert sub.x_train.shape[0] == 5
    if kind == "cifar100":
        co = load_dataset(kind, data_dir=str(tmp_path), label_mode="coarse", val_size=0)
        assert co.num_classes == 20
        np.testing.assert_array_equal(co.y_train.numpy(), raw["y"] // 5)
        with pytest.raises(ConfigError, match="label_mode"):
            load_dataset(kind, data_dir=str(tmp_path), label_mode="medium")


def test_cifar_missing_partial_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cifar10 needs data.data_dir.*data_batch_1"):
        load_dataset("cifar10")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as e:
        load_dataset("cifar10", data_dir=str(empty))
    msg = str(e.value)
    assert "\n" not in msg and str(empty) in msg and "test_batch" in msg and "batches.meta" in msg
    with pytest.raises(ConfigError, match=r"cifar-100-python/\{train,test,meta\}"):
        load_dataset("cifar100", data_dir=str(empty))

    make_fake_cifar(tmp_path / "c10", "cifar10")
    folder = tmp_path / "c10" / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match=r"incomplete data directory .*missing data_batch_3"):
        load_dataset("cifar10", data_dir=str(tmp_path / "c10"))

    # Wrong contents: shape check, garbage file, and a pickle that tries to call a forbidden global.
    _write_pickle(folder / "data_batch_3", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    with pytest.raises(ConfigError, match=r"uint8 of shape \(N, 3072\)"):
        load_dataset("cifar10", data_dir=str(folder))
    _write_pickle(folder / "data_batch_3", {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 99]})
    with pytest.raises(ConfigError, match=r"labels outside \[0, 10\)"):
        load_dataset("cifar10", data_dir=str(folder))
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read CIFAR file"):
        load_dataset("cifar10", data_dir=str(folder))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (Path.touch, (marker,))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ConfigError, match="not allowed"):
        load_dataset("cifar10", data_dir=str(folder))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# augmentation


def _pad(img: torch.Tensor, p: int, fill: torch.Tensor) -> torch.Tensor:
    """Constant padding of one (C, H, W) image, channel c with value fill[c]."""
    return torch.stack([F.pad(img[c], (p, p, p, p), value=float(fill[c])) for c in range(len(img))])


def _ref_crop_flip(
    x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, p: int, fill: torch.Tensor
) -> torch.Tensor:
    """Per-sample loop reference: pad with the fill value, slice the window, mirror."""
    out = []
    for i in range(len(x)):
        padded = _pad(x[i], p, fill)
        win = padded[:, int(oy[i]) : int(oy[i]) + x.shape[2], int(ox[i]) : int(ox[i]) + x.shape[3]]
        out.append(win.flip(-1) if flip[i] else win)
    return torch.stack(out)


def test_crop_flip_core_against_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 10, 12, generator=g)
    fill = torch.tensor([0.5, -1.0, 2.0])
    for p in (0, 1, 4):
        oy = torch.randint(0, 2 * p + 1, (16,), generator=g)
        ox = torch.randint(0, 2 * p + 1, (16,), generator=g)
        flip = torch.rand(16, generator=g) < 0.5
        torch.testing.assert_close(
            crop_flip(x, oy, ox, flip, p, fill), _ref_crop_flip(x, oy, ox, flip, p, fill), rtol=0, atol=0
        )
    # Flip alone is an exact mirror; no crop and no flip is the identity.
    z = torch.zeros(16, dtype=torch.long)
    assert torch.equal(crop_flip(x, z, z, torch.ones(16, dtype=torch.bool), 0, fill), x.flip(-1))
    assert torch.equal(crop_flip(x, z + 4, z + 4, torch.zeros(16, dtype=torch.bool), 4, fill), x)


def test_random_crop_flip_windows_and_per_sample_randomness() -> None:
    p = 4
    fill = torch.tensor([-1.5, 0.0, 3.0])
    aug = RandomCropFlip(padding=p, fill=fill.tolist())
    img = torch.randn(1, 3, 32, 32)
    x = img.expand(64, -1, -1, -1).contiguous()
    out = aug(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    # Each output is one of the (2p+1)^2 * 2 windows of the padded image (brute-force search).
    padded = _pad(img[0], p, fill)
    seen = set()
    for o in out:
        hits = [
            (dy, dx, f)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for f in (False, True)
            if torch.equal(o, (lambda w: w.flip(-1) if f else w)(padded[:, dy : dy + 32, dx : dx + 32]))
        ]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 40  # per-sample randomness: identical inputs get different windows
    assert {f for _, _, f in seen} == {False, True}
    # Same generator seed -> same output; different seed -> different output.
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="padding"):
        RandomCropFlip(padding=-1)


def test_cifar_augment_pads_with_black(tmp_path: Path) -> None:
    make_fake_cifar(tmp_path, "cifar10", per_file=2)
    b = load_dataset("cifar10", val_size=0, data_dir=str(tmp_path))
    # Offsets (0, 0): the top-left 4x4 corner is padding, which must un-normalise to 0 (black).
    z = torch.zeros(2, dtype=torch.long)
    out = crop_flip(b.x_train[:2], z, z, torch.zeros(2, dtype=torch.bool), 4, b.augment.fill)
    raw = out * torch.tensor(b.std).reshape(1, 3, 1, 1) + torch.tensor(b.mean).reshape(1, 3, 1, 1)
    torch.testing.assert_close(raw[:, :, :4, :4], torch.zeros(2, 3, 4, 4), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# BatchLoader


def _epoch(loader: BatchLoader) -> tuple[torch.Tensor, list[int]]:
    ids, sizes = [], []
    for xb, yb in loader:
        assert torch.equal(xb[:, 0].long(), yb)  # x and y stay paired
        ids.append(yb)
        sizes.append(len(yb))
    return (torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)), sizes


def _indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n)
    return y.float().reshape(n, 1).repeat(1, 3), y


def test_loader_determinism_coverage_and_lengths() -> None:
    x, y = _indexed(103)
    ld = BatchLoader(x, y, 10, seed=5)
    assert len(ld) == 11
    ids0, sizes = _epoch(ld)
    assert sizes == [10] * 10 + [3] and sorted(ids0.tolist()) == list(range(103))
    again, _ = _epoch(ld)
    assert torch.equal(ids0, again)  # pure function of (seed, epoch)
    assert torch.equal(ids0, _epoch(BatchLoader(x, y, 10, seed=5))[0])
    ld.set_epoch(1)
    ids1, _ = _epoch(ld)
    assert not torch.equal(ids0, ids1) and sorted(ids1.tolist()) == list(range(103))
    assert not torch.equal(ids0, _epoch(BatchLoader(x, y, 10, seed=6))[0])
    ld.set_epoch(0)
    assert torch.equal(_epoch(ld)[0], ids0)
    # drop_last drops the incomplete batch; shuffle=False is the identity order.
    dl = BatchLoader(x, y, 10, drop_last=True)
    assert len(dl) == 10 and _epoch(dl)[1] == [10] * 10
    assert _epoch(BatchLoader(x, y, 10, shuffle=False))[0].tolist() == list(range(103))
    with pytest.raises(ValueError):
        BatchLoader(x, y, 0)
    with pytest.raises(ValueError):
        BatchLoader(x, y, 4, rank=2, world_size=2)


@pytest.mark.parametrize("n,ws,bs", [(103, 4, 8), (10, 3, 2), (5, 8, 1)])
def test_loader_sharding(n: int, ws: int, bs: int) -> None:
    x, y = _indexed(n)
    for drop_last in (False, True):
        loaders = [BatchLoader(x, y, bs, seed=2, rank=r, world_size=ws, drop_last=drop_last) for r in range(ws)]
        for ld in loaders:
            ld.set_epoch(3)
        shards = [_epoch(ld)[0] for ld in loaders]
        assert len({len(ld) for ld in loaders}) == 1  # every rank yields the same number of batches
        assert all(len(_epoch(ld)[1]) == len(loaders[0]) for ld in loaders)
        sizes = {len(s) for s in shards}
        assert len(sizes) == 1
        allids = torch.cat(shards)
        if drop_last:
            # Truncated to a multiple of world_size: shards disjoint, n // ws per rank (then whole batches).
            assert len(set(allids.tolist())) == len(allids)
            assert loaders[0].samples_per_rank == n // ws
        else:
            # Padded by wrapping: every sample appears, duplicates only as the padding.
            assert set(allids.tolist()) == set(range(n))
            assert len(allids) == -(-n // ws) * ws
            if n >= ws:
                assert len(allids) - len(set(allids.tolist())) == len(allids) - n
        # Positions in the shared permutation are disjoint: the union of ranks = the single-process epoch order.
        single = BatchLoader(x, y, bs, seed=2)
        single.set_epoch(3)
        interleaved = torch.stack([ld.epoch_indices() for ld in loaders], 1).flatten()
        k = min(len(interleaved), n)
        assert torch.equal(interleaved[:k], single.epoch_indices()[:k])


def test_loader_augmentation_is_seeded_by_epoch() -> None:
    x = torch.randn(40, 3, 8, 8)
    y = torch.arange(40)
    aug = RandomCropFlip(padding=2)

    def run(epoch: int, seed: int = 0) -> torch.Tensor:
        ld = BatchLoader(x, y, 16, seed=seed, augment=aug, shuffle=False, device="cpu")
        ld.set_epoch(epoch)
        return torch.cat([xb for xb, _ in ld])

    a = run(0)
    assert torch.equal(a, run(0))
    assert not torch.equal(a, run(1)) and not torch.equal(a, run(0, seed=1))
    assert not torch.equal(a, x)
    # Without augmentation the batches are the raw samples.
    plain = torch.cat([xb for xb, _ in BatchLoader(x, y, 16, shuffle=False, preload=False, device="cpu")])
    assert torch.equal(plain, x)


def test_loader_does_not_touch_global_rng() -> None:
    x, y = _indexed(50)
    torch.manual_seed(7)
    expect = torch.rand(3)
    torch.manual_seed(7)
    ld = BatchLoader(x, y, 8, augment=lambda xb, g: xb + torch.rand(xb.shape, generator=g))
    list(ld)
    assert torch.equal(torch.rand(3), expect)


# ---------------------------------------------------------------------------------------------------------------
# imagefolder


def _write_images(root: Path, counts: dict[str, int], size: tuple[int, int], seed: int) -> dict[str, list]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out: dict[str, list] = {}
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        out[cls] = []
        for i in range(n):
            a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / cls / f"{i:03d}.png")
            out[cls].append(a)
    return out


def test_imagefolder_layouts_values_and_errors(tmp_path: Path) -> None:
    # Layout 1: train/ and test/ with class folders.
    tr = _write_images(tmp_path / "a" / "train", {"cat": 3, "dog": 2}, (6, 5), 0)
    _write_images(tmp_path / "a" / "test", {"cat": 1, "dog": 1}, (6, 5), 1)
    b = load_dataset("imagefolder", val_size=0, data_dir=str(tmp_path / "a"))
    check_bundle(b, (3, 6, 5), 2, 5, 2)
    assert b.classes == ["cat", "dog"] and b.y_train.tolist() == [0, 0, 0, 1, 1]
    assert_standardised(b.x_train)
    raw = b.x_train * torch.tensor(b.std).reshape(1, 3, 1, 1) + torch.tensor(b.mean).reshape(1, 3, 1, 1)
    want = torch.from_numpy(np.stack(tr["cat"] + tr["dog"])).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(raw, want, atol=1e-5, rtol=0)
    assert isinstance(b.augment, RandomCropFlip)
    # Resizing and grayscale.
    g = load_dataset("imagefolder", val_size=0, data_dir=str(tmp_path / "a"), size=4, grayscale=True, augment=False)
    check_bundle(g, (1, 4, 4), 2, 5, 2)
    assert g.augment is None
    # Layout 2: class folders only -> seeded stratified split.
    _write_images(tmp_path / "b", {"x": 5, "y": 5, "z": 5}, (4, 4), 2)
    s = load_dataset("imagefolder", val_size=0, data_dir=str(tmp_path / "b"), seed=1)
    check_bundle(s, (3, 4, 4), 3, 12, 3)
    assert sorted(s.y_test.tolist()) == [0, 1, 2]
    assert same_bundle(s, load_dataset("imagefolder", val_size=0, data_dir=str(tmp_path / "b"), seed=1))
    # Errors: no dir, missing dir, mixed sizes, unreadable image.
    with pytest.raises(ConfigError, match="needs data.data_dir"):
        load_dataset("imagefolder")
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset("imagefolder", data_dir=str(tmp_path / "nope"))
    _write_images(tmp_path / "b" / "w", {"big": 1}, (7, 7), 3)  # nested deeper: w/big/000.png, a 7x7 image
    with pytest.raises(ConfigError, match="set data.size"):
        load_dataset("imagefolder", data_dir=str(tmp_path / "b"))
    (tmp_path / "b" / "x" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="cannot read image"):
        load_dataset("imagefolder", data_dir=str(tmp_path / "b"), size=4)


OWN_KEYS = "the data section's own keys are name, data_dir, num_samples, batch_size, eval_batch_size, augment, val_size"


@pytest.mark.parametrize(
    "name,options,says",
    [
        ("fashion-mnist", {"foo": 1}, "data set 'fashion-mnist' takes no options, got data.options foo; "),
        ("synthetic", {"foo": 1}, "unknown option(s) foo in data.options; it takes shape, num_classes, n_train"),
        ("mnist", {"batch_size": 8}, "(batch_size is a key of the data section: set data.batch_size)"),
    ],
)
def test_unknown_data_options_say_what_the_data_set_and_the_section_take(name, options, says):
    with pytest.raises(ConfigError) as e:
        load_dataset(name, data_dir="/nonexistent", **options)  # options are checked before any file is read
    msg = str(e.value)
    assert says in msg and msg.endswith(OWN_KEYS) and "\n" not in msg
    assert dataset_options("fashion-mnist") == [] and dataset_options("digits") == ["test_fraction"]
