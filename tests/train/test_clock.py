"""Per-epoch time: the clock's arithmetic, the per-epoch line and history.json's seconds, CPU seconds and images/s."""

from __future__ import annotations

import json
import re

import pytest
import torch

from anytrain.config import load_config
from anytrain.data import BatchLoader
from anytrain.train import Trainer
from anytrain.train import clock as clock_mod
from anytrain.train.clock import EpochClock, epoch_line, format_duration

FAST = [
    "data.name=synthetic",
    "data.batch_size=32",
    "model.name=cnn1d-exits",
    "model.width=8",
    "model.exits=3",
    "train.epochs=2",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
]


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.04, "0.0s"), (4.25, "4.2s"), (59.9, "59.9s"), (187, "3m07s"), (3900, "1h05m")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_clock_seconds_rate_and_time_left(monkeypatch):
    now, cpu = [100.0], [7.0]
    monkeypatch.setattr(clock_mod.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(clock_mod.time, "process_time", lambda: cpu[0])
    c = EpochClock(epochs=5, images_per_epoch=1000)
    c.start()
    now[0] += 2.0  # training, on two busy threads
    cpu[0] += 4.0
    assert c.trained() == {"seconds": 2.0, "images_per_s": 500.0, "cpu_seconds": 4.0}
    now[0] += 1.0  # validation and checkpoint: part of the time left, not of images/s
    assert c.left(0) == pytest.approx(3.0 * 4)
    c.start()
    now[0] += 4.0
    assert c.trained()["images_per_s"] == pytest.approx(250.0)
    now[0] += 1.0
    assert c.left(1) == pytest.approx((3.0 + 5.0) / 2 * 3)  # mean over this session's epochs
    assert c.left(4) == 0.0


def test_epoch_line_has_every_figure():
    line = epoch_line(2, 30, {"seconds": 1.5, "images_per_s": 2400.4}, [0.9, 0.5], [0.61, 0.725], 42.0)
    assert line == "epoch 3/30  1.5s  2400 img/s  loss 0.5000  val acc per exit: 0.610 0.725  left 42.0s"


def test_trainer_prints_and_records_time_without_a_terminal(tmp_path, capsys, monkeypatch):
    cfg = load_config(None, FAST)
    tr = Trainer(cfg, tmp_path / "run")
    # in-memory data: batches are gathered from tensors already on the device, never through a DataLoader
    assert isinstance(tr.loader, BatchLoader) and tr.loader.x.device == tr.device

    def no_dataloader(*a, **k):
        raise AssertionError("a DataLoader was built for in-memory data")

    monkeypatch.setattr(torch.utils.data, "DataLoader", no_dataloader)
    tr.fit()
    out = capsys.readouterr().out  # pytest's capture is not a terminal
    lines = [l for l in out.splitlines() if l.startswith("epoch ")]
    pat = r"epoch (\d)/2  [\d.]+s  \d+ img/s  loss [\d.]+  val acc per exit: ([\d.]+ ){2}[\d.]+  left [\dms.]+"
    assert len(lines) == 2 and all(re.fullmatch(pat, l) for l in lines), lines
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    images = tr.steps_per_epoch * 32
    for rec in hist:
        assert rec["seconds"] > 0
        assert rec["images_per_s"] == pytest.approx(images / rec["seconds"])
