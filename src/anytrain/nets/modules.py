"""Greedy modules: a partition of a staged network's stages, one module's forward pass, one optimizer per module.

Decoupled greedy learning (Belilovsky, Eickenberg & Oyallon, ICML 2020) cuts the network into ``M`` modules.
Module ``j`` owns a contiguous run of stages ``a_j..b_j`` and every exit head attached to them. Its *training
exit* is the exit after its last stage, ``b_j``; it minimises that exit's loss

    θ_j ← θ_j − η ∇_{θ_j} L(h_j(f_j(x_{j−1})), y),    x_j = sg(f_j(x_{j−1})),

where ``sg`` stops the gradient: no gradient crosses a module boundary. Exits at inner stages of a module
(``a_j ≤ k < b_j``) are *probes*: their heads learn on detached features, so they are free anytime predictions
that never change the trunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from anytrain.nets.staged import StagedNet, detach_state

Partition = list[list[int]]


def partition_stages(num_stages: int, modules: int | Sequence[int] | None = None) -> Partition:
    """Split stages ``0..num_stages-1`` into contiguous modules.

    Args:
        num_stages: number of stages (= exits) of the network.
        modules: ``None``: one module per stage; an int ``M``: ``M`` modules as even as possible (the first
            ``num_stages mod M`` modules get one stage more); a list: the number of stages of each module.

    Returns:
        The stage indices of each module, earliest first.

    Example:
        >>> partition_stages(5, 2)
        [[0, 1, 2], [3, 4]]
        >>> partition_stages(4, [1, 3])
        [[0], [1, 2, 3]]
    """
    if num_stages < 1:
        raise ValueError(f"need at least one stage, got {num_stages}")
    if modules is None:
        sizes = [1] * num_stages
    elif isinstance(modules, int):
        if not 1 <= modules <= num_stages:
            raise ValueError(f"modules={modules} must be between 1 and the number of stages ({num_stages})")
        q, r = divmod(num_stages, modules)
        sizes = [q + (1 if j < r else 0) for j in range(modules)]
    else:
        sizes = [int(s) for s in modules]
        if any(s < 1 for s in sizes) or sum(sizes) != num_stages:
            raise ValueError(f"module sizes {sizes} must be positive and sum to the {num_stages} stages")
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


def module_parameters(net: StagedNet, stages: Sequence[int]) -> list[nn.Parameter]:
    """Parameters of a module: its stages and all their exit heads (trainable ones only)."""
    params: list[nn.Parameter] = []
    for k in stages:
        params += [p for p in net.stages[k].parameters() if p.requires_grad]
        params += [p for p in net.exits[k].parameters() if p.requires_grad]
    return params


def module_forward(net: StagedNet, stages: Sequence[int], state: Any) -> tuple[Any, list[Tensor]]:
    """Run one module on its input ``state``: returns the module's output state (not detached) and the logits
    of its exits, earliest first. Inner exits see detached features (probes); the last exit does not."""
    logits = []
    last = stages[-1]
    for k in stages:
        state = net.stages[k](state)
        logits.append(net.exits[k](state if k == last else detach_state(state)))
    return state, logits


class _StateView(Mapping):
    """Read-only union of the per-module optimizers' ``state`` dicts (looking a key up never inserts it)."""

    def __init__(self, states: Sequence[Mapping]) -> None:
        self._states = states

    def __getitem__(self, key: Any) -> Any:
        for s in self._states:
            if key in s:
                return s[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        for s in self._states:
            yield from s

    def __len__(self) -> int:
        return sum(len(s) for s in self._states)


class ModuleOptimizers(torch.optim.Optimizer):
    """One optimizer per greedy module, presented as a single ``torch.optim.Optimizer``.

    ``param_groups`` is the concatenation of the modules' groups — the *same* dict objects — so an LR scheduler
    attached to this wrapper sets the learning rate of every module's optimizer, and ``step``/``zero_grad``
    delegate to each. ``state_dict()`` is ``{"modules": [opt_j.state_dict(), ...]}``, so it round-trips
    exactly through ``load_state_dict`` (after which the shared groups are re-linked, since torch's
    ``load_state_dict`` replaces the group dicts). A module without trainable parameters has no optimizer.

    Each module steps its own optimizer (``anytrain.greedy.module_step``), at its own moment in the step, through
    :meth:`module` — a view whose ``step()`` is this wrapper's public ``step(module=j)``. So an LR scheduler
    attached to the wrapper sees the wrapper stepped before it steps (torch checks this on the scheduler's first
    step) without anything here touching torch's private state. In the multi-process runner each rank builds
    only its own module's optimizer, which is what keeps the single-process and the multi-process runs
    identical step for step.

    Args:
        optimizers: one optimizer per module, in module order (``None`` for a parameter-free module).
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer | None]) -> None:
        opts = list(optimizers)
        present = [o for o in opts if o is not None]
        if not present:
            raise ValueError("ModuleOptimizers needs at least one module with trainable parameters")
        seen: set[int] = set()
        params: list[Tensor] = []
        for o in present:
            for g in o.param_groups:
                for p in g["params"]:
                    if id(p) in seen:
                        raise ValueError("a parameter belongs to two module optimizers")
                    seen.add(id(p))
                    params.append(p)
        super().__init__([{"params": params}], dict(present[0].defaults))
        self.optimizers = opts
        self._views = [None if o is None else ModuleStepper(self, j) for j, o in enumerate(opts)]
        self._link()

    def _link(self) -> None:
        self.param_groups = [g for o in self.optimizers if o is not None for g in o.param_groups]
        self.state = _StateView([o.state for o in self.optimizers if o is not None])  # type: ignore[assignment]

    def add_param_group(self, param_group: dict[str, Any], module: int = -1) -> None:
        """Add a group to module ``module``'s optimizer (the last module by default)."""
        if not hasattr(self, "optimizers"):  # called by Optimizer.__init__ while the wrapper is being built
            super().add_param_group(param_group)
            return
        opt = self.optimizers[module]
        if opt is None:
            raise ValueError(f"module {module} has no optimizer")
        opt.add_param_group(param_group)
        self._link()

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None, *, module: int | None = None
    ) -> float | None:
        """Step every module's optimizer, or only module ``module``'s (what :meth:`module`'s view calls)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if module is not None:
            opt = self.optimizers[module]
            if opt is None:
                raise ValueError(f"module {module} has no optimizer")
            opt.step()
            return loss
        for o in self.optimizers:
            if o is not None:
                o.step()
        return loss

    def module(self, j: int) -> ModuleStepper | None:
        """Module ``j``'s optimizer as the greedy procedures use it (``None`` for a parameter-free module): its
        own groups and ``zero_grad``, and a ``step()`` that goes through this wrapper's ``step(module=j)``."""
        return self._views[j]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            if o is not None:
                o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"modules": [None if o is None else o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        mods = state_dict.get("modules") if isinstance(state_dict, dict) else None
        if not isinstance(mods, list) or len(mods) != len(self.optimizers):
            n = len(mods) if isinstance(mods, list) else "no"
            raise ValueError(f"optimizer state has {n} modules, expected {len(self.optimizers)}")
        for j, (o, s) in enumerate(zip(self.optimizers, mods)):
            if (o is None) != (s is None):
                raise ValueError(f"optimizer state of module {j} does not match (parameter-free vs not)")
            if o is not None:
                o.load_state_dict(s)
        self._link()

    def epoch_metrics(self) -> dict[str, float]:
        """Per-module ``epoch_metrics`` of the inner optimizers (if they have any), keyed ``m{j}/name``."""
        out: dict[str, float] = {}
        for j, o in enumerate(self.optimizers):
            fn = getattr(o, "epoch_metrics", None)
            if callable(fn):
                out.update({f"m{j}/{k}": float(v) for k, v in fn().items()})
        return out

    def __repr__(self) -> str:
        inner = ", ".join(type(o).__name__ if o is not None else "None" for o in self.optimizers)
        return f"ModuleOptimizers([{inner}])"


class ModuleStepper:
    """One module's optimizer seen through its :class:`ModuleOptimizers` (``ModuleOptimizers.module(j)``):
    ``param_groups``, ``state`` and ``zero_grad`` are the module optimizer's own; ``step`` calls the wrapper's
    public ``step(module=j)``, so whatever watches the wrapper's ``step`` (an LR scheduler) sees the step."""

    def __init__(self, owner: ModuleOptimizers, j: int) -> None:
        self.owner, self.index = owner, j

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        opt = self.owner.optimizers[self.index]
        assert opt is not None
        return opt

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        return self.owner.step(closure, module=self.index)


def build_module_optimizers(
    net: StagedNet, partition: Partition, factory: Callable[..., torch.optim.Optimizer]
) -> ModuleOptimizers:
    """``factory(net, params_j)`` for each module ``j`` (``None`` where a module has no trainable parameters)."""
    opts = []
    for stages in partition:
        params = module_parameters(net, stages)
        opts.append(factory(net, params) if params else None)
    return ModuleOptimizers(opts)


__all__ = [
    "ModuleOptimizers",
    "ModuleStepper",
    "Partition",
    "build_module_optimizers",
    "module_forward",
    "module_parameters",
    "partition_stages",
]
