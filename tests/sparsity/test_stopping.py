"""The SLBI stopping point is chosen on validation figures only."""

from __future__ import annotations

import pytest

from anytrain.sparsity import stopping_point


def test_stopping_point_uses_validation_and_ignores_test():
    path = [
        {"step": 8, "removed": 0.2, "wstar_val_acc": 0.90, "wstar_acc": 0.99},
        {"step": 16, "removed": 0.5, "wstar_val_acc": 0.80, "wstar_acc": 0.95},
        {"step": 24, "removed": 0.5, "wstar_val_acc": 0.85, "wstar_acc": 0.10},
        {"step": 32, "removed": 0.7, "wstar_val_acc": 0.95, "wstar_acc": 0.99},
    ]
    # first reaches 50 %: two points remove exactly 0.5; the better *validation* one wins, whatever test says
    assert stopping_point(path, 0.5)["step"] == 24
    assert stopping_point(path, 0.6)["step"] == 32
    assert stopping_point(path, 0.9)["step"] == 32  # never reached: the sparsest point
    assert stopping_point(path, 0.1)["step"] == 8
    with pytest.raises(ValueError, match="empty"):
        stopping_point([], 0.5)
    with pytest.raises(KeyError):  # a path without validation figures cannot be stopped on
        stopping_point([{"removed": 0.6, "wstar_acc": 0.9}], 0.5)
