"""The trainer's optimisation step at the hardware's speed: mixed precision, loss scaling, micro-batches,
``torch.compile`` and channels-last memory (``train.precision``, ``train.compile``, ``train.channels_last``,
``train.accumulate``).

Precision (``fp32 | bf16 | fp16``): the forward passes and the losses run under ``torch.autocast`` to the
chosen dtype; parameters, gradients and optimizer state stay float32. ``fp16`` adds a ``torch.amp.GradScaler``:
the rules backpropagate ``s × loss`` and leave ``s × gradient`` in ``.grad`` (``anytrain.rules`` explains how
each kind of rule keeps its own arithmetic on unscaled values), the scaler unscales before any optimizer
reads ``.grad`` and skips the step, for every optimizer, when a gradient is not finite: that is normal while
the scale settles, so under ``fp16`` such a step is counted (``amp/skipped_steps`` in ``history.json``) rather
than stopping the run. ``CurvatureCorrected`` is told the scale, since its output-gradient statistics see scaled
gradients (``Ĝ`` is divided by ``s²``), and drops the statistics of a skipped step. Reading whether a step was
skipped is one host synchronisation per step under ``fp16`` (``GradScaler.step`` makes it too); ``bf16`` needs
no scaler and no synchronisation. Decoupled procedures (DGL, SGL) get one scaler per module (see
``anytrain.greedy.module_step``).

Micro-batches (``accumulate: N``): each batch of ``data.batch_size`` is split into ``N`` equal micro-batches
whose gradients add up before one optimizer step, so the step equals the one on the whole batch (to rounding)
wherever that is true: loss weightings with constant weights (joint, weighted, SDN, gradient equilibrium) by
linearity; OSGD (exact and amortized) and TorchJD's aggregators by summing each exit's gradients over the
micro-batches and combining once; DGL and SGL because every module's gradient is a mean over its inputs, all
computed before any module steps; SGD, Adam and SLBI read only the step's gradient; ``CurvatureCorrected`` is
switched to ``micro_batches=N`` so its Kronecker factors are those of the whole batch. AdaLoss is refused: its
weights are updated from the whole batch's losses before the backward. Batch norm differs: each micro-batch is
normalised by its own mean and variance, and the running statistics take ``N`` updates instead of one.

Compile (``compile: true``): each stage and each exit head is compiled on its own (``nn.Module.compile``, in
place: parameter names and checkpoints are unchanged), so the stage outputs between them stay ordinary tensors:
the per-exit backward passes, amortized OSGD's gradient-scaling nodes, gradient equilibrium's and DGL's detach
work as in eager mode. Graph breaks and recompilations are reported in one line after the first epoch
(:func:`compile_report`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from anytrain.config import TrainConfig
from anytrain.greedy import GreedyProcedure, ModuleOptimizers
from anytrain.nets import StagedNet
from anytrain.optim.curvature import CurvatureCorrected
from anytrain.registry import ConfigError
from anytrain.rules import GradientRule
from anytrain.train import distributed as dp

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` (``None``: float32, no autocast)."""
    if precision not in DTYPES:
        raise ConfigError(f"train.precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    return DTYPES[precision]


def check_precision(precision: str, device: torch.device) -> None:
    """One-line ``ConfigError`` when ``device`` cannot run ``precision`` (a tiny autocast matmul and its backward
    are tried on it)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision {precision}: {torch.cuda.get_device_name(device)} has no bfloat16")
    try:
        if not torch.amp.is_autocast_available(device.type):
            raise RuntimeError(f"no autocast on {device.type}")
        w = torch.ones(4, 4, device=device, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns (and falls back to float32) for an unsupported dtype
            with torch.autocast(device.type, dtype=dtype):
                out = w @ w
        if out.dtype != dtype:
            raise RuntimeError(f"autocast gave {out.dtype}")
        out.float().sum().backward()
    except (RuntimeError, UserWarning) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConfigError(f"train.precision {precision} is not available on {device}: {first}") from None


def check_compiler(device: torch.device) -> None:
    """One-line ``ConfigError`` when ``torch.compile`` does not work here (a tiny function is compiled and run
    on ``device``; on CPU this needs a C++ compiler)."""
    import torch._dynamo

    def probe(t: Tensor) -> Tensor:
        return (t * 2.0).relu().sum()

    try:
        fn = torch.compile(probe)
        x = torch.ones(8, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch's own, from inside its toolchain
            value = float(fn(x))
        if value != 16.0:
            raise RuntimeError("the compiled probe returned a wrong value")
    except Exception as e:  # any failure of the toolchain (missing compiler, unsupported torch build, ...)
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConfigError(f"train.compile: torch.compile does not work on {device} here: {first}") from None
    finally:
        torch._dynamo.reset()


def check_setup(t: TrainConfig, device: torch.device, net: StagedNet, rule: Any, batch_size: int) -> None:
    """Every speed option checked against the run before anything is written (one-line ``ConfigError``)."""
    check_precision(t.precision, device)
    if t.accumulate > 1 and batch_size % t.accumulate:
        raise ConfigError(
            f"train.accumulate {t.accumulate} must divide data.batch_size {batch_size} (equal micro-batches)"
        )
    if t.accumulate > 1:
        why = rule.accumulate_error() if isinstance(rule, GradientRule) else None
        if why is not None:
            raise ConfigError(f"train.accumulate {t.accumulate}: rule {rule.name!r} {why}")
    if t.channels_last and not any(isinstance(m, nn.Conv2d) for m in net.modules()):
        raise ConfigError("train.channels_last is for 2-D convolutional nets; this model has no Conv2d layer")
    if t.compile:
        check_compiler(device)


def prepare_net(net: StagedNet, t: TrainConfig) -> None:
    """Channels-last memory and ``torch.compile`` (each stage and head in place) as ``t`` asks."""
    if t.channels_last:
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if t.compile:
        # ``forward`` of each stage and head replaced by its compiled version: parameter names, hooks and
        # checkpoints are those of the eager module. (``nn.Module.compile`` compiles ``_call_impl``, a frame that
        # dynamo skips as torch-internal in this torch: it ran eagerly, with no graph captured.)
        # Donated buffers (AOTAutograd frees a compiled backward's saved tensors as it runs) are incompatible
        # with ``retain_graph=True``, which the per-exit rules (OSGD, TorchJD, AdaLoss...) need: exit k's backward
        # runs through stages 0..k and exit k+1's through them again. Turned off for this process.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        for m in [*net.stages, *net.exits]:
            m.forward = torch.compile(m.forward)  # type: ignore[method-assign]


def compile_report() -> str:
    """One line: graphs compiled so far (a stage compiled again for eval mode or another batch size counts once
    more) and graph breaks, with the first reason (each break is a fallback to eager for part of a forward)."""
    from torch._dynamo.utils import counters

    graphs = int(counters["stats"].get("unique_graphs", 0))
    breaks = sum(counters["graph_break"].values())
    first = next(iter(counters["graph_break"]), "")
    why = f" (first: {str(first).splitlines()[0][:100]})" if breaks else ""
    return f"compile: {graphs} graph(s) compiled, {breaks} graph break(s){why}"


def _curvature(opt: Any) -> Iterator[CurvatureCorrected]:
    opts = opt.optimizers if isinstance(opt, ModuleOptimizers) else [opt]
    yield from (o for o in opts if isinstance(o, CurvatureCorrected))


class StepRunner:
    """One optimisation step of the trainer (``Trainer.train_step``) under ``train.precision`` and
    ``train.accumulate``; keeps the loss scalers (saved in the checkpoint) and the count of skipped steps.

    In ``fp32`` with ``accumulate: 1`` it runs exactly the plain step: forward, the rule's backward, the
    optimizer's step."""

    def __init__(
        self,
        t: TrainConfig,
        net: StagedNet,
        rule: GradientRule | GreedyProcedure,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        device: torch.device,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.net, self.rule, self.optimizer, self.loss_fn, self.reduce = net, rule, optimizer, loss_fn, reduce
        self.dtype = autocast_dtype(t.precision)
        self.device = device
        self.accumulate = int(t.accumulate)
        self.channels_last = bool(t.channels_last)
        fp16 = self.dtype == torch.float16
        n_scalers = len(optimizer.optimizers) if isinstance(optimizer, ModuleOptimizers) else 1
        self.scalers = [torch.amp.GradScaler(device.type) for _ in range(n_scalers)] if fp16 else []
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # steps skipped for non-finite gradients
        self._one = torch.ones((), device=device)
        for opt in _curvature(optimizer):
            opt.micro_batches = self.accumulate  # its factors are those of the whole batch

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _input(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """One step on the batch ``(x, y)``: the per-exit losses (detached, mean over micro-batches), the rule's
        stats, and a device flag that every gradient was finite (``None`` under ``fp16``, whose non-finite steps
        are skipped and counted instead)."""
        x = self._input(x)
        if isinstance(self.rule, GreedyProcedure):
            assert isinstance(self.optimizer, ModuleOptimizers)
            losses, greedy_stats, ok = self.rule.step(
                self.net, x, y, self.optimizer, loss_fn=self.loss_fn, reduce=self.reduce,
                autocast=self.dtype, scalers=self.scalers or None, accumulate=self.accumulate,
            )  # fmt: skip
            if self.scalers and ok is not None:
                self.skipped += (~ok).long()
                ok = None
            return losses, greedy_stats, ok
        opt, rule, n = self.optimizer, self.rule, self.accumulate
        opt.zero_grad(set_to_none=True)
        scaler = self.scalers[0] if self.scalers else None
        scale = scaler.scale(self._one) if scaler is not None else None
        for c in _curvature(opt):
            c.set_loss_scale(scale)
        chunks = [(x, y)] if n == 1 else list(zip(x.chunk(n), y.chunk(n)))
        if n > 1 and x.shape[0] % n:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {n} equal micro-batches")
        total: Tensor | None = None
        stats: dict[str, Tensor] = {}
        for i, (xi, yi) in enumerate(chunks):
            with self.autocast():
                per_exit = [self.loss_fn(z, yi).float() for z in rule.forward(self.net, xi)]
            stats = rule.backward(self.net, per_exit, reduce=self.reduce, scale=scale, micro=(i, n))
            losses = torch.stack([l.detach() for l in per_exit])
            total = losses if total is None else total + losses
        assert total is not None
        if scaler is None:
            ok = dp.grads_finite(self.params)  # one fused pass (L1 norms), no host sync
            opt.step()
            return total / n if n > 1 else total, stats, ok
        scaler.unscale_(opt)  # from here on .grad is the true gradient: clipping and optimizers read this
        ok = dp.grads_finite(self.params)
        if ok is not None:
            self.skipped += (~ok).long()
            if any(True for _ in _curvature(opt)) and not bool(ok):
                for c in _curvature(opt):
                    c.discard_captures()
        scaler.step(opt)  # skipped when a gradient is not finite
        scaler.update()
        return total / n if n > 1 else total, stats, None

    def scheduler_step(self, scheduler: Any) -> None:
        """``scheduler.step()``; under ``fp16`` a first optimizer step skipped by the scaler is expected, so
        torch's warning about a scheduler stepping before its optimizer is silenced there."""
        if not self.scalers:
            scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before", UserWarning)
            scheduler.step()

    # ---- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"scalers": [s.state_dict() for s in self.scalers], "skipped": self.skipped.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scalers = state.get("scalers", [])
        if len(scalers) != len(self.scalers):
            raise ValueError(f"checkpoint holds {len(scalers)} loss scaler(s), this run has {len(self.scalers)}")
        for s, sd in zip(self.scalers, scalers):
            s.load_state_dict(sd)
        if "skipped" in state:
            self.skipped = state["skipped"].to(self.device)

    def epoch_metrics(self) -> dict[str, float]:
        """Logged once per epoch (``amp/…`` in ``history.json``): skipped steps so far and the loss scale."""
        if not self.scalers:
            return {}
        out = {"skipped_steps": float(self.skipped)}
        for j, s in enumerate(self.scalers):
            out["loss_scale" if len(self.scalers) == 1 else f"loss_scale_m{j}"] = float(s.get_scale())
        return out
