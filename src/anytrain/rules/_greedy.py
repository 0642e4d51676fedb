"""Decoupled and sequential greedy learning as gradient rules (Belilovsky, Eickenberg & Oyallon, ICML 2020).

``dgl``: every module steps on every batch from its own exit's loss; the state is detached at each module
boundary so no gradient crosses it. ``sgl``: the modules are trained one after the other, each for its share of
the epochs, the earlier ones frozen. Both build one optimizer per module (``ModuleOptimizers``), so any
optimizer of ``anytrain.optim`` composes with them (DGL + curvature, DGL + SLBI).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from anytrain.nets.modules import (
    Partition,
    build_module_optimizers,
    decoupled_forward,
    module_forward,
    partition_stages,
)
from anytrain.nets.staged import require_staged
from anytrain.rules._base import GradientRule, OptimizerFactory, Reduce, check_losses_for
from anytrain.rules._pergrad import ExitPartition


class _Greedy(GradientRule):
    def __init__(self, modules: int | Sequence[int] | None = None) -> None:
        if modules is not None and not isinstance(modules, int):
            modules = [int(m) for m in modules]
        self.modules = modules
        self.partition: Partition | None = None
        self._forwarded = False  # set by forward, consumed by backward: a bypassed forward is an error

    def needs_forward(self) -> str | None:
        return (
            f"{self.name} cuts the gradient between modules inside its own forward: call rule.forward(net, x) and "
            "rule.backward(net, losses) on an anytrain.nets.StagedNet"
        )

    def combine(
        self,
        losses: list[Tensor],
        part: ExitPartition | None,
        *,
        net: nn.Module | None = None,
        reduce: Reduce | None = None,
    ) -> dict[str, Tensor]:
        raise ValueError(f"rule {self.name!r} cannot work from losses alone: {self.needs_forward()}")

    def bind(self, net: nn.Module) -> None:
        staged = require_staged(net, self.name)
        self.partition = partition_stages(staged.num_exits, self.modules)

    def _part(self, net: nn.Module) -> Partition:
        if self.partition is None:
            self.bind(net)
        assert self.partition is not None
        return self.partition

    def _check_backward(self, net: nn.Module, losses: Sequence[Tensor]) -> Tensor:
        """Validate ``backward(net, losses)``: a staged net, one loss per exit, after this rule's forward."""
        check_losses_for(net, losses, self)
        require_staged(net, self.name)
        forwarded, self._forwarded = self._forwarded, False
        if not forwarded:
            raise ValueError(
                f"{self.name}: the losses must come from rule.forward(net, x) (it detaches between modules); "
                "net(x) would silently train end to end"
            )
        return torch.stack(list(losses))

    def make_optimizer(self, net: nn.Module, factory: OptimizerFactory) -> torch.optim.Optimizer:
        return build_module_optimizers(require_staged(net, self.name), self._part(net), factory)

    def extra_repr(self) -> str:
        return f"modules={self.modules}"


class DGL(_Greedy):
    """Decoupled greedy learning (synchronous): all modules step on every batch.

    For module ``j`` with stages ``a_j..b_j``, input ``x_{j-1}`` (detached) and training exit ``b_j``::

        x_j = sg(f_j(x_{j-1}))
        g_j = ∇_{θ_j} L_{b_j}(x_{j-1})          (+ probe heads of inner exits, on detached features)
        θ_j ← opt_j(θ_j, g_j)                    one optimizer instance per module

    Because of the stop-gradients, one backward pass of ``Σ_k L_k`` yields exactly these per-module
    gradients. With one module (``modules=1``) the trunk receives plain backprop of the last exit's loss.

    Args:
        modules: ``None`` (one module per stage), an int (that many modules, stages split evenly) or a list
            of stages per module.

    Reference: E. Belilovsky, M. Eickenberg, E. Oyallon. Decoupled Greedy Learning of CNNs. ICML 2020.
    """

    name = "dgl"

    def forward(self, net: nn.Module, x: Tensor) -> list[Tensor]:
        out = decoupled_forward(require_staged(net, self.name), self._part(net), x)
        self._forwarded = True
        return out

    def backward(self, net: nn.Module, losses: Sequence[Tensor]) -> dict[str, Tensor]:
        vec = self._check_backward(net, losses)
        # The graph is cut at every module boundary, so this single backward gives each module the gradient
        # of its own exits' losses only.
        vec.sum().backward()
        part = self._part(net)
        return {f"loss_m{j}": vec[stages[-1]].detach() for j, stages in enumerate(part)}


class SGL(_Greedy):
    """Sequential greedy learning: module ``j`` trains alone for its share of the epochs, then is frozen.

    During module ``j``'s phase, modules ``< j`` run under ``torch.no_grad`` in eval mode (batch-norm uses its
    running statistics and stops updating them, dropout is off: a frozen module is a fixed function, so the
    input distribution of module ``j`` is stationary); module ``j`` trains on its exit's loss like a DGL module;
    modules ``> j`` are not run at all — their logits are returned as zeros (uniform prediction, loss
    ``log C``) so the trainer still sees one loss per exit. Evaluation runs the whole network as usual.

    Phases: by default the epochs are split evenly, the last ``epochs mod M`` modules getting one more epoch.
    ``epochs_per_module`` sets them explicitly; epochs past their sum keep training the last module.

    The learning-rate schedule is the trainer's, over the whole run (it is not restarted per phase); use a
    constant schedule, or per-phase schedules in your own loop, if each module should see the full schedule.
    """

    name = "sgl"

    def __init__(
        self, modules: int | Sequence[int] | None = None, epochs_per_module: Sequence[int] | None = None
    ) -> None:
        super().__init__(modules)
        if epochs_per_module is not None:
            epochs_per_module = [int(e) for e in epochs_per_module]
            if any(e < 0 for e in epochs_per_module):
                raise ValueError(f"epochs_per_module must be non-negative, got {epochs_per_module}")
        self.epochs_per_module = epochs_per_module
        self.active = 0
        self.epoch = 0

    def phases(self, epochs: int, num_modules: int) -> list[int]:
        """Epochs of each module's phase."""
        if self.epochs_per_module is not None:
            if len(self.epochs_per_module) != num_modules:
                raise ValueError(
                    f"epochs_per_module has {len(self.epochs_per_module)} entries for {num_modules} modules"
                )
            if sum(self.epochs_per_module) > epochs:
                raise ValueError(
                    f"epochs_per_module sums to {sum(self.epochs_per_module)} but the run has {epochs} epochs"
                )
            return list(self.epochs_per_module)
        if epochs < num_modules:
            raise ValueError(f"sgl needs at least one epoch per module: {epochs} epochs for {num_modules} modules")
        q, r = divmod(epochs, num_modules)
        return [q + (1 if j >= num_modules - r else 0) for j in range(num_modules)]

    def module_at(self, epoch: int, epochs: int, num_modules: int) -> int:
        acc = 0
        for j, n in enumerate(self.phases(epochs, num_modules)):
            acc += n
            if epoch < acc:
                return j
        return num_modules - 1

    def bind(self, net: nn.Module) -> None:
        super().bind(net)
        self.active = min(self.active, len(self._part(net)) - 1)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if self.partition is None:
            raise ValueError("sgl: bind(net) must be called before training")
        self.epoch = int(epoch)
        self.active = self.module_at(int(epoch), int(epochs), len(self.partition))

    def forward(self, module: nn.Module, x: Tensor) -> list[Tensor]:
        net = require_staged(module, self.name)
        part = self._part(net)
        logits: list[Tensor] = []
        state: Any = x
        with torch.no_grad():
            for stages in part[: self.active]:
                for k in stages:
                    net.stages[k].eval()
                    net.exits[k].eval()
                state, lg = module_forward(net, stages, state)
                logits += lg
        state, lg = module_forward(net, part[self.active], state)
        logits += lg
        later = sum(len(s) for s in part[self.active + 1 :])
        if later:
            z = torch.zeros_like(lg[-1].detach())
            logits += [z] * later
        self._forwarded = True
        return logits

    def backward(self, net: nn.Module, losses: Sequence[Tensor]) -> dict[str, Tensor]:
        vec = self._check_backward(net, losses)
        stages = self._part(net)[self.active]
        vec[stages[0] : stages[-1] + 1].sum().backward()
        return {"loss_active": vec[stages[-1]].detach()}

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = int(state["active"])
        self.epoch = int(state["epoch"])

    def extra_repr(self) -> str:
        return f"modules={self.modules}, epochs_per_module={self.epochs_per_module}"


__all__ = ["DGL", "SGL"]
