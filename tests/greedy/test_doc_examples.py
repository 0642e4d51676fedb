"""The docstring examples of the greedy modules and heads run and give what they show."""

from __future__ import annotations

import doctest

import pytest
import torch

import anytrain.greedy.buffer
import anytrain.greedy.dgl
import anytrain.nets.heads
import anytrain.nets.modules


@pytest.mark.parametrize(
    "mod", [anytrain.greedy.buffer, anytrain.greedy.dgl, anytrain.nets.modules, anytrain.nets.heads]
)
def test_docstring_examples(mod) -> None:
    res = doctest.testmod(mod, extraglobs={"torch": torch})
    assert res.attempted > 0 and res.failed == 0
