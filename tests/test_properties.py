"""Property-based tests (hypothesis): random small staged nets and random configs.

* Valid combinations (any net shape, any number of exits, any rule, any registered optimizer, batch norm or
  not) train a few steps without an exception and leave finite weights.
* Invalid configs never crash with a traceback: they raise ``ConfigError``/``ValueError`` whose message is one
  line, before anything is written.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from anytrain.config import load_config
from anytrain.data import load_dataset
from anytrain.nets import StagedNet
from anytrain.optim import OPTIMIZERS, build_optimizer
from anytrain.registry import ConfigError
from anytrain.rules import build_rule
from anytrain.train import Trainer, build_components
from anytrain.train.trainer import optimizer_for

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

RULES = ["joint", "weighted", "adaloss", "osgd", "osgd-per-tensor", "osgd-amortized", "dgl", "sgl", "torchjd:MGDA"]


def _rule_kwargs(name: str, K: int) -> tuple[str, dict[str, Any]]:
    if name == "weighted":
        return name, {"weights": [float(k + 1) for k in range(K)]}
    if name == "osgd-per-tensor":
        return "osgd", {"mode": "per_tensor"}
    if name == "osgd-amortized":
        return "osgd", {"amortize": 2}
    return name, {}


def _optimizer_kwargs(name: str) -> dict[str, Any]:
    return {"sgd": {"lr": 0.05, "momentum": 0.9}, "adam": {"lr": 1e-3}, "adamw": {"lr": 1e-3}}.get(name, {"lr": 0.05})


@st.composite
def staged_nets(draw: st.DrawFn) -> tuple[list[int], bool, int]:
    K = draw(st.integers(1, 4))
    widths = [draw(st.integers(2, 9)) for _ in range(K)]
    return widths, draw(st.booleans()), K


def _build_net(in_features: int, widths: list[int], batchnorm: bool, classes: int) -> StagedNet:
    stages, exits, prev = [], [], in_features
    for w in widths:
        layers: list[nn.Module] = [nn.Linear(prev, w)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU())
        stages.append(nn.Sequential(*layers))
        exits.append(nn.Linear(w, classes))
        prev = w
    return StagedNet(stages, exits)


@SETTINGS
@given(
    net_spec=staged_nets(),
    rule=st.sampled_from(RULES),
    optimizer=st.sampled_from(sorted(OPTIMIZERS)),
    batch=st.integers(2, 24),
    features=st.integers(1, 7),
    classes=st.integers(2, 5),
)
def test_valid_combinations_train(tmp_path, net_spec, rule, optimizer, batch, features, classes):
    widths, batchnorm, K = net_spec
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            "data.name=synthetic",
            f"data.options.shape=[{features}]",
            f"data.options.num_classes={classes}",
            "data.options.n_train=64",
            "data.options.n_test=16",
            f"data.batch_size={batch}",
            "data.augment=false",
            "train.progress=false",
            "train.tensorboard=false",
            "train.plots=false",
            "schedule.name=none",
        ],
    )
    data = load_dataset("synthetic", shape=[features], num_classes=classes, n_train=64, n_test=16, augment=False)
    net = _build_net(features, widths, batchnorm, classes)
    rname, rkw = _rule_kwargs(rule, K)
    r = build_rule(rname, **rkw)
    r.bind(net)
    okw = _optimizer_kwargs(optimizer)
    opt = optimizer_for(r, net, lambda m, ps: build_optimizer(optimizer, m, ps, **okw))
    comps = {"device": torch.device("cpu"), "data": data, "net": net, "rule": r, "optimizer": opt}
    tr = Trainer(cfg, tmp_path, components=comps)
    tr.net.train()
    for i, (x, y) in enumerate(tr.loader):
        losses, stats = tr.train_step(x, y)
        assert losses.shape == (K,) and torch.isfinite(losses).all()
        assert all(isinstance(v, torch.Tensor) for v in stats.values())
        if i == 2:
            break
    assert all(torch.isfinite(p).all() for p in tr.net.parameters())
    assert not tmp_path.joinpath("checkpoint.pt").exists()  # train_step alone writes nothing


# ---- random configs, valid or not -----------------------------------------------------------------------------
# (override, valid?) atoms; a config is valid iff all its atoms are.
ATOMS: list[tuple[str, bool]] = [
    ("optimizer.lr=0.01", True),
    ("optimizer.lr=0", False),
    ("optimizer.lr=-0.5", False),
    ("optimizer.lr=fast", False),
    ("optimizer.momentum=0.5", True),
    ("optimizer.momentum=-1", False),
    ("optimizer.weight_decay=-0.001", False),
    ("optimizer.name=nope", False),
    ("rule.name=joint", True),
    ("rule.name=adaloss", True),
    ("rule.name=osgd", True),
    ("rule.name=nope", False),
    ("rule.name=weighted", False),  # no weights given
    ("model.exits=2", True),
    ("model.exits=3", True),
    ("model.width=4", True),
    ("model.width=0", False),
    ("model.nope=1", False),
    ("data.batch_size=8", True),
    ("data.batch_size=0", False),
    ("data.batch_size=1000000", False),
    ("train.epochs=-1", False),
    ("train.epochz=1", False),
    ("schedule.name=step", True),
    ("schedule.name=nope", False),
    ("seed=3", True),
    ("seed=1.5", False),
]


BASE = [
    "data.name=synthetic",
    "data.options.n_train=64",
    "data.options.n_test=16",
    "data.batch_size=16",
    "model.name=cnn1d-exits",
    "model.width=4",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
    "train.epochs=1",
]


def _accepted(tmp_path, overrides: list[str]) -> bool:
    """Build the config's components and take one step: True, or False after a clean one-line rejection."""
    try:
        cfg = load_config(None, BASE + overrides)
        tr = Trainer(cfg, tmp_path / "run", components=build_components(cfg))
    except (ConfigError, ValueError) as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip(), msg
        assert not (tmp_path / "run").exists()
        return False
    x, y = next(iter(tr.loader))
    losses, _ = tr.train_step(x, y)
    assert torch.isfinite(losses).all()
    return True


@SETTINGS
@given(picks=st.lists(st.sampled_from(ATOMS), min_size=1, max_size=4))
def test_random_configs_train_or_fail_cleanly(tmp_path, picks):
    # the last value of a key wins, so validity is decided by the last atom for each key
    last: dict[str, bool] = {}
    for a, ok in picks:
        last[a.partition("=")[0]] = ok
    overrides = [a for a, _ in picks]
    assert _accepted(tmp_path, overrides) == all(last.values()), overrides


def test_each_atom_alone_has_its_labelled_outcome(tmp_path):
    # the labels the property relies on are checked by running each atom, and the outcomes actually observed
    # include both acceptance and rejection (guards against a vacuous property)
    observed = [_accepted(tmp_path / str(i), [a]) for i, (a, _) in enumerate(ATOMS)]
    wrong = [a for (a, ok), got in zip(ATOMS, observed) if ok != got]
    assert not wrong, f"atoms whose outcome differs from their label: {wrong}"
    assert True in observed and False in observed


@pytest.mark.parametrize("K", [1, 3])
def test_weighted_rule_k_mismatch_is_value_error(K):
    net = _build_net(3, [4] * K, False, 2)
    r = build_rule("weighted", weights=[1.0] * (K + 1))
    with pytest.raises(ValueError, match=f"{K + 1} weights but the network has {K} exits"):
        r.bind(net)
