"""Every TorchJD aggregator as a gradient rule over exits (``rule: torchjd:UPGrad``).

The per-exit gradients over the shared (trunk) parameters form the rows of a ``K×P`` Jacobian, which the named
``torchjd.aggregation`` aggregator turns into one update direction; each exit head gets its own exit's
gradient, as in OSGD. The Jacobian rows come from the same truncated per-exit backward passes OSGD uses
(``anytrain.rules._pergrad``), so OSGD and its peers differ only in the aggregation.

This module imports TorchJD (and, through it, its solvers); ``anytrain.rules`` imports it only when a TorchJD rule,
``OSGDWeighting`` or ``OSGDAggregator`` is first asked for, so ``import anytrain.rules`` stays cheap.

Aggregators that need the number of objectives (``NashMTL(n_tasks)``) get ``K`` from the network; ``CAGrad``
defaults to ``c=0.5``. Optional solvers (UPGrad/DualProj need ``quadprog``, CAGrad/NashMTL ``cvxpy``) come with
``pip install "torchjd[full]"``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch  # noqa: F401  (doctest globals)
import torchjd.aggregation as agg
from torch import Tensor, nn

from anytrain.registry import ConfigError
from anytrain.rules._base import GradientWeighting
from anytrain.rules._osgd import osgd_weights
from anytrain.rules._pergrad import GRAD_METHODS, ExitPartition

# Defaults for aggregators whose constructor has required hyper-parameters we can choose sensibly.
_DEFAULT_KWARGS: dict[str, dict[str, Any]] = {"CAGrad": {"c": 0.5}}


def aggregator_names() -> list[str]:
    """Names of the TorchJD aggregators (classes of ``torchjd.aggregation`` that aggregate a Jacobian)."""
    out = []
    for n in agg.__all__:
        obj = getattr(agg, n)
        if (
            inspect.isclass(obj)
            and issubclass(obj, agg.Aggregator)
            and not inspect.isabstract(obj)
            and obj not in (agg.WeightedAggregator, agg.GramianWeightedAggregator)
        ):
            out.append(n)
    return sorted(out)


def resolve_aggregator(name: str) -> type:
    names = aggregator_names()
    lookup = {n.lower(): n for n in names}
    if name.lower() not in lookup:
        raise ConfigError(f"unknown TorchJD aggregator {name!r}; known: {', '.join(names)}")
    return getattr(agg, lookup[name.lower()])


class TorchJDRule(GradientWeighting):
    """Aggregate the per-exit trunk gradients with a TorchJD aggregator.

    ::

        J = [∇_trunk L_1; …; ∇_trunk L_K]          (truncated per-exit backward passes)
        trunk.grad = aggregator(J);   head_k.grad = ∇_{head_k} L_k

    Args:
        aggregator: class name in ``torchjd.aggregation`` (case-insensitive): ``UPGrad``, ``PCGrad``, ``MGDA``,
            ``CAGrad``, ``NashMTL``, ``AlignedMTL``, ``DualProj``, ``IMTLG``, ``GradDrop``, ...; or an aggregator
            object (any ``torchjd.aggregation.Aggregator``, e.g. ``OSGDAggregator()``).
        grad_method: how the per-exit gradients are computed (``"loop"`` or ``"batched"``).
        **kwargs: passed to the aggregator's constructor (``c`` for CAGrad, ...).

    Example:
        >>> from anytrain.rules import build_rule
        >>> build_rule("torchjd:PCGrad")
        TorchJDRule(aggregator=PCGrad())
    """

    name = "torchjd"

    def __init__(self, aggregator: str | agg.Aggregator, grad_method: str = "loop", **kwargs: Any) -> None:
        super().__init__()
        if grad_method not in GRAD_METHODS:
            raise ValueError(f"grad_method must be one of {GRAD_METHODS}, got {grad_method!r}")
        self.grad_method = grad_method
        if isinstance(aggregator, agg.Aggregator):  # an aggregator object, used as given
            if kwargs:
                raise ValueError("options go to the aggregator's constructor, not with an aggregator object")
            self.cls, self.kwargs, self._needs_k = type(aggregator), {}, False
            self.aggregator: nn.Module | None = aggregator
            return
        self.cls = resolve_aggregator(aggregator)
        self.kwargs = {**_DEFAULT_KWARGS.get(self.cls.__name__, {}), **kwargs}
        self._needs_k = "n_tasks" in inspect.signature(self.cls).parameters and "n_tasks" not in self.kwargs
        self.aggregator = None if self._needs_k else self._build({})

    def _build(self, extra: dict[str, Any]) -> nn.Module:
        try:
            return self.cls(**self.kwargs, **extra)
        except ImportError as e:
            raise ConfigError(f"TorchJD aggregator {self.cls.__name__}: {str(e).splitlines()[0]}") from None
        except TypeError as e:
            raise ConfigError(f"TorchJD aggregator {self.cls.__name__}: {e}") from None

    def _ensure(self, K: int) -> nn.Module:
        if self.aggregator is None:
            self.aggregator = self._build({"n_tasks": K})
        return self.aggregator

    def bind(self, net: nn.Module) -> None:
        self._ensure(getattr(net, "num_exits", 1))
        super().bind(net)

    def aggregate(self, G: Tensor, part: ExitPartition) -> tuple[Tensor, dict[str, Tensor]]:
        return self._ensure(G.shape[0])(G), {}

    def state_dict(self) -> dict[str, Any]:
        # Aggregators keep their (few) running quantities as module state where they have any.
        return {"aggregator": {} if self.aggregator is None else dict(self.aggregator.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.aggregator is not None and state.get("aggregator"):
            self.aggregator.load_state_dict(state["aggregator"])

    def extra_repr(self) -> str:
        return f"aggregator={self.aggregator!r}" if self.aggregator is not None else f"aggregator={self.cls.__name__}"


class OSGDWeighting(agg.Weighting):
    """TorchJD ``Weighting``: maps the Gramian of the per-objective gradients to OSGD's weights.

    Objectives are taken in their given order (first = highest priority). Usable with
    ``torchjd.autogram.Engine`` (``losses.backward(weighting(engine.compute_gramian(losses)))``) and, wrapped
    in :class:`OSGDAggregator`, with ``torchjd.autojac``.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> OSGDWeighting()(J @ J.T)
        tensor([0., 1.])
    """

    def __init__(self, rescale: bool = False, rtol: float | None = None) -> None:
        super().__init__()
        self.rescale = bool(rescale)
        self.rtol = rtol

    def forward(self, gramian: Tensor, /) -> Tensor:
        return osgd_weights(gramian, self.rescale, self.rtol)

    def extra_repr(self) -> str:
        return f"rescale={self.rescale}, rtol={self.rtol}"


class OSGDAggregator(agg.GramianWeightedAggregator):
    """TorchJD ``Aggregator`` for OSGD: ``J ↦ Σ_k u_k`` with the rows of ``J`` Gram–Schmidted in order.

    Example:
        >>> OSGDAggregator()(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))  # u_1 + u_2 = (1, 0) + (0, 1)
        tensor([1., 1.])
    """

    def __init__(self, rescale: bool = False, rtol: float | None = None) -> None:
        super().__init__(OSGDWeighting(rescale, rtol))
        self.rescale = bool(rescale)
        self.rtol = rtol

    def __repr__(self) -> str:
        return f"OSGDAggregator(rescale={self.rescale}, rtol={self.rtol})"


__all__ = ["OSGDAggregator", "OSGDWeighting", "TorchJDRule", "aggregator_names", "resolve_aggregator"]
