"""Every gradient rule composes with every optimizer through the one trainer: a short run on a learnable toy
task (class templates plus noise) lowers the training loss well below chance level and beats chance accuracy on
the test split, and a run interrupted after epoch 1 and resumed reaches the same final weights bit for bit.

This is the composer-style settings table: adding a rule or an optimizer means adding one row here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from anytrain.config import load_config
from anytrain.train import Trainer

RULES = {
    "joint": {},
    "adaloss": {},
    "sdn": {},
    "gradient-equilibrium": {},
    "osgd": {},
    "osgd-amortized": {"name": "osgd", "amortize": 3},
    "osgd-per-tensor": {"name": "osgd", "mode": "per_tensor", "rescale": True},
    "torchjd-upgrad": {"name": "torchjd:UPGrad"},
    "dgl": {},
    "sgl": {},
}
OPTIMIZERS = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
    "adam": {"lr": 0.01},
    "slbi": {"lr": 0.05, "kappa": 1.0, "nu": 10.0, "momentum": 0.9},
    "curvature": {"lr": 0.05, "alpha": 0.5, "damping": 0.1, "factor_every": 2, "inverse_every": 4},
}


CLASSES = 4
CHANCE_LOSS = math.log(CLASSES)  # cross-entropy of the uniform prediction


def cfg_for(rule: str, opt: str, epochs: int = 3) -> dict:
    r = dict(RULES[rule])
    r.setdefault("name", rule)
    sets = [
        "data.name=synthetic",
        "data.batch_size=32",
        f"data.options.num_classes={CLASSES}",
        "data.options.noise=0.5",
        "model.name=cnn1d-exits",
        "model.width=4",
        "model.exits=3",
        f"train.epochs={epochs}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.plots=false",
        f"optimizer.name={opt}",
    ]
    sets += [f"rule.{k}={v}" for k, v in r.items()]
    sets += [f"optimizer.{k}={v}" for k, v in OPTIMIZERS[opt].items()]
    return load_config(None, sets)


class Stop(Exception):
    pass


def _registered(rule: str, opt: str) -> None:
    from anytrain.optim import OPTIMIZERS as O
    from anytrain.rules import RULES as R

    name = RULES[rule].get("name", rule)
    missing = [n for n, reg in ((name.split(":")[0] + (":" if ":" in name else ""), R), (opt, O)) if n not in reg]
    assert not missing, f"not registered: {missing}"


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("rule", list(RULES))
def test_rule_optimizer_trains_and_resumes(tmp_path, rule, opt):
    _registered(rule, opt)
    torch.manual_seed(0)
    cfg = cfg_for(rule, opt, epochs=6 if rule == "sgl" else 3)  # sgl trains one module at a time: 2 epochs each
    full = Trainer(cfg, tmp_path / "full")
    m = full.fit()
    assert all(torch.isfinite(p).all() for p in full.net.parameters())
    # it learns: the best exit's training loss ends well below the uniform prediction's, and its test accuracy is
    # far above chance (1/4; with 256 test samples chance accuracy has a standard deviation of about 0.03)
    history = json.loads((tmp_path / "full" / "history.json").read_text())
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    assert min(last) < 0.8 * CHANCE_LOSS and min(last) < min(first), f"{rule}+{opt}: train loss {first} -> {last}"
    best = max(e["accuracy"] for e in m["exits"])
    assert best > 0.5, f"{rule}+{opt}: test accuracy per exit {[e['accuracy'] for e in m['exits']]}"

    part = Trainer(cfg, tmp_path / "part")
    orig = part._end_epoch

    def end_epoch(epoch, loss):
        orig(epoch, loss)
        if epoch == 0:
            raise Stop

    part._end_epoch = end_epoch
    with pytest.raises(Stop):
        part.fit()
    resumed = Trainer(cfg, tmp_path / "part", resume=True)
    resumed.fit()
    for (k, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), f"{rule}+{opt}: {k} differs after resume"
    assert json.loads((tmp_path / "part" / "metrics.json").read_text())["rule"] == RULES[rule].get("name", rule)
