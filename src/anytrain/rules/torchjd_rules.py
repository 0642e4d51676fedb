"""Every TorchJD aggregator as a gradient rule over exits (``rule: torchjd:UPGrad``).

The per-exit gradients over the shared (trunk) parameters form the rows of a ``K×P`` Jacobian, which the named
``torchjd.aggregation`` aggregator turns into one update direction; each exit head gets its own exit's
gradient, as in OSGD. The Jacobian rows come from the same truncated per-exit backward passes OSGD uses
(``anytrain.rules.pergrad``), so OSGD and its peers differ only in the aggregation.

Aggregators that need the number of objectives (``NashMTL(n_tasks)``) get ``K`` from the network; ``CAGrad``
defaults to ``c=0.5``. Optional solvers (UPGrad/DualProj need ``quadprog``, CAGrad/NashMTL ``cvxpy``) come with
``pip install "torchjd[full]"``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from anytrain.registry import ConfigError
from anytrain.rules.base import GradientRule, scalar_losses
from anytrain.rules.pergrad import (
    GRAD_METHODS,
    ExitPartition,
    exit_partition,
    per_exit_grads,
    reduce_per_exit,
    write_flat,
)

# Defaults for aggregators whose constructor has required hyper-parameters we can choose sensibly.
_DEFAULT_KWARGS: dict[str, dict[str, Any]] = {"CAGrad": {"c": 0.5}}


def aggregator_names() -> list[str]:
    """Names of the TorchJD aggregators (classes of ``torchjd.aggregation`` that aggregate a Jacobian)."""
    import torchjd.aggregation as agg

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
    import torchjd.aggregation as agg

    names = aggregator_names()
    lookup = {n.lower(): n for n in names}
    if name.lower() not in lookup:
        raise ConfigError(f"unknown TorchJD aggregator {name!r}; known: {', '.join(names)}")
    return getattr(agg, lookup[name.lower()])


class TorchJDRule(GradientRule):
    """Aggregate the per-exit trunk gradients with a TorchJD aggregator.

    ::

        J = [∇_trunk L_1; …; ∇_trunk L_K]          (truncated per-exit backward passes)
        trunk.grad = aggregator(J);   head_k.grad = ∇_{head_k} L_k

    Args:
        aggregator: class name in ``torchjd.aggregation`` (case-insensitive): ``UPGrad``, ``PCGrad``, ``MGDA``,
            ``CAGrad``, ``NashMTL``, ``AlignedMTL``, ``DualProj``, ``IMTLG``, ``GradDrop``, ...
        grad_method: how the per-exit gradients are computed (``"loop"`` or ``"batched"``).
        **kwargs: passed to the aggregator's constructor (``c`` for CAGrad, ...).

    Example:
        >>> from anytrain.rules import build_rule
        >>> build_rule("torchjd:PCGrad")
        TorchJDRule(aggregator=PCGrad())
    """

    name = "torchjd"

    def __init__(self, aggregator: str, grad_method: str = "loop", **kwargs: Any) -> None:
        if grad_method not in GRAD_METHODS:
            raise ValueError(f"grad_method must be one of {GRAD_METHODS}, got {grad_method!r}")
        self.cls = resolve_aggregator(aggregator)
        self.grad_method = grad_method
        self.kwargs = {**_DEFAULT_KWARGS.get(self.cls.__name__, {}), **kwargs}
        self._needs_k = "n_tasks" in inspect.signature(self.cls).parameters and "n_tasks" not in self.kwargs
        self.aggregator: nn.Module | None = None if self._needs_k else self._build({})
        self._part: ExitPartition | None = None
        self._part_key: tuple[int, int] | None = None

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

    def backward(self, net: nn.Module, losses: Sequence[Tensor]) -> dict[str, Tensor]:
        vec = scalar_losses(losses)
        K = vec.numel()
        agg = self._ensure(K)
        key = (id(net), K)
        if self._part is None or self._part_key != key:
            self._part, self._part_key = exit_partition(net, K), key
        G, head_grads = per_exit_grads(list(losses), self._part, self.grad_method)
        if self.reducer is not None:  # data parallel: aggregate the rank-averaged Jacobian
            G, head_grads = reduce_per_exit(self, G, head_grads)
            self.reduces_own_grads = True
        direction = agg(G)
        write_flat(self._part, direction, head_grads)
        return {"loss": vec.detach().sum()}

    def state_dict(self) -> dict[str, Any]:
        # Aggregators keep their (few) running quantities as module state where they have any.
        return {"aggregator": {} if self.aggregator is None else dict(self.aggregator.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.aggregator is not None and state.get("aggregator"):
            self.aggregator.load_state_dict(state["aggregator"])

    def extra_repr(self) -> str:
        return f"aggregator={self.aggregator!r}" if self.aggregator is not None else f"aggregator={self.cls.__name__}"
