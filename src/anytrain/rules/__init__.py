"""Gradient rules over exits: how per-exit losses become parameter gradients.

* ``backward(losses, rule, shared=params)`` — any rule, on any model, in any training loop.
* ``build_rule(name, **kwargs)`` builds a rule by name; ``RULES`` lists them. ``dgl`` and ``sgl`` are training
  procedures (``anytrain.greedy``, which registers those names here when imported), not gradient rules.
* ``orthogonalize(G)`` and ``osgd_weights(gram)`` — OSGD's Gram–Schmidt on a ``K×P`` matrix or a Gramian.

TorchJD (and the solvers it imports) loads only when a TorchJD rule, ``OSGDWeighting`` or ``OSGDAggregator`` is
first used, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

from anytrain.registry import Registry, as_config_error
from anytrain.rules._base import (
    PROCEDURES,
    GradientRule,
    GradientWeighting,
    LossWeighting,
    procedure_error,
    scalar_losses,
)
from anytrain.rules._equilibrium import GradientEquilibrium
from anytrain.rules._functional import backward
from anytrain.rules._osgd import OSGD, orthogonalize, osgd_coefficients, osgd_weights
from anytrain.rules._sdn import SDN
from anytrain.rules._simple import AdaLoss, Joint, Weighted


def _torchjd_rule(aggregator: str, **kwargs: Any) -> GradientRule:
    from anytrain.rules._torchjd import TorchJDRule

    return TorchJDRule(aggregator, **kwargs)


RULES: Registry = Registry("rule")
RULES.register("joint", "sum of exit losses (last_only: true gives plain backprop)")(Joint)
RULES.register("weighted", "fixed per-exit loss weights")(Weighted)
RULES.register("adaloss", "weights inversely proportional to running-average exit losses")(AdaLoss)
RULES.register("sdn", "Shallow-Deep Networks: internal exit weights ramp linearly from 0.01 to a cap")(SDN)
RULES.register(
    "gradient-equilibrium", "IMTA's Gradient Equilibrium: each stage learns from the mean of its exits' losses"
)(GradientEquilibrium)
RULES.register("osgd", "orthogonalized SGD: Gram–Schmidt of per-exit gradients, earliest exit first")(OSGD)
RULES.register("torchjd:", "a TorchJD aggregator over the per-exit gradients (torchjd:UPGrad, torchjd:PCGrad, ...)")(
    _torchjd_rule
)


def build_rule(name: str, **kwargs: Any) -> GradientRule:
    """Build a rule by name (a bad option is a one-line ``ConfigError``). Names of the form
    ``torchjd:<Aggregator>`` use a TorchJD aggregator."""
    if name.lower() in PROCEDURES and name not in RULES:
        raise procedure_error(name.lower())
    if ":" in name:
        prefix, _, rest = name.partition(":")
        factory = RULES.get(prefix + ":")
        with as_config_error(f"rule {name!r}"):
            return factory(rest, **kwargs)
    return RULES.build(name, **kwargs)


_LAZY = ("OSGDAggregator", "OSGDWeighting", "TorchJDRule", "aggregator_names")


def __getattr__(name: str) -> Any:
    # The TorchJD-backed names import torchjd on first use only (import cost; see the module docstring).
    if name in _LAZY:
        from anytrain.rules import _torchjd

        return getattr(_torchjd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "OSGD",
    "RULES",
    "SDN",
    "AdaLoss",
    "GradientEquilibrium",
    "GradientRule",
    "GradientWeighting",
    "Joint",
    "LossWeighting",
    "OSGDAggregator",
    "OSGDWeighting",
    "TorchJDRule",
    "Weighted",
    "aggregator_names",
    "backward",
    "build_rule",
    "orthogonalize",
    "osgd_coefficients",
    "osgd_weights",
    "scalar_losses",
]
