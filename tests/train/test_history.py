"""What a run records beside its weights: the per-step training loss in ``history.json`` (``step_loss``), the CPU
seconds of each epoch, and the snapshots ``train.keep_every`` (epochs) and ``train.keep_every_steps`` keep."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from anytrain.config import load_config
from anytrain.train import Trainer, load_checkpoint
from anytrain.train.schedule import build_scheduler

FAST = [
    "data.name=synthetic",
    "data.options.n_train=160",
    "data.options.n_test=64",
    "data.val_size=32",
    "data.batch_size=16",  # 128 training samples: 8 steps per epoch
    "model.name=cnn1d-exits",
    "model.width=4",
    "model.exits=3",
    "train.epochs=1",
    "train.log_every=3",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
    "optimizer.lr=0.05",
]
RULES = {"osgd": [], "dgl": ["rule.name=dgl"], "sgl": ["rule.name=sgl", "rule.modules=1"]}


def cfg(*extra: str):
    return load_config(None, FAST + list(extra))


class Stop(Exception):
    pass


def run_stopped(config, out, stop_after_epoch: int) -> Trainer:
    """Train until epoch ``stop_after_epoch`` is done (its checkpoint written), then stop as if killed."""
    tr = Trainer(config, out)
    orig = tr._end_epoch

    def end_epoch(epoch, loss):
        orig(epoch, loss)
        if epoch + 1 == stop_after_epoch:
            raise Stop

    tr._end_epoch = end_epoch
    with pytest.raises(Stop):
        tr.fit()
    return tr


def history(out) -> list[dict]:
    return json.loads((out / "history.json").read_text())


# ---- step_loss -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", list(RULES))
def test_step_loss_is_what_tensorboard_logs_at_each_log_point(tmp_path, rule):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = Trainer(cfg(*RULES[rule], "train.tensorboard=true"), tmp_path)
    tr.fit()
    assert tr.steps_per_epoch == 8
    (rec,) = history(tmp_path)
    points = rec["step_loss"]
    assert [p[0] for p in points] == [3, 6, 8]  # every log_every steps, and the epoch's last step
    assert all(len(p[2]) == 3 for p in points)
    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    for k in range(3):
        logged = [(e.step, e.value) for e in tb.Scalars(f"train/loss_exit{k}")]
        assert logged == [(p[0], float(np.float32(p[2][k]))) for p in points]  # TensorBoard stores float32
    assert [(e.step, e.value) for e in tb.Scalars("train/lr")] == [(p[0], float(np.float32(p[1]))) for p in points]


def test_step_loss_at_every_step_averages_to_the_epoch_loss_and_follows_the_schedule(tmp_path):
    config = cfg("train.epochs=2", "train.log_every=1", "schedule.name=cosine", "schedule.warmup_epochs=1")
    tr = Trainer(config, tmp_path)
    tr.fit()
    h = history(tmp_path)
    n = tr.steps_per_epoch
    assert [p[0] for r in h for p in r["step_loss"]] == list(range(1, 2 * n + 1))
    for r in h:  # the epoch's mean loss is summed on the device, independently of the log points
        mean = np.mean([p[2] for p in r["step_loss"]], axis=0)
        np.testing.assert_allclose(mean, r["train_loss"], rtol=1e-5)
    # the learning rate after each step, from the schedule replayed on its own
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = build_scheduler("cosine", opt, 2 * n, n, **config.schedule.kwargs())
    want = []
    for _ in range(2 * n):
        opt.step()
        sched.step()
        want.append(opt.param_groups[0]["lr"])
    assert [p[1] for r in h for p in r["step_loss"]] == want
    assert len(set(want)) > 2  # the schedule moves: a wrong step would be seen


@pytest.mark.parametrize("rule", ["osgd", "dgl"])
def test_resume_gives_the_same_history_and_cpu_seconds_are_recorded(tmp_path, rule):
    config = cfg(*RULES[rule], "train.epochs=3")
    Trainer(config, tmp_path / "full").fit()
    run_stopped(config, tmp_path / "part", stop_after_epoch=1)
    Trainer(config, tmp_path / "part", resume=True).fit()
    full, part = history(tmp_path / "full"), history(tmp_path / "part")
    same = ("epoch", "step", "train_loss", "lr", "val_acc", "step_loss")
    assert [{k: r[k] for k in same} for r in full] == [{k: r[k] for k in same} for r in part]
    assert [[p[0] for p in r["step_loss"]] for r in full] == [[3, 6, 8], [11, 14, 16], [19, 22, 24]]
    for r in full + part:
        assert isinstance(r["cpu_seconds"], float) and math.isfinite(r["cpu_seconds"]) and r["cpu_seconds"] > 0


# ---- train.keep_every ------------------------------------------------------------------------------------------
def kept(out) -> list[str]:
    d = out / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_keep_every_keeps_the_weights_of_a_run_stopped_at_that_epoch(tmp_path):
    config = cfg("train.epochs=4", "train.keep_every=2")
    full = Trainer(config, tmp_path / "full")
    full.fit()
    assert kept(tmp_path / "full") == ["epoch_0002.pt", "epoch_0004.pt"]
    stopped = run_stopped(config, tmp_path / "stop", stop_after_epoch=2)
    for epoch, ref in ((2, stopped.net.state_dict()), (4, full.net.state_dict())):
        ck = load_checkpoint(tmp_path / "full" / "checkpoints" / f"epoch_{epoch:04d}.pt")
        assert ck["epoch"] == epoch - 1 and ck["step"] == 8 * epoch and len(ck["history"]) == epoch
        assert ck["model"].keys() == ref.keys()
        for k, v in ref.items():
            assert torch.equal(ck["model"][k], v), (epoch, k)
    last = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    kept4 = load_checkpoint(tmp_path / "full" / "checkpoints" / "epoch_0004.pt")
    assert kept4.keys() == last.keys() and kept4["history"] == last["history"]  # the same payload


def test_keep_every_may_change_on_resume(tmp_path):
    config = cfg("train.epochs=3")
    full = Trainer(config, tmp_path / "full")
    full.fit()
    run_stopped(config, tmp_path / "part", stop_after_epoch=1)
    assert kept(tmp_path / "part") == []
    resumed = Trainer(cfg("train.epochs=3", "train.keep_every=1"), tmp_path / "part", resume=True)
    assert resumed.start_epoch == 1
    resumed.fit()
    assert kept(tmp_path / "part") == ["epoch_0002.pt", "epoch_0003.pt"]  # from the resume on
    ref = full.net.state_dict()
    for k, v in resumed.net.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_a_kill_between_snapshot_and_checkpoint_loses_no_snapshot(tmp_path, monkeypatch):
    import anytrain.train.trainer as trainer_module

    config = cfg("train.epochs=3", "train.keep_every=1")
    save = trainer_module.save_checkpoint

    def killed_at_epoch_2(path, state):
        if path.name == "checkpoint.pt" and state["epoch"] == 1:
            raise Stop  # the snapshot of epoch 2 is written, its checkpoint is not
        save(path, state)

    monkeypatch.setattr(trainer_module, "save_checkpoint", killed_at_epoch_2)
    with pytest.raises(Stop):
        Trainer(config, tmp_path / "part").fit()
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    resumed = Trainer(config, tmp_path / "part", resume=True)
    assert resumed.start_epoch == 1  # epoch 2 again
    resumed.fit()
    assert kept(tmp_path / "part") == ["epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"]
    full = Trainer(config, tmp_path / "full")
    full.fit()
    for name in kept(tmp_path / "full"):
        a, b = (load_checkpoint(d / "checkpoints" / name)["model"] for d in (tmp_path / "part", tmp_path / "full"))
        assert all(torch.equal(a[k], b[k]) for k in b), name


# ---- train.keep_every_steps ------------------------------------------------------------------------------------
def test_keep_every_steps_keeps_the_state_after_those_steps(tmp_path):
    """Snapshots at steps 3, 6, ..., 15 of a 2-epoch run (8 steps per epoch) hold the weights and optimizer
    state a hand-driven loop over the same batches has after that many steps."""
    config = cfg("train.epochs=2", "train.keep_every_steps=3", "optimizer.momentum=0.9")
    Trainer(config, tmp_path / "run").fit()
    assert kept(tmp_path / "run") == [f"step_{s:07d}.pt" for s in (3, 6, 9, 12, 15)]
    ref = Trainer(config, tmp_path / "ref")  # never fitted: stepped by hand below
    for epoch in range(2):
        ref.rule.on_epoch_start(epoch, 2)
        ref.net.train()
        ref.loader.set_epoch(epoch)
        for x, y in ref.loader:
            ref.train_step(x, y)
            if ref.step % 3:
                continue
            ck = load_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{ref.step:07d}.pt")
            assert ck["step"] == ref.step and ck["epoch"] == epoch
            for k, v in ref.net.state_dict().items():
                assert torch.equal(ck["model"][k], v), (ref.step, k)
            mom = [s["momentum_buffer"] for s in ref.optimizer.state_dict()["state"].values()]
            assert mom and len(mom) == len(ck["optimizer"]["state"])
            for a, b in zip(mom, (s["momentum_buffer"] for s in ck["optimizer"]["state"].values())):
                assert torch.equal(a, b), ref.step
    assert ref.step == 16
