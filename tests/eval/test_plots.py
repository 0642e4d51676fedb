"""``anytrain plot``: the training curves of a one-epoch run are curves (per step), and a history written before
per-step records existed is still drawn per epoch."""

from __future__ import annotations

import json

import pytest

import anytrain.eval.plots as plots
from anytrain.cli import main

ONE = [
    "data.name=synthetic",
    "data.options.n_train=160",
    "data.options.n_test=64",
    "data.val_size=32",
    "data.batch_size=16",  # 8 steps
    "model.name=cnn1d-exits",
    "model.width=4",
    "model.exits=3",
    "train.epochs=1",
    "train.log_every=2",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("plots") / "run"
    assert main(["train", *[a for kv in ONE for a in ("--set", kv)], "--out", str(out)]) == 0
    return out


def plot(run, monkeypatch) -> object:
    """Run ``anytrain plot RUN``; return the figure it saved as training_curves.png."""
    figs = []
    draw = plots.training_curves

    def spy(history):
        figs.append(draw(history))
        return figs[-1]

    monkeypatch.setattr(plots, "training_curves", spy)
    (run / "training_curves.png").unlink(missing_ok=True)
    assert main(["plot", str(run)]) == 0
    assert (run / "training_curves.png").stat().st_size > 0
    (fig,) = figs
    return fig


def xy(ax) -> list[tuple[list[float], list[float]]]:
    return [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines]


def test_a_one_epoch_run_has_a_loss_curve_per_step(one_epoch, monkeypatch):
    (rec,) = json.loads((one_epoch / "history.json").read_text())
    fig = plot(one_epoch, monkeypatch)
    loss, acc = fig.axes
    steps = [2, 4, 6, 8]
    assert [p[0] for p in rec["step_loss"]] == steps
    assert xy(loss) == [(steps, [p[2][k] for p in rec["step_loss"]]) for k in range(3)]  # one line per exit
    assert xy(acc) == [([8], [a]) for a in rec["val_acc"]]  # at the epoch's end, on the same step axis
    assert loss.get_xlabel() == acc.get_xlabel() == "step"


def test_a_history_without_step_records_is_drawn_per_epoch(one_epoch, tmp_path, monkeypatch):
    run = tmp_path / "old"
    run.mkdir()
    (rec,) = json.loads((one_epoch / "history.json").read_text())
    rec.pop("step_loss")
    (run / "history.json").write_text(json.dumps([rec, {**rec, "epoch": 2}]))
    fig = plot(run, monkeypatch)
    loss, acc = fig.axes
    assert xy(loss) == [([1, 2], [rec["train_loss"][k]] * 2) for k in range(3)]
    assert xy(acc) == [([1, 2], [rec["val_acc"][k]] * 2) for k in range(3)]
    assert loss.get_xlabel() == "epoch"
