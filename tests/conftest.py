"""Shared test setup: fixed seeds, one thread (the CI machine has 2 cores), and the ``--runslow`` option."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads(tmp_path_factory: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002  (libraries that draw from the global RNG)
    torch.set_num_threads(1)
    os.environ.setdefault("ANYTRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "anytrain-cache"))
