"""Decoupled and sequential greedy learning as procedures over (blocks, heads) (Belilovsky et al., ICML 2020).

Everything here is built from one piece, :func:`module_step`: module ``j`` (stages ``a_j..b_j`` and their exit
heads) takes a detached input, computes the losses of its exits, backpropagates them inside itself and steps its
own optimizer::

    x_j = sg(f_j(x_{j-1}))
    g_j = ∇_{θ_j} Σ_{k=a_j..b_j} L_k          (inner exits are probes on detached features)
    θ_j ← opt_j(θ_j, g_j)                     one optimizer instance per module

The synchronous procedures below, asynchronous DGL (``anytrain.greedy.async_dgl``) and the multi-process runner
(``anytrain.train.parallel``) all call it, so the three cannot drift apart.

These are not gradient rules: they run the forward pass themselves and step one optimizer per module, so they
take ``(x, y)`` and the per-module optimizers, never losses (your own blocks and heads: ``StagedNet(blocks,
heads)``, no copies; see :class:`DGL`). ``rule: {name: dgl}`` / ``{name: sgl}`` in a config selects them
(importing this package registers the names).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anytrain.nets.modules import ModuleOptimizers, ModuleStepper, Partition, module_forward, partition_stages
from anytrain.nets.staged import StagedNet, detach_state, require_staged
from anytrain.rules._pergrad import average_grads_, grads_finite

LossFn = Callable[[Tensor, Any], Tensor] | Sequence[Callable[[Tensor, Any], Tensor]]
Reduce = Callable[[Tensor], Tensor]
Optimizers = ModuleOptimizers | Sequence[torch.optim.Optimizer | None]
Step = tuple[Tensor, dict[str, Tensor], Tensor | None]  # per-exit losses, stats, all gradients finite


class Amp(NamedTuple):
    """Mixed precision and micro-batches of one procedure step (see :func:`module_step`)."""

    autocast: torch.dtype | None = None  #: forward and losses under ``torch.autocast`` to this dtype
    scalers: Sequence[torch.amp.GradScaler] | None = None  #: one float16 loss scaler per module
    micro: tuple[int, int] = (0, 1)  #: micro-batch ``i`` of ``n`` of one step

    def module(self, j: int) -> dict[str, Any]:
        """The keyword arguments of :func:`module_step` for module ``j``."""
        return {
            "autocast": self.autocast,
            "scaler": None if self.scalers is None else self.scalers[j],
            "micro": self.micro,
        }


class ModuleStep(NamedTuple):
    """What :func:`module_step` returns; tensors stay on the device (no host synchronisation)."""

    output: Any  #: the module's output state, detached: the next module's input
    logits: list[Tensor]  #: the logits of the module's exits (detached), earliest first
    losses: Tensor  #: the losses of the module's exits (detached), earliest first
    grads_finite: Tensor | None  #: every gradient of the step was finite (``None``: no optimizer)


def module_step(
    net: StagedNet,
    stages: Sequence[int],
    x: Any,
    y: Tensor,
    optimizer: torch.optim.Optimizer | ModuleStepper | None,
    *,
    loss_fn: LossFn = F.cross_entropy,
    reduce: Reduce | None = None,
    emit: Callable[[Any], None] | None = None,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    micro: tuple[int, int] = (0, 1),
) -> ModuleStep:
    """One step of one greedy module: forward its stages on the detached input ``x``, the losses of its exits,
    backward, then its optimizer's step.

    Args:
        net: the staged network; ``stages`` are this module's stage indices (``partition_stages``).
        x: the module's input (a data batch, or the previous module's output); it is detached here.
        y: the labels.
        optimizer: this module's optimizer (over ``module_parameters(net, stages)``), or its view
            ``ModuleOptimizers.module(j)``; ``None`` for a module without trainable parameters (it only forwards).
        loss_fn: ``loss_fn(logits, y)``, a scalar (or a list, one such function per exit); the module minimises
            the sum over its exits.
        reduce: data parallelism: averages a flat tensor over the ranks in place; the module's gradients are
            averaged before its step.
        emit: called with the detached output right after the forward pass, before the backward pass (the
            multi-process runner sends it on while this module computes its update).
        autocast: run the forward pass and the losses under ``torch.autocast`` to this dtype.
        scaler: float16 loss scaling: this module's ``GradScaler`` (one per module: no gradient crosses modules,
            so each keeps the scale its own gradients allow); it unscales before the optimizer reads ``.grad``,
            skips the module's step when its gradients are not finite, and updates its scale.
        micro: ``(i, n)``: micro-batch ``i`` of ``n`` of one step (gradient accumulation): the gradients of the
            ``n`` micro-batch mean losses, each divided by ``n``, add up; the optimizer steps after the last.

    Returns:
        :class:`ModuleStep`: the detached output, logits and losses, and a device-side flag that every gradient
        was finite.
    """
    i, n = micro
    if optimizer is not None and i == 0:
        optimizer.zero_grad(set_to_none=True)
    x = detach_state(x)
    with torch.autocast(_device_type(x), dtype=autocast or torch.float32, enabled=autocast is not None):
        out, logits = module_forward(net, stages, x)
        losses = torch.stack([criterion(loss_fn, k)(z, y).float() for k, z in zip(stages, logits)])
    out = detach_state(out)
    if autocast is not None:  # the boundary keeps the input's dtype (float32), whatever autocast computed in
        out = _cast_like(out, x)
    if emit is not None:
        emit(out)
    finite = None
    if optimizer is not None:
        seed = losses.sum() if n == 1 else losses.sum() / n
        if scaler is not None:
            seed = scaler.scale(seed)
            if hasattr(optimizer, "set_loss_scale"):  # curvature statistics see the scaled output gradients
                optimizer.set_loss_scale(scaler.scale(torch.ones((), device=seed.device)))
        seed.backward()  # the graph starts at the detached input: only this module's parameters
        if i < n - 1:
            return ModuleStep(out, [z.detach() for z in logits], losses.detach(), None)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if reduce is not None:  # before unscaling: every rank then sees the same non-finite values and skips
            average_grads_(params, reduce)
        if scaler is None:
            finite = grads_finite(params)
            optimizer.step()
        else:
            # GradScaler needs only param_groups, state and step: a ModuleStepper is used as an optimizer
            opt = cast(torch.optim.Optimizer, optimizer)
            scaler.unscale_(opt)
            finite = grads_finite(params)
            if hasattr(optimizer, "discard_captures") and finite is not None and not bool(finite):
                optimizer.discard_captures()  # curvature statistics of a skipped step would hold infinities
            scaler.step(opt)  # skips the step when the unscaled gradients are not finite (a host sync)
            scaler.update()
    return ModuleStep(out, [z.detach() for z in logits], losses.detach(), finite)


def _cast_like(state: Any, like: Any) -> Any:
    """``state`` with its floating-point tensors in the dtype of ``like``'s first floating-point tensor."""
    ref = [t for t in torch.utils._pytree.tree_leaves(like) if isinstance(t, Tensor) and t.is_floating_point()]
    if not ref:
        return state
    dtype = ref[0].dtype
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, state
    )


def _device_type(state: Any) -> str:
    """The device type of the first tensor of a state pytree (for ``torch.autocast``)."""
    if isinstance(state, Tensor):
        return state.device.type
    leaves = [t for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, Tensor)]
    return leaves[0].device.type if leaves else "cpu"


def criterion(loss_fn: LossFn, k: int) -> Callable[[Tensor, Any], Tensor]:
    """The loss function of exit ``k``: ``loss_fn`` itself, or its entry ``k`` when it is a list."""
    return loss_fn[k] if isinstance(loss_fn, Sequence) else loss_fn


def _all_finite(flags: Sequence[Tensor | None]) -> Tensor | None:
    present = [f for f in flags if f is not None]
    return torch.stack(present).all() if present else None


class GreedyProcedure(ABC):
    """A training procedure over the modules of a staged network: one optimizer per module, steps by
    :func:`module_step`. :meth:`step` checks its arguments; subclasses implement :meth:`_step`, the order in
    which the modules step."""

    name = "greedy"

    def __init__(self, modules: int | Sequence[int] | None = None) -> None:
        if modules is not None and not isinstance(modules, int):
            modules = [int(m) for m in modules]
        self.modules = modules
        self.partition: Partition | None = None

    def bind(self, net: nn.Module) -> Partition:
        """Check ``net`` (a :class:`~anytrain.nets.StagedNet`) and return its partition into modules."""
        staged = require_staged(net, self.name)
        self.partition = partition_stages(staged.num_exits, self.modules)
        return self.partition

    def step(
        self,
        net: nn.Module,
        x: Tensor,
        y: Tensor,
        optimizers: Optimizers,
        *,
        loss_fn: LossFn = F.cross_entropy,
        reduce: Reduce | None = None,
        autocast: torch.dtype | None = None,
        scalers: Sequence[torch.amp.GradScaler] | None = None,
        accumulate: int = 1,
    ) -> Step:
        """One training step on the batch ``(x, y)``: returns the per-exit losses (a detached K-vector), stats to
        log and a device-side flag that every gradient was finite. Nothing here synchronises with the host
        (except a float16 scaler's step, which must read whether the gradients were finite).

        ``optimizers``: one per module (``build_module_optimizers``); ``loss_fn`` and ``reduce`` as in
        :func:`module_step`; ``autocast``: forward passes under ``torch.autocast`` to this dtype; ``scalers``: one
        ``torch.amp.GradScaler`` per module (float16); ``accumulate``: split the batch into that many equal
        micro-batches whose gradients add up before each module's step. That equals the step on the whole batch:
        module ``j`` learns from its own exits' losses on inputs computed before any module stepped, so its
        gradient is the mean of its micro-batch gradients (not with batch norm, which normalises each
        micro-batch by its own statistics)."""
        staged = require_staged(net, self.name)
        part = self.partition if self.partition is not None else self.bind(staged)
        opts: list[Any]
        if isinstance(optimizers, ModuleOptimizers):  # each module steps through the wrapper's public step
            opts = [optimizers.module(j) for j in range(len(optimizers.optimizers))]
        else:
            opts = list(optimizers)
        if len(opts) != len(part):
            raise ValueError(
                f"{self.name}: {len(opts)} optimizers for {len(part)} modules; build them with "
                "anytrain.greedy.build_module_optimizers(net, procedure.bind(net), factory)"
            )
        if scalers is not None and len(scalers) != len(part):
            raise ValueError(f"{self.name}: {len(scalers)} loss scalers for {len(part)} modules (one per module)")
        n = int(accumulate)
        if n == 1:
            return self._step(staged, part, opts, x, y, loss_fn, reduce, Amp(autocast, scalers))
        if not isinstance(x, Tensor) or x.shape[0] % n:
            raise ValueError(f"{self.name}: a batch of {len(y)} does not split into {n} equal micro-batches")
        steps = [
            self._step(staged, part, opts, xi, yi, loss_fn, reduce, Amp(autocast, scalers, (i, n)))
            for i, (xi, yi) in enumerate(zip(x.chunk(n), y.chunk(n)))
        ]
        losses = torch.stack([s[0] for s in steps]).mean(0)
        return losses, steps[-1][1], steps[-1][2]

    @abstractmethod
    def _step(
        self,
        net: StagedNet,
        part: Partition,
        opts: list[Any],
        x: Any,
        y: Tensor,
        loss_fn: LossFn,
        reduce: Reduce | None,
        amp: Amp,
    ) -> Step:
        """One step of every module that trains now, on checked arguments."""

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Hook for procedures with a schedule over epochs (sequential greedy learning)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def extra_repr(self) -> str:
        return f"modules={self.modules}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class DGL(GreedyProcedure):
    """Decoupled greedy learning (synchronous): every module steps on every batch, from its own exits' losses.

    With one module (``modules=1``) the trunk receives plain backprop of the last exit's loss.

    Args:
        modules: ``None`` (one module per stage), an int (that many modules, stages split evenly) or a list
            of stages per module.

    Example:
        >>> from anytrain.greedy import build_module_optimizers
        >>> from anytrain.nets import StagedNet
        >>> net = StagedNet([nn.Linear(3, 4), nn.Linear(4, 4)], [nn.Linear(4, 2), nn.Linear(4, 2)])
        >>> dgl = DGL()
        >>> opts = build_module_optimizers(net, dgl.bind(net), lambda n, ps: torch.optim.SGD(ps, lr=0.1))
        >>> losses, stats, ok = dgl.step(net, torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]), opts)
        >>> losses.shape, sorted(stats), bool(ok)
        (torch.Size([2]), ['loss_m0', 'loss_m1'], True)

    Reference: E. Belilovsky, M. Eickenberg, E. Oyallon. Decoupled Greedy Learning of CNNs. ICML 2020.
    """

    name = "dgl"

    def _step(
        self,
        net: StagedNet,
        part: Partition,
        opts: list[Any],
        x: Any,
        y: Tensor,
        loss_fn: LossFn,
        reduce: Reduce | None,
        amp: Amp,
    ) -> Step:
        state: Any = x
        steps = []
        for j, (stages, opt) in enumerate(zip(part, opts)):
            s = module_step(net, stages, state, y, opt, loss_fn=loss_fn, reduce=reduce, **amp.module(j))
            state = s.output
            steps.append(s)
        stats = {f"loss_m{j}": s.losses[-1] for j, s in enumerate(steps)}
        return torch.cat([s.losses for s in steps]), stats, _all_finite([s.grads_finite for s in steps])


class SGL(GreedyProcedure):
    """Sequential greedy learning: module ``j`` trains alone for its share of the epochs, then is frozen.

    During module ``j``'s phase, modules ``< j`` run under ``torch.no_grad`` in eval mode (batch-norm uses its
    running statistics and stops updating them, dropout is off: a frozen module is a fixed function, so the
    input distribution of module ``j`` is stationary); module ``j`` makes a :func:`module_step`; modules ``> j``
    are not run at all — their losses are those of zero logits (uniform prediction, ``log C``) so the caller
    still sees one loss per exit. Evaluation runs the whole network as usual.

    Phases: by default the epochs are split evenly, the last ``epochs mod M`` modules getting one more epoch.
    ``epochs_per_module`` sets them explicitly; epochs past their sum keep training the last module. Call
    :meth:`on_epoch_start` at the start of every epoch.

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

    def bind(self, net: nn.Module) -> Partition:
        part = super().bind(net)
        self.active = min(self.active, len(part) - 1)
        return part

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if self.partition is None:
            raise ValueError("sgl: bind(net) must be called before training")
        self.epoch = int(epoch)
        self.active = self.module_at(int(epoch), int(epochs), len(self.partition))

    def _step(
        self,
        net: StagedNet,
        part: Partition,
        opts: list[Any],
        x: Any,
        y: Tensor,
        loss_fn: LossFn,
        reduce: Reduce | None,
        amp: Amp,
    ) -> Step:
        before: list[Tensor] = []
        state: Any = x
        on = amp.autocast is not None
        with torch.no_grad(), torch.autocast(_device_type(x), dtype=amp.autocast or torch.float32, enabled=on):
            for stages in part[: self.active]:  # the frozen modules: fixed functions
                for k in stages:
                    net.stages[k].eval()
                    net.exits[k].eval()
                state, logits = module_forward(net, stages, state)
                before += [criterion(loss_fn, k)(z, y).float() for k, z in zip(stages, logits)]
        s = module_step(
            net,
            part[self.active],
            state,
            y,
            opts[self.active],
            loss_fn=loss_fn,
            reduce=reduce,
            **amp.module(self.active),
        )
        zero = [
            criterion(loss_fn, k)(torch.zeros_like(s.logits[-1]), y).detach()
            for k in range(len(before) + len(s.losses), len(net.exits))
        ]
        return torch.stack([*before, *s.losses, *zero]), {"loss_active": s.losses[-1]}, s.grads_finite

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = int(state["active"])
        self.epoch = int(state["epoch"])

    def extra_repr(self) -> str:
        return f"modules={self.modules}, epochs_per_module={self.epochs_per_module}"


__all__ = ["DGL", "SGL", "Amp", "GreedyProcedure", "ModuleStep", "module_step"]
