"""Gradient rules over exits. ``build_rule(name, **kwargs)``; ``RULES`` lists them."""

from __future__ import annotations

from typing import Any

from anytrain.registry import Registry
from anytrain.rules.base import GradientRule, scalar_losses
from anytrain.rules.greedy_rules import DGL, SGL
from anytrain.rules.osgd import OSGD, OSGDWeighting, orthogonalize, osgd_weights
from anytrain.rules.simple import AdaLoss, Joint, Weighted
from anytrain.rules.torchjd_rules import TorchJDRule

RULES: Registry = Registry("rule")
RULES.register("joint", "sum of exit losses (last_only: true gives plain backprop)")(Joint)
RULES.register("weighted", "fixed per-exit loss weights")(Weighted)
RULES.register("adaloss", "weights inversely proportional to running-average exit losses")(AdaLoss)
RULES.register("dgl", "decoupled greedy learning: each module learns only from its own exit")(DGL)
RULES.register("sgl", "sequential greedy learning: one module at a time, earlier ones frozen")(SGL)
RULES.register("osgd", "orthogonalized SGD: Gram–Schmidt of per-exit gradients, earliest exit first")(OSGD)
RULES.register("torchjd:", "a TorchJD aggregator over the per-exit gradients (torchjd:UPGrad, torchjd:PCGrad, ...)")(
    TorchJDRule
)


def build_rule(name: str, **kwargs: Any) -> GradientRule:
    """Build a rule by name. Names of the form ``torchjd:<Aggregator>`` use a TorchJD aggregator."""
    if ":" in name:
        prefix, _, rest = name.partition(":")
        return RULES.get(prefix + ":")(rest, **kwargs)
    return RULES.get(name)(**kwargs)


__all__ = ["DGL", "RULES", "SGL", "AdaLoss", "GradientRule", "Joint", "Weighted", "build_rule", "scalar_losses"]
__all__ += ["OSGD", "OSGDWeighting", "TorchJDRule", "orthogonalize", "osgd_weights"]
