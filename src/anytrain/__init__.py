"""anytrain: anytime networks, OSGD, decoupled greedy learning, DessiLBI and curvature-corrected learning.

The main entry points are importable from here; each loads its subpackage on first use, so ``import anytrain``
itself imports nothing heavy.

* ``anytrain.backward(losses, rule, shared=params)`` — a per-exit gradient rule in your own loop, on any model.
* ``anytrain.StagedNet(stages, exits)`` — your own blocks and heads as a staged network (no copies).
* ``anytrain.build_rule``, ``anytrain.build_model``, ``anytrain.build_optimizer`` — the registries by name.
* ``anytrain.SLBI``, ``anytrain.CurvatureCorrected`` — the optimizers (``torch.optim.Optimizer`` subclasses).
* ``anytrain.Trainer`` — the training loop the ``anytrain`` command runs.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_ENTRY_POINTS = {
    "backward": "anytrain.rules",
    "build_rule": "anytrain.rules",
    "orthogonalize": "anytrain.rules",
    "StagedNet": "anytrain.nets",
    "build_model": "anytrain.nets",
    "SLBI": "anytrain.optim",
    "CurvatureCorrected": "anytrain.optim",
    "build_optimizer": "anytrain.optim",
    "Trainer": "anytrain.train",
}


def __getattr__(name: str) -> Any:
    if name in _ENTRY_POINTS:
        return getattr(import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'anytrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_ENTRY_POINTS])


__all__ = [
    "SLBI",
    "CurvatureCorrected",
    "StagedNet",
    "Trainer",
    "__version__",
    "backward",
    "build_model",
    "build_optimizer",
    "build_rule",
    "orthogonalize",
]
