"""IDX (MNIST-format) data sets read from small files the test writes; the real Fashion-MNIST when installed."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from anytrain.data import load_dataset, read_idx
from anytrain.registry import ConfigError

REAL = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, a: np.ndarray, gz: bool) -> None:
    raw = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def fake_set(root: Path, gz: bool, n_train: int = 60, n_test: int = 20, hw: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, hw, hw)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, hw, hw)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        write_idx(root / name, a, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "kmnist"])
def test_idx_reader_values_and_normalisation(tmp_path, gz, name):
    raw = fake_set(tmp_path, gz)
    b = load_dataset(name, data_dir=str(tmp_path), val_size=0)
    assert b.input_shape == (1, 5, 5) and b.num_classes == 10
    xtr = raw["train-images-idx3-ubyte"] / 255.0
    m, s = xtr.mean(), xtr.std()
    want = (xtr - m) / s  # standardised with training statistics
    np.testing.assert_allclose(b.x_train[:, 0].numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.x_test[:, 0].numpy(), (raw["t10k-images-idx3-ubyte"] / 255.0 - m) / s, atol=1e-5)
    assert b.y_train.tolist() == raw["train-labels-idx1-ubyte"].tolist()
    assert b.y_test.tolist() == raw["t10k-labels-idx1-ubyte"].tolist()
    v = load_dataset(name, data_dir=str(tmp_path), seed=1)  # default: 10 % to validation, 6 of 60, stratified
    assert len(v.y_val) == 6 and len(v.y_train) == 54 and len(set(v.y_val.tolist())) == 6
    sub = load_dataset(name, data_dir=str(tmp_path), num_samples=30, val_size=0)
    assert len(sub.y_train) == 30


def test_idx_errors_are_one_line(tmp_path):
    fake_set(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match=r"missing .*t10k-labels-idx1-ubyte\[\.gz\]; get it with") as e:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="needs data.data_dir"):
        load_dataset("kmnist")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ConfigError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\x01\x02")
    with pytest.raises(ConfigError, match="5 bytes"):
        read_idx(short)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="cannot read IDX file"):
        read_idx(broken)


@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_end_to_end(tmp_path):
    """The installed files: sizes, balanced classes, and a short training run through the CLI."""
    b = load_dataset("fashion-mnist")
    assert (len(b.y_train), len(b.y_val), len(b.y_test)) == (55000, 5000, 10000)
    assert torch.bincount(b.y_val).tolist() == [500] * 10 and torch.bincount(b.y_test).tolist() == [1000] * 10
    from anytrain.cli import main

    out = tmp_path / "run"
    args = ["--set", "data.name=fashion-mnist", "--set", "data.num_samples=3000", "--set", "train.epochs=1"]
    args += ["--set", "train.progress=false", "--set", "model.name=cnn2d-exits", "--set", "optimizer.lr=0.05"]
    assert main(["train", *args, "--out", str(out)]) == 0
    import json

    m = json.loads((out / "metrics.json").read_text())
    assert m["split_sizes"] == {"train": 2700, "val": 300, "test": 10000}
    assert m["exits"][-1]["accuracy"] > 0.3  # chance is 0.1; one short epoch
