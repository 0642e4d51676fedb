"""Honest protocol and streaming through the trainer: selection on validation only, test read once at the end,
user datasets (the streaming path) train exactly like in-memory data and resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

from anytrain.config import load_config
from anytrain.data import StreamingData, from_datasets, load_dataset
from anytrain.train import Trainer

FAST = [
    "data.name=synthetic",
    "data.batch_size=32",
    "data.augment=false",
    "model.name=cnn1d-exits",
    "model.width=8",
    "model.exits=3",
    "train.epochs=3",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
    "optimizer.lr=0.05",
]


class Items(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def streamed(b) -> StreamingData:
    """The same splits as the in-memory bundle ``b``, as user datasets."""
    return from_datasets(
        Items(b.x_train, b.y_train), Items(b.x_test, b.y_test), val=Items(b.x_val, b.y_val), num_classes=b.num_classes
    )


def weights(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tr.net.state_dict().items()}


def test_user_datasets_train_like_in_memory_and_resume_exactly(tmp_path):
    cfg = load_config(None, FAST)
    mem = Trainer(cfg, tmp_path / "mem")
    m_mem = mem.fit()
    data = streamed(load_dataset("synthetic", seed=0, augment=False))
    st = Trainer(cfg, tmp_path / "st", data=data)
    m_st = st.fit()
    a, b = weights(mem), weights(st)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["accuracy"] for e in m_st["exits"]] == [e["accuracy"] for e in m_mem["exits"]]
    assert m_st["dataset"] == "custom" and m_st["split_sizes"] == m_mem["split_sizes"]

    class Stop(Exception):
        pass

    part = Trainer(cfg, tmp_path / "part", data=data)
    orig = part._end_epoch

    def end_epoch(epoch, loss):
        orig(epoch, loss)
        if epoch == 0:
            raise Stop

    part._end_epoch = end_epoch
    with pytest.raises(Stop):
        part.fit()
    resumed = Trainer(cfg, tmp_path / "part", resume=True, data=data)
    assert resumed.start_epoch == 1
    resumed.fit()
    c = weights(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_selection_sees_validation_only_and_test_is_read_once(tmp_path):
    cfg = load_config(None, [*FAST, "train.epochs=4"])
    tr = Trainer(cfg, tmp_path / "run")
    reads: list[tuple[int, str]] = []
    orig = tr.data.batches

    def batches(split, bs):
        reads.append((len(tr.history), split))
        return orig(split, bs)

    tr.data.batches = batches  # type: ignore[method-assign]
    m = tr.fit()
    during = [s for n, s in reads if n < 4 or s != "test"]
    assert "test" not in during  # no test read while training or selecting
    assert [s for _, s in reads].count("test") == 2  # final model and selected model, once each
    h = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all("test_acc" not in r for r in h)
    scores = [sum(r["val_acc"]) / len(r["val_acc"]) for r in h]
    best_epoch = max(range(len(h)), key=lambda i: (scores[i], -i)) + 1
    assert m["selected"]["epoch"] == best_epoch
    for e in m["exits"]:
        assert e["accuracy"] == e["test"] and 0 <= e["val"] <= 1
    assert m["split_sizes"]["val"] == round(0.1 * 512)
    assert m["budgeted"] and all(p["val"]["mean_flops"] <= p["budget"] * (1 + 1e-9) for p in m["budgeted"])
    if best_epoch == 4:  # the selected model is the final one
        assert [e["test"] for e in m["selected"]["exits"]] == [e["accuracy"] for e in m["exits"]]


def test_without_validation_nothing_is_selected(tmp_path):
    m = Trainer(load_config(None, [*FAST, "data.val_size=0", "train.epochs=1"]), tmp_path / "r").fit()
    assert m["selected"] is None and m["budgeted"] == [] and m["exits"][0]["val"] is None
    assert not (tmp_path / "r" / "best.pt").exists()


# validation accuracy per exit at the end of epochs 1, 2, 3: the mean over exits peaks at epoch 1, the last
# exit at epoch 2
SCRIPTED_VAL = [[0.9, 0.9, 0.5], [0.2, 0.2, 0.8], [0.5, 0.5, 0.6]]


@pytest.mark.parametrize(
    "rule,epoch,exits",
    [("rule.last_only=true", 2, [2]), ("rule.last_only=false", 1, [0, 1, 2])],
)
def test_best_checkpoint_is_selected_on_the_exits_the_rule_trains(tmp_path, monkeypatch, rule, epoch, exits):
    """Backprop (``joint`` with ``last_only``) trains the last exit only, so ``best.pt`` is the epoch where the
    last exit is best on validation, not where the mean over all (untrained) exits is; ``joint`` keeps the mean."""
    cfg = load_config(None, FAST + ["rule.name=joint", rule])
    tr = Trainer(cfg, tmp_path)
    real = tr.evaluate
    script = list(SCRIPTED_VAL)

    def evaluate(split):
        if split != "val" or not script:  # the end-of-run evaluations are real
            return real(split)
        n = 10
        acc = script.pop(0)
        correct = torch.stack([torch.arange(n) < round(a * n) for a in acc])
        return torch.ones(len(acc), n), correct

    monkeypatch.setattr(tr, "evaluate", evaluate)
    m = tr.fit()
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] + 1 == epoch
    assert m["selected"]["epoch"] == epoch
    assert str(exits) in m["selected"]["criterion"]
    assert tr.selection_exits() == exits
