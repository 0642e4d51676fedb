"""Trainer: resume exactness, NaN handling, atomic checkpoints, run-directory contract."""

from __future__ import annotations

import json
import os

import pytest
import torch

from anytrain.config import RunConfig, load_config
from anytrain.train import Trainer, TrainingDiverged, build_components, load_checkpoint, save_checkpoint
from anytrain.train.checkpoint import CheckpointError

FAST = [
    "data.name=synthetic",
    "data.batch_size=32",
    "model.name=cnn1d-exits",
    "model.width=8",
    "model.exits=3",
    "train.epochs=3",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
    "optimizer.lr=0.05",
]


def fast_cfg(*extra: str) -> RunConfig:
    return load_config(None, FAST + list(extra))


class Stop(Exception):
    pass


def run_interrupted(cfg, out, stop_after_epoch: int):
    tr = Trainer(cfg, out)
    orig = tr._end_epoch

    def end_epoch(epoch, loss):
        orig(epoch, loss)
        if epoch + 1 == stop_after_epoch:
            raise Stop

    tr._end_epoch = end_epoch
    with pytest.raises(Stop):
        tr.fit()


@pytest.mark.parametrize("rule", ["joint", "adaloss"])
def test_resume_reaches_same_weights(tmp_path, rule):
    cfg = fast_cfg(f"rule.name={rule}", "schedule.name=step", "schedule.milestones=[1,2]")
    full = Trainer(cfg, tmp_path / "full")
    full.fit()
    run_interrupted(cfg, tmp_path / "part", stop_after_epoch=2)
    resumed = Trainer(cfg, tmp_path / "part", resume=True)
    assert resumed.start_epoch == 2
    resumed.fit()
    for (k, a), (_, b) in zip(full.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), k
    m1 = json.loads((tmp_path / "full" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert m1["exits"] == m2["exits"]


def test_metrics_json_contract(tmp_path):
    cfg = fast_cfg("train.epochs=1", "train.plots=true", "train.tensorboard=true")
    Trainer(cfg, tmp_path).fit()
    m = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("rule", "optimizer", "dataset", "epochs", "exits"):
        assert key in m
    assert m["epochs"] == 1 and len(m["exits"]) == 3
    for k, e in enumerate(m["exits"]):
        assert e["index"] == k and 0.0 <= e["accuracy"] <= 1.0 and isinstance(e["flops"], int)
    assert [e["flops"] for e in m["exits"]] == sorted(e["flops"] for e in m["exits"])
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "checkpoint.pt").is_file()
    assert (tmp_path / "accuracy_vs_flops.png").is_file() and (tmp_path / "training_curves.png").is_file()
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())


def test_nan_loss_stops_with_step_and_exit_and_keeps_checkpoint(tmp_path):
    cfg = fast_cfg("train.log_every=1")
    comps = build_components(cfg)
    tr = Trainer(cfg, tmp_path, components=comps)
    calls = {"n": 0}
    poison_at = tr.steps_per_epoch + 2  # in the second epoch

    def hook(mod, inp, out):
        if mod.training:
            calls["n"] += 1
            if calls["n"] > poison_at:
                return out * float("nan")
        return out

    tr.net.exits[1].register_forward_hook(hook)
    with pytest.raises(TrainingDiverged, match=rf"step {poison_at} \(epoch 2\) on exit 1; the last good checkpoint"):
        tr.fit()
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


def test_checkpoint_write_is_atomic_under_crash(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"w": torch.ones(3)})

    def boom(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_corrupt_truncated_foreign_and_malicious_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.ones(3)})
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"w": torch.ones(1)}, tmp_path / "foreign.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"format": "anytrain-checkpoint-v1", "x": Evil()}, tmp_path / "evil.pt")
    for name in ("trunc.pt", "garbage.pt", "foreign.pt", "evil.pt", "missing.pt"):
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / name)
    assert not (tmp_path / "pwned").exists()


def test_a_loss_weighting_with_an_epoch_schedule_gets_every_epoch_start(tmp_path):
    """``on_epoch_start(epoch, epochs)`` is the one training-progress hook: a weighting whose weights follow the
    epochs sees each epoch once, in order, before its steps (here: the earlier exits' weight ramps up from 0)."""
    from anytrain.rules import LossWeighting

    class Ramp(LossWeighting):
        name = "ramp"

        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []
            self.weight = -1.0

        def on_epoch_start(self, epoch: int, epochs: int) -> None:
            self.calls.append((epoch, epochs))
            self.weight = epoch / epochs

        def total(self, losses, reduce):
            assert self.weight >= 0  # never stepped before the first epoch started
            return losses[-1] + self.weight * losses[:-1].sum()

    cfg = fast_cfg("train.epochs=2", "rule.name=joint")
    comps = build_components(cfg)
    comps["rule"] = rule = Ramp()
    Trainer(cfg, tmp_path / "run", components=comps).fit()
    assert rule.calls == [(0, 2), (1, 2)]
