"""The staged network: a chain of stages, each followed by an exit head.

``stages[k]`` maps the state after stage ``k-1`` to the state after stage ``k`` (the input tensor is the state
before stage 0). A state is a tensor or any pytree of tensors (a list of per-layer activations, say), which is
what lets recursively nested networks hand every internal activation of stage ``k-1`` to stage ``k``.
``exits[k]`` maps the state after stage ``k`` to logits. Exit ``k`` therefore depends only on stages ``0..k``
and on its own head: the property OSGD and decoupled greedy learning build on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_map

from anytrain.nets.flops import staged_macs

State = Any  # a tensor or a pytree of tensors


def detach_state(state: State) -> State:
    """Detach every tensor of a state (no gradient crosses this point)."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, state)


class StagedNet(nn.Module):
    """A network with ``num_exits`` predictions, earliest first.

    Wraps your own blocks and heads: the modules you pass are used as they are (no copies, no re-initialization;
    ``net.stages[k] is stages[k]``), so training the wrapper trains your modules. This is what the rules that need
    the stage structure (DGL, SGL, amortized OSGD), the trainer and the exporters take.

    Args:
        stages: one module per stage; stage ``k`` takes the state after stage ``k-1``.
        exits: one head per stage, mapping that stage's state to logits.

    Example:
        >>> net = StagedNet([nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 8))],
        ...                 [nn.Linear(8, 3), nn.Linear(8, 3)])
        >>> [o.shape for o in net(torch.randn(2, 4))]
        [torch.Size([2, 3]), torch.Size([2, 3])]
        >>> len(net(torch.randn(2, 4), upto=0))
        1
    """

    def __init__(self, stages: Sequence[nn.Module], exits: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(stages) != len(exits) or len(stages) == 0:
            raise ValueError(f"need one exit per stage, got {len(stages)} stages and {len(exits)} exits")
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def keep_eval(self, modules: Sequence[nn.Module]) -> None:
        """Keep ``modules`` (frozen BatchNorm layers, say) in eval mode whatever ``train()`` is called with."""
        self.__dict__["_kept_eval"] = list(modules)
        self.train(self.training)

    def train(self, mode: bool = True) -> StagedNet:
        super().train(mode)
        for m in self.__dict__.get("_kept_eval", ()):
            m.eval()
        return self

    def _check_upto(self, upto: int | None) -> int:
        last = self.num_exits - 1
        if upto is None:
            return last
        if upto < 0:
            upto += self.num_exits
        if not 0 <= upto <= last:
            raise ValueError(f"upto={upto} out of range for {self.num_exits} exits")
        return upto

    def states(self, x: Tensor, upto: int | None = None, start: int = 0) -> list[State]:
        """States after stages ``start..upto``; with ``start > 0``, ``x`` is the state after stage ``start-1``."""
        upto = self._check_upto(upto)
        out = []
        s = x
        for k in range(start, upto + 1):
            s = self.stages[k](s)
            out.append(s)
        return out

    def forward(self, x: Tensor, upto: int | None = None) -> list[Tensor]:
        """Logits of exits ``0..upto`` (all exits by default), earliest first."""
        return [head(s) for head, s in zip(self.exits, self.states(x, upto))]

    def forward_exit(self, x: Tensor, k: int) -> Tensor:
        """Logits of exit ``k`` alone: runs stages ``0..k`` and head ``k`` only (deadline inference)."""
        k = self._check_upto(k)
        return self.exits[k](self.states(x, k)[-1])

    def continue_from(self, state: State, start: int, upto: int | None = None) -> list[Tensor]:
        """Logits of exits ``start..upto`` given the state after stage ``start-1`` (reuse of earlier work)."""
        return [self.exits[start + i](s) for i, s in enumerate(self.states(state, upto, start=start))]

    # ---- parameter partition -------------------------------------------------------------------------
    def stage_parameters(self, k: int) -> Iterator[nn.Parameter]:
        return self.stages[k].parameters()

    def exit_parameters(self, k: int) -> Iterator[nn.Parameter]:
        return self.exits[k].parameters()

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Parameters of the stages (shared by every exit at or after their stage)."""
        return [p for st in self.stages for p in st.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for h in self.exits for p in h.parameters()]

    # ---- cost -----------------------------------------------------------------------------------------
    def flops_breakdown(self, input_shape: Sequence[int]) -> tuple[list[int], list[int]]:
        """Multiply-adds for one sample, per stage and per exit head (see ``anytrain.nets.flops``)."""
        return staged_macs(self, input_shape)

    def flops_per_exit(self, input_shape: Sequence[int]) -> list[int]:
        """Cumulative multiply-adds for one sample to reach each exit: stages ``0..k`` plus head ``k``."""
        stage, head = self.flops_breakdown(input_shape)
        out, acc = [], 0
        for s, h in zip(stage, head):
            acc += s
            out.append(acc + h)
        return out


def require_staged(net: Any, what: str) -> StagedNet:
    """``net`` itself if it is a :class:`StagedNet`; otherwise a one-line ``ValueError`` saying that ``what``
    needs one and how to get one from the user's own modules."""
    if isinstance(net, StagedNet):
        return net
    raise ValueError(
        f"{what} needs the stage structure of an anytrain.nets.StagedNet, got {type(net).__name__}; wrap your "
        "blocks and heads with StagedNet(stages, exits) (no copies)"
    )


def check_exits(net: nn.Module, k: int, what: str) -> None:
    """Raise a one-line error when ``what`` expects ``k`` exits and ``net`` has another number."""
    n = getattr(net, "num_exits", 1)
    if n != k:
        raise ValueError(f"{what} expects {k} exits but the network has {n}")
