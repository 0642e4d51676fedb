"""Every shipped config loads, validates, and builds its model, rule and optimizer (CIFAR ones on fake data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anytrain.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_resolves(path):
    from anytrain.nets import build_model
    from anytrain.optim import build_optimizer
    from anytrain.rules import build_rule
    from anytrain.train.trainer import optimizer_for

    cfg = load_config(path)
    shape = {"mnist1d": (1, 40), "digits": (1, 8, 8), "synthetic": (1, 16)}.get(cfg.data.name, (3, 32, 32))
    classes = 100 if cfg.data.name == "cifar100" else 10
    net = build_model(cfg.model.name, in_shape=shape, num_classes=classes, **cfg.model.kwargs())
    rule = build_rule(cfg.rule.name, **cfg.rule.kwargs())
    rule.bind(net)
    o = cfg.optimizer
    optimizer_for(rule, net, lambda m, ps: build_optimizer(o.name, m, ps, **o.kwargs()))
