"""Curvature-corrected learning: block-diagonal natural gradient with a fractional exponent ``alpha``.

Huh, "Curvature-corrected learning dynamics in deep neural networks" (ICML 2020). For a layer with weight
gradient ``∇W`` (out × in), input second moment ``A = E[a aᵀ]`` (a 1 appended to ``a`` when the layer has a
bias) and output-gradient second moment ``G = E[δ δᵀ]``, the step direction is::

    Δ = (G + λI)^(−α) · ∇W · (A + λI)^(−α)                                            (Huh 2020, eq. 9)

``α = 0`` is gradient descent, ``α = 1`` the block-diagonal natural gradient NGD-d (K-FAC, Martens & Grosse
2015), ``α = ½`` the partially corrected rule that keeps the layers of a deep linear network balanced.

Functional core, in ``_precondition.py`` and re-exported here: ``eig_factor`` (eigenvalues clamped at 0),
``precondition_eig`` (the step above from the eigendecompositions: the damped powers ``damped_power``, which the
optimizer caches, applied by ``kron_apply`` on every step) and ``precondition(grad, A, G, alpha, damping)`` from
the factors themselves. The factor math of each layer type is in ``_kron_layers.py``.

How ``A`` and ``G`` are collected (``CurvatureCorrected``):
    On steps ``t`` with ``t % factor_every == 0`` a forward hook on every preconditioned layer records the
    input statistics ``Σ a aᵀ`` at once (the input itself is not kept) and, for ``G``, registers a tensor hook
    on the layer's output. A tensor hook (not a full backward hook) is used because it also fires under
    ``torch.autograd.grad`` and is unaffected by in-place activations that follow the layer.

    ``curvature="empirical"`` — ``G`` from the training backward pass(es). The loss is assumed to be a mean
    over the batch of per-sample losses, so the per-sample output gradient is ``δ = B · ∂L/∂z``. When a rule
    runs several backward passes through the same forward graph in one step (OSGD: one per exit, DGL
    variants, ...), the output gradients of the passes are **summed before the outer product**: ``G`` is the
    statistic of the combined gradient ``∂(Σ_p L_p)/∂z``, exactly what one backward of the summed loss would
    give — never the sum of per-pass outer products, and nothing is double counted.

    ``curvature="mc_fisher"`` — the Monte-Carlo Fisher: labels ``ŷ ~ softmax(z)`` are sampled from the model
    (its own generator, saved in ``state_dict``) and ``G`` comes from one extra backward of
    ``Σ_exits CE(z_k, ŷ_k)`` taken with ``torch.autograd.grad`` on the recorded layer outputs, so ``.grad`` is
    untouched. The optimizer runs it itself from a forward hook on ``model`` (every logits tensor the model
    returns); a training loop that calls the net in pieces calls ``opt.curvature_backward(logits)`` instead.
    ``curvature="gn_mse"`` — the exact Gauss–Newton factor for ``½‖z − y‖²`` (averaged over the batch): one
    backward per output coordinate, ``G = E_x[Σ_k J_kᵀ J_k]``. On a linear network this is exactly
    ``W_{>l}ᵀ W_{>l}`` and ``A ⊗ G`` is the exact diagonal block of the Gauss–Newton matrix.
    In both sampled modes, a layer whose output did not reach the sampled loss in a capture step (the net was
    called piecewise and nobody called ``curvature_backward``) falls back to the empirical ``G`` of that step;
    ``epoch_metrics()["curv_fallbacks"]`` counts such cases.

    ``micro_batches=K`` (gradient accumulation, each micro-batch loss divided by K): the output gradient of
    a micro-batch is ``∂L/∂z / K`` of the whole-batch loss, so ``δ = K·B·∂L_k/∂z`` and ``Ĝ`` is ``K²`` times
    the mean over the K forward calls — the statistic of the whole batch of K·B.
    ``capture="functional"``: instead of a tensor hook, the forward hook returns the output through an autograd
    function whose backward hands ``B·Σ g gᵀ`` to a preallocated probe leaf (autograd sums it over the passes);
    nothing has Python side effects in the backward, so ``torch.compile`` traces the hooks without graph breaks.
    It is the sum of per-pass statistics, which equals the default only with one backward pass per forward call
    (checked: a pass counter is compared with the forward calls at each factor update).
    Statistics, decompositions and the products of the step run with autocast disabled, in float32 at least.
    Loss scaling (float16 with a ``GradScaler``): the output gradients the hooks see are ``s`` times the true
    ones, so ``set_loss_scale(s)`` (the trainer calls it every step; ``s`` a device tensor) divides ``Ĝ`` by
    ``s²``; a step the scaler skips must call ``discard_captures()`` so that its (non-finite) statistics are
    dropped instead of entering the next step's.

Layers: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (grouped: one Kronecker block per group) and weights tied
between them (one layer at more positions); see ``_kron_layers.py``. Every other module holding a parameter of
the optimizer (norms, embeddings, ``nn.MultiheadAttention``'s packed ``in_proj`` and its ``out_proj``, which it
calls functionally; a weight tied to one of them) takes the plain (momentum, weight-decay) step and is listed,
with the reason, by ``coverage()`` and in one log line at construction; ``strict=True`` raises instead. A covered
layer whose forward hook never fires although its weight gets a gradient (called functionally) is a
``RuntimeError`` naming it at the first factor update. Layers whose weight is not among ``params`` (decoupled
greedy learning gives one optimizer per module) are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anytrain.optim._kron_layers import Capture, KronLayer, OutputGradStat, find_layers, stat
from anytrain.optim._precondition import Eig, damped_inverse, damped_power, eig_factor, kron_apply
from anytrain.optim._precondition import precondition as precondition
from anytrain.optim._precondition import precondition_eig as precondition_eig

__all__ = ["CurvatureCorrected", "eig_factor", "precondition", "precondition_eig"]

logger = logging.getLogger(__name__)
Schedule = float | Callable[[int], float]
CURVATURES = ("empirical", "mc_fisher", "gn_mse")


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------------------------
# the optimizer
# ---------------------------------------------------------------------------------------------------------
class _Powers(NamedTuple):
    """The cached preconditioner of a stack: ``(A + λ_A I)^(−α)`` and ``(G + λ_G I)^(−α)`` of all its blocks."""

    alpha: float
    damping: float
    a: Tensor
    g: Tensor


@dataclass
class _Stack:
    """Layers of one param group whose blocks have equal shape, with their stacked preconditioner and the
    preallocated buffers of the step.

    ``eig_a``, ``eig_g``: the stacked eigendecompositions (``None`` when the powers are Cholesky inverses);
    ``powers``: the damped powers for the ``alpha`` and ``damping`` they were computed with (cached until the
    next decomposition or a change of alpha / damping). ``grads`` and ``steps`` are ``(blocks, out, in [+1])``
    buffers; ``params[i]`` is a weight or bias, ``grad_views[i]`` / ``step_views[i]`` its slot in ``grads`` /
    ``steps`` in the parameter's own shape, so one ``_foreach_copy_`` gathers the gradients and the directions
    need no copy."""

    layers: list[KronLayer]
    eig_a: Eig | None
    eig_g: Eig | None
    powers: _Powers | None
    grads: Tensor
    steps: Tensor
    params: list[Tensor]
    grad_views: list[Tensor]
    step_views: list[Tensor]

    @classmethod
    def build(
        cls, layers: list[KronLayer], eig: tuple[Eig, Eig] | None, powers: _Powers | None, like: Tensor
    ) -> _Stack:
        """Buffers of ``(blocks, out, in [+1])`` blocks in the dtype of the factors (``like``: a stacked A)."""
        blocks = sum(layer.groups for layer in layers)
        n_out, n_in = layers[0].weight.shape[0] // layers[0].groups, like.shape[-1]
        grads = torch.zeros(blocks, n_out, n_in, dtype=like.dtype, device=layers[0].weight.device)
        steps = torch.zeros_like(grads)
        params: list[Tensor] = []
        grad_views: list[Tensor] = []
        step_views: list[Tensor] = []
        i = 0
        for layer in layers:
            params += [layer.weight] if layer.bias is None else [layer.weight, layer.bias]
            grad_views += layer.block_views(grads[i : i + layer.groups])
            step_views += layer.block_views(steps[i : i + layer.groups])
            i += layer.groups
        eig_a, eig_g = eig if eig is not None else (None, None)
        return cls(layers, eig_a, eig_g, powers, grads, steps, params, grad_views, step_views)


def _cat(states: list[dict[str, Any]], key: str, dims: int) -> Tensor:
    """``state[key]`` of several layers stacked along one leading dim (their trailing ``dims`` kept)."""
    return torch.cat([st[key].reshape(-1, *st[key].shape[-dims:]) for st in states])


def _squeeze(t: Tensor) -> Tensor:
    return t[0] if t.shape[0] == 1 else t


def _value(h: Schedule, step: int) -> float:
    return float(h(step)) if callable(h) else float(h)


class CurvatureCorrected(torch.optim.Optimizer):
    r"""Block-diagonal natural gradient with fractional exponent ``alpha`` (Huh, ICML 2020).

    Algorithm, per preconditioned layer ``l`` at step ``t`` (``g = ∇W_l``, bias gradient as last column)::

        if t % T_f == 0:   A ← β A + (1−β) Â_t,   G ← β G + (1−β) Ĝ_t      (first update: A = Â, G = Ĝ)
        if t % T_inv == 0: A = Q_A diag(d_A) Q_Aᵀ,  G = Q_G diag(d_G) Q_Gᵀ    (eigh, d clamped at 0;
                           at α = 1 with constant α and λ: Cholesky inverses of A + λ_A I, G + λ_G I)
        Δ_l = (G + λ_G I)^(−α) g (A + λ_A I)^(−α)                            (λ_A = λ_G = λ, or adaptive)
        ν   = min(1, sqrt(κ / (η² Σ_l ⟨Δ_l, g_l⟩)))                          (KL clip, if κ is set)
        d   = ν Δ + wd · θ;    m ← μ m + d (m = d at t = 0);    θ ← θ − η m

    Other parameters use ``Δ = g`` (plain SGD with the same momentum and weight decay). With ``α = 0`` the
    optimizer equals ``torch.optim.SGD(lr, momentum, weight_decay)`` bit for bit. Which modules are
    preconditioned and why the others are not is logged once and returned by :meth:`coverage`.

    Args:
        model: the module whose ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers are preconditioned.
        lr: step size η.
        alpha: exponent α ≥ 0, float or schedule ``step -> float``.
        damping: λ > 0, float or schedule. With ``adaptive_damping`` it is relative: ``λ_A = λ·tr(A)/dim A``
            and likewise for ``G``, which makes the step invariant (up to the factor ``c^(−α)``) to rescaling
            of either factor and keeps λ meaningful while the factors shrink or grow during training.
        params: the parameters this optimizer owns (default: all of ``model``'s that require grad). Only
            layers whose weight is in ``params`` are preconditioned.
        momentum: μ (heavy ball, as torch.optim.SGD).
        weight_decay: L2 coefficient added after preconditioning.
        factor_decay: β, running-average decay of ``A`` and ``G``.
        factor_every: T_f, steps between factor updates (hooks are live only on those steps).
        inverse_every: T_inv, steps between decompositions.
        curvature: ``"empirical"``, ``"mc_fisher"`` or ``"gn_mse"`` (see the module docstring).
        kl_clip: κ; caps the quadratic KL estimate of the step, ``(ην)² Σ⟨Δ, g⟩ ≤ κ`` (``None``: no cap).
        eigh_dtype: ``"float64"`` to decompose the factors in double precision.
        seed: seed of the generator that samples labels for ``mc_fisher``.
        micro_batches: K, the number of micro-batches (forward + backward of ``loss / K`` each) accumulated
            into ``.grad`` before every ``step()``; the factors are then those of the whole batch of K·B.
        capture: ``"hook"`` (tensor hooks; exact under several backward passes per forward) or
            ``"functional"`` (an autograd function, traceable by ``torch.compile`` without graph breaks;
            one backward pass per forward, ``curvature="empirical"`` only).
        strict: raise ``ValueError`` if any trainable module of ``model`` owned by this optimizer is left to
            plain steps.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = CurvatureCorrected(net, lr=0.1, alpha=0.5, damping=1e-2, factor_every=1, inverse_every=1)
        >>> loss = F.cross_entropy(net(torch.randn(16, 4)), torch.randint(0, 3, (16,)))
        >>> loss.backward(); opt.step()
        >>> sorted(opt.coverage()["preconditioned"])
        ['0', '2']

    References:
        D. Huh, "Curvature-corrected learning dynamics in deep neural networks", ICML 2020.
        J. Martens, R. Grosse, "Optimizing neural networks with Kronecker-factored approximate curvature",
        ICML 2015; R. Grosse, J. Martens, "A Kronecker-factored approximate Fisher matrix for convolution
        layers", ICML 2016.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        alpha: Schedule = 0.5,
        damping: Schedule = 1e-3,
        *,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        factor_every: int = 10,
        inverse_every: int = 100,
        curvature: str = "empirical",
        adaptive_damping: bool = False,
        kl_clip: float | None = None,
        eigh_dtype: str | None = None,
        seed: int = 0,
        micro_batches: int = 1,
        capture: str = "hook",
        strict: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not lr >= 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not callable(alpha) and not float(alpha) >= 0:
            raise ValueError(f"Invalid alpha: {alpha} (need >= 0)")
        if not callable(damping) and not float(damping) > 0:
            raise ValueError(f"Invalid damping: {damping} (need > 0)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if not 0.0 <= factor_decay < 1.0:
            raise ValueError(f"Invalid factor_decay: {factor_decay} (need 0 <= factor_decay < 1)")
        for name, v in (
            ("factor_every", factor_every),
            ("inverse_every", inverse_every),
            ("micro_batches", micro_batches),
        ):
            if int(v) != v or v < 1:
                raise ValueError(f"Invalid {name}: {v} (need an integer >= 1)")
        if curvature not in CURVATURES:
            raise ValueError(f"Invalid curvature: {curvature!r} (choose from {', '.join(CURVATURES)})")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"Invalid kl_clip: {kl_clip} (need > 0 or None)")
        if eigh_dtype not in (None, "float32", "float64"):
            raise ValueError(f"Invalid eigh_dtype: {eigh_dtype!r} (None, 'float32' or 'float64')")
        if capture not in ("hook", "functional"):
            raise ValueError(f"Invalid capture: {capture!r} ('hook' or 'functional')")
        if capture == "functional" and curvature != "empirical":
            raise ValueError(f"Invalid capture: 'functional' supports curvature='empirical' only, got {curvature!r}")
        self._schedules = {k: v for k, v in (("alpha", alpha), ("damping", damping)) if callable(v)}
        defaults = dict(
            lr=lr, alpha=_value(alpha, 0), damping=_value(damping, 0), momentum=momentum, weight_decay=weight_decay
        )
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self.model = model
        self.factor_decay = float(factor_decay)
        self.factor_every = int(factor_every)
        self.inverse_every = int(inverse_every)
        self.micro_batches = int(micro_batches)
        self.curvature = curvature
        self.capture = capture
        self.adaptive_damping = bool(adaptive_damping)
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.eigh_dtype = {None: None, "float32": torch.float32, "float64": torch.float64}[eigh_dtype]
        self.steps = 0
        self._capturing = True  # a plain bool (not steps % T_f) so that torch.compile guards on two values only
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(int(seed))
        self._fallbacks = 0
        self._last_kl_scale: Tensor | None = None
        self._group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.layers, self._uncovered = find_layers(model, set(self._group_of))
        for layer in self.layers:
            if layer.bias is not None and self._group_of[layer.bias] != self._group_of[layer.weight]:
                raise ValueError("a layer's weight and bias must be in the same parameter group")
        self._handles: list[Any] = []
        for layer in self.layers:
            for i, m in enumerate(layer.modules):
                self._handles.append(m.register_forward_hook(partial(self._forward_hook, layer, i)))
                if capture == "functional":
                    o = layer.weight.shape[0] // layer.groups
                    dev, dt = layer.weight.device, torch.promote_types(layer.weight.dtype, torch.float32)
                    probe = torch.zeros(layer.groups, o, o, device=dev, dtype=dt, requires_grad=True)
                    layer.probes.append((probe, torch.zeros(1, device=dev, dtype=dt, requires_grad=True)))
        if curvature != "empirical":
            self._handles.append(model.register_forward_hook(self._model_hook))
        self._sampling = False
        self._stacks_cache: dict[tuple[int, int, int], _Stack] = {}
        if strict and self._uncovered:
            listed = "; ".join(f"{n or '<model>'}: {r}" for n, r in self._uncovered.items())
            raise ValueError(f"strict=True but {len(self._uncovered)} module(s) would take plain steps: {listed}")
        logger.info(
            "CurvatureCorrected preconditions %d layer(s) (%s); plain steps for %d module(s)%s",
            len(self.layers),
            ", ".join(layer.name for layer in self.layers),
            len(self._uncovered),
            "".join(f"; {n or '<model>'}: {r}" for n, r in self._uncovered.items()),
        )

    # ---- coverage ----------------------------------------------------------------------------------------
    def coverage(self) -> dict[str, dict[str, str]]:
        """``{"preconditioned": {name: kind}, "plain": {name: reason}}`` over the modules holding this
        optimizer's parameters. Tied modules are listed as ``"a = b"``; grouped convolutions as block
        diagonal over their groups."""
        return {"preconditioned": {layer.name: layer.kind for layer in self.layers}, "plain": dict(self._uncovered)}

    # ---- hooks -----------------------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """Whether the current step records curvature statistics (``steps % factor_every == 0``)."""
        return self._capturing

    def _forward_hook(
        self, layer: KronLayer, index: int, module: nn.Module, inputs: tuple[Any, ...], output: Any
    ) -> Any:
        if self._sampling or not self._capturing or not torch.is_grad_enabled():
            return None
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        x = inputs[0].detach()
        with torch.no_grad(), _no_autocast(x.device):
            cap = Capture(index, x.shape[0], *layer.input_stat(module, x))
        layer.captures.append(cap)
        if self.capture == "functional":
            probe, count = layer.probes[index]
            return OutputGradStat.apply(output, probe, count, layer.channel_dim, layer.groups)
        output.register_hook(partial(self._on_grad, cap))
        if self.curvature != "empirical":
            cap.output = output
        return None

    def _on_grad(self, cap: Capture, g: Tensor) -> None:
        if self._sampling:
            return
        g = stat(g.detach())
        # sum over backward passes *before* the outer product: G of the combined gradient
        cap.grad_sum = g if cap.grad_sum is None else cap.grad_sum + g

    def _model_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if self._sampling or not self._capturing or not torch.is_grad_enabled():
            return
        outs = [output] if isinstance(output, Tensor) else [o for o in output if isinstance(o, Tensor)]
        if outs:
            self.curvature_backward(outs)

    def curvature_backward(self, outputs: Tensor | Sequence[Tensor]) -> None:
        """Collect ``G`` from a sampled-label (``mc_fisher``) or Gauss–Newton (``gn_mse``) backward.

        ``outputs``: the network's logits (one tensor or one per exit), still attached to the graph of the
        current capture step. Uses ``torch.autograd.grad`` with ``retain_graph=True``: ``.grad`` is untouched
        and the training backward can follow. Does nothing on steps that do not update factors, in the
        ``empirical`` mode, or when no recorded layer output is upstream of ``outputs``.
        """
        if self.curvature == "empirical" or not self._capturing:
            return
        outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
        outs = [o for o in outs if o.requires_grad]
        pending = [(layer, c) for layer in self.layers for c in layer.captures if c.output is not None]
        if not outs or not pending:
            return
        targets: list[Tensor] = [c.output for _, c in pending if c.output is not None]
        self._sampling = True
        try:
            with _no_autocast(targets[0].device):
                if self.curvature == "mc_fisher":
                    loss = torch.stack([self._sampled_loss(o) for o in outs]).sum()
                    grads = torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
                    for (layer, cap), g in zip(pending, grads):
                        if g is not None:  # loss is a batch mean: δ = B·g, G = Σ δδᵀ / B = B Σ g gᵀ
                            self._add_sampled(cap, layer.output_stat(g.detach(), cap.batch))
                else:  # gn_mse: one backward per output coordinate, G = (1/B) Σ_b Σ_k J_bkᵀ J_bk
                    for o in outs:
                        flat = o.reshape(o.shape[0], -1)
                        for k in range(flat.shape[1]):
                            grads = torch.autograd.grad(flat[:, k].sum(), targets, retain_graph=True, allow_unused=True)
                            for (layer, cap), g in zip(pending, grads):
                                if g is not None:
                                    self._add_sampled(cap, layer.output_stat(g.detach(), 1.0) / cap.batch)
        finally:
            self._sampling = False
        for _, cap in pending:
            if cap.sampled_g is not None:
                cap.output = None

    @staticmethod
    def _add_sampled(cap: Capture, g: Tensor) -> None:
        cap.sampled_g = g if cap.sampled_g is None else cap.sampled_g + g

    def _sampled_loss(self, logits: Tensor) -> Tensor:
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float().movedim(1, -1).reshape(-1, logits.shape[1]), -1)
            y = torch.multinomial(probs.cpu(), 1, generator=self._generator).squeeze(1).to(logits.device)
        y = y.reshape(logits.movedim(1, -1).shape[:-1])
        return F.cross_entropy(logits.float(), y)

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (no more statistics are recorded)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["curvature_steps"] = self.steps
        sd["curvature_rng"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        self.steps = int(sd.pop("curvature_steps", 0))
        self._capturing = self.steps % self.factor_every == 0
        rng = sd.pop("curvature_rng", None)
        if rng is not None:
            self._generator.set_state(rng.cpu())
        super().load_state_dict(sd)
        self._stacks_cache = {}
        for layer in self.layers:
            layer.captures = []

    def epoch_metrics(self) -> dict[str, float]:
        """Logged once per epoch by the trainer: KL-clip scale of the last step, sampled-G fallbacks."""
        out = {"curv_fallbacks": float(self._fallbacks)}
        if self._last_kl_scale is not None:
            out["curv_kl_scale"] = float(self._last_kl_scale)
        return out

    # ---- step --------------------------------------------------------------------------------------------
    _reducer: Callable[[Tensor], Tensor] | None = None

    def set_reducer(self, fn: Callable[[Tensor], Tensor] | None) -> None:
        """Data parallel (``anytrain.train.distributed``): ``fn`` averages a tensor over the ranks in place and
        returns it. Each factor-update step then averages the per-step Kronecker factors ``Â``, ``Ĝ`` of all
        layers with one call before the running averages, so the factors (and their eigendecompositions) are
        identical on every rank and equal to those of the global batch. ``None`` switches it off."""
        self._reducer = fn

    _loss_scale: Tensor | None = None

    def set_loss_scale(self, scale: Tensor | None) -> None:
        """The loss scale ``s`` of the current step's backward passes (``None``: unscaled); ``Ĝ`` is divided by
        ``s²``. A tensor, read on the device: no host synchronisation."""
        self._loss_scale = scale

    def discard_captures(self) -> None:
        """Drop the statistics recorded since the last step (a step skipped for non-finite gradients)."""
        for layer in self.layers:
            layer.captures = []
            for probe, count in layer.probes:
                probe.grad = count.grad = None

    def _layer_g(self, layer: KronLayer, caps: list[Capture]) -> Tensor | None:
        """``Ĝ`` of this step: per module the mean over its forward calls of ``B Σ g gᵀ``, summed over the
        modules that share the weight (positions of one layer), times K² under K micro-batches (each loss was
        divided by K, so ``δ = K·B·g``)."""
        k2 = float(self.micro_batches**2)
        total: Tensor | None = None
        for i in range(len(layer.modules)):
            mine = [c for c in caps if c.source == i]
            if not mine:
                continue
            if self.capture == "functional":
                probe, count = layer.probes[i]
                g_sum, passes = probe.grad, count.grad
                probe.grad = count.grad = None
                if g_sum is None or passes is None:
                    continue
                if int(passes.item()) != len(mine):
                    raise RuntimeError(
                        f"capture='functional' needs one backward pass per forward call, got {int(passes.item())} "
                        f"for {len(mine)} calls of {layer.name!r}; use capture='hook'"
                    )
                g_i = g_sum / len(mine) * k2
            else:
                parts = []
                for c in mine:
                    if c.sampled_g is not None:
                        parts.append(c.sampled_g)
                    elif c.grad_sum is not None:
                        if self.curvature != "empirical":
                            self._fallbacks += 1
                        parts.append(layer.output_stat(c.grad_sum, c.batch * k2))
                if not parts:
                    continue
                g_i = torch.stack(parts).mean(0)
            total = g_i if total is None else total + g_i
        if total is not None and self._loss_scale is not None:
            total = total / self._loss_scale.to(total.dtype).square()
        return total

    def _update_factors(self) -> bool:
        """Fold this step's captures into the running averages. Returns whether any factor was new."""
        beta = self.factor_decay
        fresh = False
        new: list[tuple[KronLayer, Tensor, Tensor]] = []
        for layer in self.layers:
            caps, layer.captures = layer.captures, []
            if not caps:
                if layer.weight.grad is not None and "A" not in self.state[layer.weight]:
                    raise RuntimeError(
                        f"the forward hook of {layer.name!r} never fired although its weight has a gradient (is the "
                        "module called functionally?); leave its parameters out of `params`"
                    )
                continue  # layer not used on this step
            g_new = self._layer_g(layer, caps)
            if g_new is None:
                continue  # no gradient reached the layer on this step
            a_new = caps[0].aat if len(caps) == 1 else torch.stack([c.aat for c in caps]).sum(0)
            a_new = a_new.div_(sum(c.rows for c in caps))
            new.append((layer, _squeeze(a_new), _squeeze(g_new)))
        if self._reducer is not None and new:
            # data parallel: this step's factors become the averages over all ranks (one all-reduce for all
            # layers) before they enter the running averages, so A, G and their eigenpairs agree on every rank
            flat = self._reducer(torch.cat([t.reshape(-1) for _, a, g in new for t in (a, g)]))
            parts = iter(flat.split([t.numel() for _, a, g in new for t in (a, g)]))
            new = [(layer, next(parts).view_as(a), next(parts).view_as(g)) for layer, a, g in new]
        for layer, a_new, g_mean in new:
            st = self.state[layer.weight]
            if "A" not in st:
                st["A"], st["G"] = a_new, g_mean
                fresh = True
            else:
                st["A"].lerp_(a_new, 1.0 - beta)  # A ← βA + (1−β)Â
                st["G"].lerp_(g_mean, 1.0 - beta)
        return fresh

    def _use_cholesky(self, layer: KronLayer) -> bool:
        """α = 1 with constant α and λ: ``(A + λI)^(−1)`` by Cholesky, ~5× cheaper than eigh for wide factors."""
        return not self._schedules and float(self.param_groups[self._group_of[layer.weight]]["alpha"]) == 1.0

    def _decompose(self, only_missing: bool) -> None:
        """Eigendecompositions (or, at α = 1, Cholesky inverses) of the factors, one batched call per size."""
        todo: dict[tuple[bool, int], list[tuple[dict[str, Any], str, float]]] = {}
        for layer in self.layers:
            st = self.state[layer.weight]
            if "A" not in st or (only_missing and ("QA" in st or "PA" in st)):
                continue
            chol = self._use_cholesky(layer)
            lam = float(self.param_groups[self._group_of[layer.weight]]["damping"])
            for name in ("A", "G"):
                todo.setdefault((chol, st[name].shape[-1]), []).append((st, name, lam))
        for (chol, n), items in todo.items():
            mats = torch.cat([st[name].reshape(-1, n, n) for st, name, _ in items])
            sizes = [st[name].reshape(-1, n, n).shape[0] for st, name, _ in items]
            if chol:
                lams = torch.tensor([lam for s, (_, _, lam) in zip(sizes, items) for _ in range(s)], dtype=mats.dtype)
                shift = lams.to(mats.device)
                if self.adaptive_damping:  # λ relative to the mean eigenvalue (trace / n) of each factor
                    shift = shift * (mats.diagonal(dim1=-2, dim2=-1).sum(-1) / n).clamp_min(
                        torch.finfo(mats.dtype).tiny
                    )
                inv = damped_inverse(mats, shift, self.eigh_dtype)
                for (st, name, lam), part in zip(items, inv.split(sizes)):
                    st["P" + name] = part.reshape(st[name].shape).clone()
                    st["lam" + name] = lam  # a float: load_state_dict would cast a tensor to the params dtype
                    for k in ("d", "Q"):
                        st.pop(k + name, None)
                continue
            d, q = eig_factor(mats, self.eigh_dtype)
            for (st, name, _), dp, qp in zip(items, d.split(sizes), q.split(sizes)):
                st["d" + name] = dp.reshape(st[name].shape[:-1]).clone()
                st["Q" + name] = qp.reshape(st[name].shape).clone()
                for k in ("P", "lam"):
                    st.pop(k + name, None)
        if todo:
            self._stacks_cache = {}

    def _stacks(self) -> dict[tuple[int, int, int], _Stack]:
        """Preconditioned layers grouped by (param group, block out, block in), eigenpairs or inverses stacked."""
        if not self._stacks_cache:
            groups: dict[tuple[int, int, int], list[KronLayer]] = {}
            for layer in self.layers:
                st = self.state[layer.weight]
                if "QA" in st or "PA" in st:
                    key = (self._group_of[layer.weight], st["G"].shape[-1], st["A"].shape[-1])
                    groups.setdefault(key, []).append(layer)
            for key, ls in groups.items():
                sts = [self.state[layer.weight] for layer in ls]
                if len({"PA" in s for s in sts}) > 1:  # α edited by hand between decompositions: redo them all
                    self._decompose(only_missing=False)
                    return self._stacks()
                cat = partial(_cat, sts)
                if "PA" in sts[0]:  # Cholesky inverses: the powers at α = 1 for the damping they were made with
                    powers = _Powers(
                        float(self.param_groups[key[0]]["alpha"]), float(sts[0]["lamA"]), cat("PA", 2), cat("PG", 2)
                    )
                    self._stacks_cache[key] = _Stack.build(ls, None, powers, powers.a)
                else:
                    eig = Eig(cat("dA", 1), cat("QA", 2)), Eig(cat("dG", 1), cat("QG", 2))
                    self._stacks_cache[key] = _Stack.build(ls, eig, None, eig[0].q)
        return self._stacks_cache

    def _powers(self, stack: _Stack, alpha: float, lam: float) -> _Powers:
        """``(A + λ_A I)^(−α)``, ``(G + λ_G I)^(−α)`` of the stack as matrices (``damped_power``), cached in the
        stack until the next decomposition or a change of the (scheduled) ``alpha``/``damping``: the step is
        then two matmuls (``kron_apply``) instead of the four rotations of the eigenbases."""
        assert stack.eig_a is not None and stack.eig_g is not None
        damp = [
            lam * e.d.mean(-1, keepdim=True).clamp_min(torch.finfo(e.d.dtype).tiny) if self.adaptive_damping else lam
            for e in (stack.eig_a, stack.eig_g)
        ]  # adaptive: λ relative to the mean eigenvalue of each factor
        stack.powers = _Powers(
            alpha, lam, damped_power(stack.eig_a, alpha, damp[0]), damped_power(stack.eig_g, alpha, damp[1])
        )
        return stack.powers

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.steps
        for group in self.param_groups:
            for name, sched in self._schedules.items():
                group[name] = _value(sched, t)
        device = self.param_groups[0]["params"][0].device
        with _no_autocast(device):  # statistics, decompositions and products in the parameters' dtype
            if t % self.factor_every == 0:
                fresh = self._update_factors()
                if t % self.inverse_every == 0:
                    self._decompose(only_missing=False)
                elif fresh:
                    self._decompose(only_missing=True)
            elif t % self.inverse_every == 0:
                self._decompose(only_missing=False)
            direction = self._directions()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                ds = [direction.get(p, p.grad) for p in ps]
                sgd_update(
                    ps, ds, [self.state[p] for p in ps], lr=group["lr"], momentum=group["momentum"],
                    weight_decay=group["weight_decay"],
                )  # fmt: skip
        self.steps = t + 1
        self._capturing = self.steps % self.factor_every == 0
        return loss

    def _directions(self) -> dict[Tensor, Tensor]:
        """Preconditioned directions of the Kronecker layers: per stack one gather of the gradients into the
        preallocated buffer, two batched matmuls into the steps buffer, one dot product for the KL term."""
        done: list[_Stack] = []
        kl: Tensor | None = None
        for (gi, _, _), stack in list(self._stacks().items()):
            group = self.param_groups[gi]
            alpha, lam = float(group["alpha"]), float(group["damping"])
            if stack.layers[0].weight.grad is None and all(layer.weight.grad is None for layer in stack.layers):
                continue
            powers = stack.powers
            stale = powers is None or powers.alpha != alpha or powers.damping != lam
            if stale and stack.eig_a is None:
                # Cholesky inverses but alpha / damping were changed by hand: decompose the current factors again
                self._decompose(only_missing=False)
                return self._directions()
            # a layer without a gradient this step gets a zero block (its step is zero and is not applied)
            srcs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in stack.params]
            torch._foreach_copy_(stack.grad_views, srcs)
            if alpha == 0:  # gradient descent, bit for bit
                stack.steps.copy_(stack.grads)
            else:
                if stale or powers is None:
                    powers = self._powers(stack, alpha, lam)
                kron_apply(stack.grads, powers.a, powers.g, out=stack.steps)
            if self.kl_clip is not None:
                dot = group["lr"] ** 2 * torch.dot(stack.steps.view(-1), stack.grads.view(-1))
                kl = dot if kl is None else kl + dot
            done.append(stack)
        if kl is not None:
            # ν = min(1, sqrt(κ / (η² Σ⟨Δ, g⟩))): cap on the (approximate) KL change of the step, one in-place
            # scale of the steps buffers (the directions are views of them)
            nu = torch.sqrt(float(self.kl_clip or 0.0) / kl.abs().clamp_min(torch.finfo(kl.dtype).tiny)).clamp(max=1.0)
            self._last_kl_scale = nu
            torch._foreach_mul_([stack.steps for stack in done], nu)
        direction: dict[Tensor, Tensor] = {}
        for stack in done:
            for p, d in zip(stack.params, stack.step_views):
                if p.grad is not None:
                    direction[p] = d if d.dtype == p.dtype else d.to(p.dtype)
        return direction


def sgd_update(
    params: list[Tensor],
    directions: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """``d = Δ + wd·θ;  m ← μ m + d (m = d first);  θ ← θ − η m`` — torch.optim.SGD's update on directions."""
    if weight_decay != 0:
        directions = list(torch._foreach_add(directions, params, alpha=weight_decay))
    if momentum != 0:
        bufs: list[Tensor | None] = []
        for d, st in zip(directions, states):
            buf = st.get("momentum_buffer")
            if buf is None:
                st["momentum_buffer"] = buf = torch.clone(d).detach()
                bufs.append(None)
            else:
                bufs.append(buf)
        have = [(b, d) for b, d in zip(bufs, directions) if b is not None]
        if have:
            torch._foreach_mul_([b for b, _ in have], momentum)
            torch._foreach_add_([b for b, _ in have], [d for _, d in have])
        directions = [st["momentum_buffer"] for st in states]
    torch._foreach_add_(params, directions, alpha=-lr)
