"""Curvature-corrected learning: block-diagonal natural gradient with a fractional exponent ``alpha``.

Huh, "Curvature-corrected learning dynamics in deep neural networks" (ICML 2020). For a layer with weight
gradient ``∇W`` (out × in), input second moment ``A = E[a aᵀ]`` (a 1 appended to ``a`` when the layer has a
bias) and output-gradient second moment ``G = E[δ δᵀ]``, the step direction is::

    Δ = (G + λI)^(−α) · ∇W · (A + λI)^(−α)                                            (Huh 2020, eq. 9)

``α = 0`` is gradient descent, ``α = 1`` the block-diagonal natural gradient NGD-d (K-FAC, Martens & Grosse
2015), ``α = ½`` the partially corrected rule that keeps the layers of a deep linear network balanced.

Functional core (module level, used by the optimizer and by tests):
    ``eig_factor(M)``          symmetric eigendecomposition with eigenvalues clamped at 0
    ``precondition_eig(...)``  the step above given the eigendecompositions (batched over leading dims)
    ``precondition(grad, A, G, alpha, damping)``  the same from the factors themselves (the contract)

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

Layers: ``nn.Linear`` (inputs of any rank; extra dims count as positions), ``nn.Conv1d``, ``nn.Conv2d`` with
``groups == 1`` (factors from unfolded patches, Grosse & Martens 2016: ``A`` is the mean over samples and
positions, ``G`` the mean over samples of the sum over positions). Every other parameter — and the layers
whose weight is not among ``params`` (decoupled greedy learning gives one optimizer per module) — takes the
plain (momentum, weight-decay) gradient step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CurvatureCorrected", "eig_factor", "precondition", "precondition_eig", "kron_factors_of_batch"]

Schedule = float | Callable[[int], float]
CURVATURES = ("empirical", "mc_fisher", "gn_mse")
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


# ---------------------------------------------------------------------------------------------------------
# functional core
# ---------------------------------------------------------------------------------------------------------
def eig_factor(factor: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Eigendecomposition ``factor = Q diag(d) Qᵀ`` of a symmetric PSD matrix (batched), ``d`` clamped at 0.

    The matrix is symmetrized first (running averages drift from exact symmetry in floating point) and, with
    ``dtype=torch.float64``, decomposed in double precision; results come back in ``factor.dtype``.
    Returns ``(d, Q)``.
    """
    sym = 0.5 * (factor + factor.mT)
    work = sym.to(dtype) if dtype is not None else sym
    try:
        d, q = torch.linalg.eigh(work)
    except RuntimeError:
        if not bool(torch.isfinite(work).all()):
            raise ValueError("curvature factor is not finite (the loss or the weights diverged)") from None
        # LAPACK did not converge (clustered eigenvalues in float32): retry in float64 with a jitter
        # of a few ulps of the trace, far below any damping that matters
        work = work.double()
        n = work.shape[-1]
        jitter = 1e-13 * work.diagonal(dim1=-2, dim2=-1).sum(-1).abs().clamp_min(1e-300)[..., None, None]
        d, q = torch.linalg.eigh(work + jitter * torch.eye(n, dtype=work.dtype, device=work.device))
    return d.clamp_min(0).to(factor.dtype), q.to(factor.dtype)


def _inverse_power(d: Tensor, damping: Tensor | float, alpha: float) -> Tensor:
    """``(d + λ)^(−α)`` elementwise; with ``λ = 0`` the pseudo-inverse convention (null directions → 0)."""
    shifted = d + damping
    if isinstance(damping, float) and damping > 0:
        return shifted.pow(-alpha)
    # relative tolerance as in torch.linalg.pinv: n · eps · max eigenvalue
    n = d.shape[-1]
    tol = n * torch.finfo(d.dtype).eps * shifted.amax(-1, keepdim=True)
    keep = shifted > tol
    return torch.where(keep, shifted.clamp_min(torch.finfo(d.dtype).tiny).pow(-alpha), torch.zeros_like(d))


def precondition_eig(
    grad: Tensor,
    d_a: Tensor,
    q_a: Tensor,
    d_g: Tensor,
    q_g: Tensor,
    alpha: float,
    damping_a: Tensor | float,
    damping_g: Tensor | float,
) -> Tensor:
    """``(G + λ_G I)^(−α) ∇ (A + λ_A I)^(−α)`` with ``A = Q_A diag(d_A) Q_Aᵀ`` and ``G = Q_G diag(d_G) Q_Gᵀ``.

    In the eigenbases the two matrix powers are diagonal: rotate ``V = Q_Gᵀ ∇ Q_A``, scale entry ``(i, j)`` by
    ``(d_G[i] + λ_G)^(−α) (d_A[j] + λ_A)^(−α)``, rotate back. Leading dimensions are batch dimensions
    (several layers of the same shape in one call); the dampings broadcast as ``(..., 1)`` tensors or floats.
    ``alpha == 0`` returns ``grad`` itself (bit-exact gradient descent, no rounding from the rotations).
    """
    if alpha == 0:
        return grad
    v = q_g.mT @ grad @ q_a
    v = v * _inverse_power(d_g, damping_g, alpha).unsqueeze(-1) * _inverse_power(d_a, damping_a, alpha).unsqueeze(-2)
    return q_g @ v @ q_a.mT


def precondition(
    grad: Tensor, A: Tensor, G: Tensor, alpha: float, damping: float, eigh_dtype: torch.dtype | None = None
) -> Tensor:
    """``(G + damping·I)^(−alpha) @ grad @ (A + damping·I)^(−alpha)``.

    Args:
        grad: ``(..., out, in)`` gradient (for a layer with bias, the bias gradient is the last column).
        A: ``(..., in, in)`` symmetric PSD input factor.
        G: ``(..., out, out)`` symmetric PSD output-gradient factor.
        alpha: exponent ≥ 0 (0: identity, ½: partial correction, 1: natural gradient).
        damping: λ ≥ 0 added to the eigenvalues after they are clamped at 0; with λ = 0 the powers of
            zero eigenvalues are taken as 0 (pseudo-inverse), so rank-deficient factors never give NaN.
        eigh_dtype: decompose in this dtype (``torch.float64`` for ill-conditioned factors).

    Returns:
        The preconditioned gradient, shape and dtype of ``grad``.

    Example:
        >>> A, G = torch.diag(torch.tensor([4.0, 1.0])), torch.diag(torch.tensor([9.0]))
        >>> precondition(torch.ones(1, 2), A, G, alpha=0.5, damping=0.0)
        tensor([[0.1667, 0.3333]])
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    d_a, q_a = eig_factor(A, eigh_dtype)
    d_g, q_g = eig_factor(G, eigh_dtype)
    return precondition_eig(grad, d_a, q_a, d_g, q_g, float(alpha), float(damping), float(damping))


# ---------------------------------------------------------------------------------------------------------
# per-layer-type helpers
# ---------------------------------------------------------------------------------------------------------
def layer_inputs(module: nn.Module, x: Tensor, with_bias: bool) -> Tensor:
    """Rows ``a`` whose second moment is the factor ``A``: ``(rows, in [+1])``.

    Linear: one row per sample (and per position for inputs with more than two dims). Conv: one row per
    sample and output position, the unfolded receptive field in the weight's ``(C_in, k...)`` order.
    """
    if isinstance(module, nn.Linear):
        a = x.reshape(-1, x.shape[-1])
    else:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
        # Pad explicitly with the module's own padding (covers padding='same' and non-zero padding modes).
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-2)
            kernel, dil, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
        else:
            kernel, dil, stride = module.kernel_size, module.dilation, module.stride
        cols = F.unfold(x, kernel, dilation=dil, padding=0, stride=stride)  # (B, C·k, L)
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if with_bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a


def _stat(t: Tensor) -> Tensor:
    """Statistics are accumulated in at least float32 (half-precision activations are upcast)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _output_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradients as rows ``(rows, out)`` (channels last for convolutions)."""
    if isinstance(module, nn.Linear):
        return g.reshape(-1, g.shape[-1])
    return g.transpose(1, -1).reshape(-1, g.shape[1])


def kron_factors_of_batch(
    module: nn.Module, x: Tensor, output_grad: Tensor, with_bias: bool | None = None
) -> tuple[Tensor, Tensor]:
    """``(A, G)`` of one batch for ``module`` given its input and ``∂L/∂z`` of a batch-mean loss ``L``.

    ``A = Σ a aᵀ / rows`` and ``G = B · Σ gᵀ g`` over output rows (per-sample gradient ``δ = B·g``, summed
    over positions, averaged over samples). This is the statistic the optimizer's hooks compute; exposed for
    tests and benchmarks.
    """
    with_bias = (getattr(module, "bias", None) is not None) if with_bias is None else with_bias
    a = layer_inputs(module, _stat(x), with_bias)
    g = _output_rows(module, _stat(output_grad))
    return a.T @ a / a.shape[0], (g.T @ g) * x.shape[0]


# ---------------------------------------------------------------------------------------------------------
# the optimizer
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Capture:
    """Statistics of one forward call of one layer on a capture step."""

    batch: int
    aat: Tensor
    rows: int
    grad_sum: Tensor | None = None  # Σ over backward passes of ∂L/∂z (empirical G of the combined gradient)
    sampled_g: Tensor | None = None  # G from the sampled / Gauss–Newton backward
    output: Tensor | None = None  # kept only in the sampled modes until that backward ran


@dataclass
class _Layer:
    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    captures: list[_Capture] = field(default_factory=list)


def _value(h: Schedule, step: int) -> float:
    return float(h(step)) if callable(h) else float(h)


class CurvatureCorrected(torch.optim.Optimizer):
    r"""Block-diagonal natural gradient with fractional exponent ``alpha`` (Huh, ICML 2020).

    Algorithm, per preconditioned layer ``l`` at step ``t`` (``g = ∇W_l``, bias gradient as last column)::

        if t % T_f == 0:   A ← β A + (1−β) Â_t,   G ← β G + (1−β) Ĝ_t      (first update: A = Â, G = Ĝ)
        if t % T_inv == 0: A = Q_A diag(d_A) Q_Aᵀ,  G = Q_G diag(d_G) Q_Gᵀ    (eigh, d clamped at 0)
        Δ_l = (G + λ_G I)^(−α) g (A + λ_A I)^(−α)                            (λ_A = λ_G = λ, or adaptive)
        ν   = min(1, sqrt(κ / (η² Σ_l ⟨Δ_l, g_l⟩)))                          (KL clip, if κ is set)
        d   = ν Δ + wd · θ;    m ← μ m + d (m = d at t = 0);    θ ← θ − η m

    Other parameters use ``Δ = g`` (plain SGD with the same momentum and weight decay). With ``α = 0`` the
    optimizer equals ``torch.optim.SGD(lr, momentum, weight_decay)`` bit for bit.

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
        inverse_every: T_inv, steps between eigendecompositions.
        curvature: ``"empirical"``, ``"mc_fisher"`` or ``"gn_mse"`` (see the module docstring).
        kl_clip: κ; caps the quadratic KL estimate of the step, ``(ην)² Σ⟨Δ, g⟩ ≤ κ`` (``None``: no cap).
        eigh_dtype: ``"float64"`` to decompose the factors in double precision.
        seed: seed of the generator that samples labels for ``mc_fisher``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = CurvatureCorrected(net, lr=0.1, alpha=0.5, damping=1e-2, factor_every=1, inverse_every=1)
        >>> loss = F.cross_entropy(net(torch.randn(16, 4)), torch.randint(0, 3, (16,)))
        >>> loss.backward(); opt.step()

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
        if int(factor_every) != factor_every or factor_every < 1:
            raise ValueError(f"Invalid factor_every: {factor_every} (need an integer >= 1)")
        if int(inverse_every) != inverse_every or inverse_every < 1:
            raise ValueError(f"Invalid inverse_every: {inverse_every} (need an integer >= 1)")
        if curvature not in CURVATURES:
            raise ValueError(f"Invalid curvature: {curvature!r} (choose from {', '.join(CURVATURES)})")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"Invalid kl_clip: {kl_clip} (need > 0 or None)")
        if eigh_dtype not in (None, "float32", "float64"):
            raise ValueError(f"Invalid eigh_dtype: {eigh_dtype!r} (None, 'float32' or 'float64')")
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
        self.curvature = curvature
        self.adaptive_damping = bool(adaptive_damping)
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.eigh_dtype = {None: None, "float32": torch.float32, "float64": torch.float64}[eigh_dtype]
        self.steps = 0
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(int(seed))
        self._fallbacks = 0
        self._last_kl_scale: Tensor | None = None

        owned = {p for g in self.param_groups for p in g["params"]}
        self._group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.layers: list[_Layer] = []
        for m in model.modules():
            if not isinstance(m, _LAYER_TYPES) or m.weight not in owned:
                continue
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups != 1:
                continue  # grouped convolutions have one Kronecker block per group: left to plain steps
            bias = m.bias if (m.bias is not None and m.bias in owned) else None
            if bias is not None and self._group_of[bias] != self._group_of[m.weight]:
                raise ValueError("a layer's weight and bias must be in the same parameter group")
            self.layers.append(_Layer(m, m.weight, bias))
        self._by_module = {id(layer.module): layer for layer in self.layers}
        self._handles = [layer.module.register_forward_hook(self._forward_hook) for layer in self.layers]
        if curvature != "empirical":
            self._handles.append(model.register_forward_hook(self._model_hook))
        self._sampling = False
        self._eig_cache: dict[tuple[int, int, int], list[Any]] = {}

    # ---- hooks -----------------------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """Whether the current step records curvature statistics (``steps % factor_every == 0``)."""
        return self.steps % self.factor_every == 0

    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if self._sampling or not self.capturing or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        layer = self._by_module[id(module)]
        with torch.no_grad():
            x = inputs[0].detach()
            a = layer_inputs(module, _stat(x), layer.bias is not None)
            cap = _Capture(batch=x.shape[0], aat=a.T @ a, rows=a.shape[0])
        layer.captures.append(cap)

        def on_grad(g: Tensor, cap: _Capture = cap) -> None:
            if self._sampling:
                return
            g = g.detach()
            # sum over backward passes *before* the outer product: G of the combined gradient
            cap.grad_sum = g if cap.grad_sum is None else cap.grad_sum + g

        output.register_hook(on_grad)
        if self.curvature != "empirical":
            cap.output = output

    def _model_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if self._sampling or not self.capturing or not torch.is_grad_enabled():
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
        if self.curvature == "empirical" or not self.capturing:
            return
        outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
        outs = [o for o in outs if o.requires_grad]
        pending = [(layer, c) for layer in self.layers for c in layer.captures if c.output is not None]
        if not outs or not pending:
            return
        targets: list[Tensor] = [c.output for _, c in pending if c.output is not None]
        self._sampling = True
        try:
            if self.curvature == "mc_fisher":
                loss = torch.stack([self._sampled_loss(o) for o in outs]).sum()
                grads = torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
                for (layer, cap), g in zip(pending, grads):
                    if g is not None:  # loss is a batch mean: δ = B·g, G = Σ δδᵀ / B = B Σ g gᵀ
                        rows = _output_rows(layer.module, _stat(g.detach()))
                        self._add_sampled(cap, (rows.T @ rows) * cap.batch)
            else:  # gn_mse: one backward per output coordinate, G = (1/B) Σ_b Σ_k J_bkᵀ J_bk
                for o in outs:
                    flat = o.reshape(o.shape[0], -1)
                    for k in range(flat.shape[1]):
                        grads = torch.autograd.grad(flat[:, k].sum(), targets, retain_graph=True, allow_unused=True)
                        for (layer, cap), g in zip(pending, grads):
                            if g is not None:
                                rows = _output_rows(layer.module, _stat(g.detach()))
                                self._add_sampled(cap, (rows.T @ rows) / cap.batch)
        finally:
            self._sampling = False
        for _, cap in pending:
            if cap.sampled_g is not None:
                cap.output = None

    @staticmethod
    def _add_sampled(cap: _Capture, g: Tensor) -> None:
        cap.sampled_g = g if cap.sampled_g is None else cap.sampled_g + g

    def _sampled_loss(self, logits: Tensor) -> Tensor:
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float().movedim(1, -1).reshape(-1, logits.shape[1]), -1)
            y = torch.multinomial(probs.cpu(), 1, generator=self._generator).squeeze(1).to(logits.device)
        y = y.reshape(logits.movedim(1, -1).shape[:-1])
        return F.cross_entropy(logits, y)

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
        rng = sd.pop("curvature_rng", None)
        if rng is not None:
            self._generator.set_state(rng.cpu())
        super().load_state_dict(sd)
        self._eig_cache = {}
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

    def _update_factors(self) -> bool:
        """Fold this step's captures into the running averages. Returns whether any factor was new."""
        beta = self.factor_decay
        fresh = False
        new: list[tuple[_Layer, Tensor, Tensor]] = []
        for layer in self.layers:
            caps, layer.captures = layer.captures, []
            a_new, g_new = None, []
            for c in caps:
                a_new = c.aat if a_new is None else a_new + c.aat
                if c.sampled_g is not None:
                    g_new.append(c.sampled_g)
                elif c.grad_sum is not None:
                    if self.curvature != "empirical":
                        self._fallbacks += 1
                    rows = _output_rows(layer.module, _stat(c.grad_sum))
                    g_new.append((rows.T @ rows) * c.batch)
            if a_new is None or not g_new:
                continue  # layer not used (or no gradient reached it) on this step
            a_new = a_new / sum(c.rows for c in caps)
            g_mean = torch.stack(g_new).mean(0)
            new.append((layer, a_new, g_mean))
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

    def _decompose(self, only_missing: bool) -> None:
        """Batched eigh of the factors, grouping equal sizes into one call."""
        todo: dict[int, list[Tensor]] = {}
        where: dict[int, list[tuple[dict[str, Any], str]]] = {}
        for layer in self.layers:
            st = self.state[layer.weight]
            if "A" not in st or (only_missing and "QA" in st):
                continue
            for name in ("A", "G"):
                m = st[name]
                todo.setdefault(m.shape[-1], []).append(m)
                where.setdefault(m.shape[-1], []).append((st, name))
        for n, mats in todo.items():
            d, q = eig_factor(torch.stack(mats), self.eigh_dtype)
            for i, (st, name) in enumerate(where[n]):
                st["d" + name], st["Q" + name] = d[i].clone(), q[i].clone()
        if todo:
            self._eig_cache = {}

    def _stacks(self) -> dict[tuple[int, int, int], list[Any]]:
        """Layers with an eigendecomposition, grouped by (param group, out, in), with stacked eigenpairs."""
        if not self._eig_cache:
            groups: dict[tuple[int, int, int], list[_Layer]] = {}
            for layer in self.layers:
                st = self.state[layer.weight]
                if "QA" in st:
                    key = (self._group_of[layer.weight], st["QG"].shape[-1], st["QA"].shape[-1])
                    groups.setdefault(key, []).append(layer)
            for key, ls in groups.items():
                sts = [self.state[layer.weight] for layer in ls]
                stacked = [torch.stack([s[k] for s in sts]) for k in ("dA", "QA", "dG", "QG")]
                self._eig_cache[key] = [ls, *stacked, None]  # last slot: cached (alpha, λ, P_A, P_G)
        return self._eig_cache

    def _powers(self, entry: list[Any], alpha: float, lam: float) -> tuple[Tensor, Tensor]:
        """``P_A = (A + λ_A I)^(−α)``, ``P_G = (G + λ_G I)^(−α)`` as matrices, cached until the next eigh.

        Two matmuls per step (``P_G ∇ P_A``) instead of four rotations; recomputed only when the eigenpairs or
        the (scheduled) ``alpha``/``damping`` change.
        """
        _, d_a, q_a, d_g, q_g, cached = entry
        if cached is not None and cached[0] == alpha and cached[1] == lam:
            return cached[2], cached[3]
        if self.adaptive_damping:  # λ relative to the mean eigenvalue of each factor
            lam_a: Tensor | float = lam * d_a.mean(-1, keepdim=True).clamp_min(torch.finfo(d_a.dtype).tiny)
            lam_g: Tensor | float = lam * d_g.mean(-1, keepdim=True).clamp_min(torch.finfo(d_g.dtype).tiny)
        else:
            lam_a = lam_g = lam
        p_a = (q_a * _inverse_power(d_a, lam_a, alpha).unsqueeze(-2)) @ q_a.mT
        p_g = (q_g * _inverse_power(d_g, lam_g, alpha).unsqueeze(-2)) @ q_g.mT
        entry[5] = (alpha, lam, p_a, p_g)
        return p_a, p_g

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

        fresh = self._update_factors() if t % self.factor_every == 0 else False
        if t % self.inverse_every == 0:
            self._decompose(only_missing=False)
        elif fresh:
            self._decompose(only_missing=True)

        # preconditioned directions of the Kronecker layers, batched over layers of equal shape
        direction: dict[nn.Parameter, Tensor] = {}
        kl_terms: list[Tensor] = []
        for (gi, _, _), entry in self._stacks().items():
            group = self.param_groups[gi]
            alpha = float(group["alpha"])
            ls = entry[0]
            live = [i for i, layer in enumerate(ls) if layer.weight.grad is not None]
            if not live:
                continue
            mats = [self._grad_matrix(ls[i]) for i in live]
            grads = mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)  # no copy for a lone layer
            if alpha == 0:  # gradient descent, bit for bit
                steps = grads
            else:
                p_a, p_g = self._powers(entry, alpha, float(group["damping"]))
                if len(live) != len(ls):
                    idx = torch.tensor(live)
                    p_a, p_g = p_a[idx], p_g[idx]
                steps = p_g @ grads.to(p_a.dtype) @ p_a
                steps = steps if steps.dtype == grads.dtype else steps.to(grads.dtype)
            ls = [ls[i] for i in live]
            if self.kl_clip is not None:
                kl_terms.append(group["lr"] ** 2 * (steps * grads).sum())
            for layer, s in zip(ls, steps):
                w = layer.weight
                s = s.to(w.dtype)
                if layer.bias is not None:
                    direction[w] = s[:, :-1].reshape(w.shape)
                    if layer.bias.grad is not None:
                        direction[layer.bias] = s[:, -1].reshape(layer.bias.shape)
                else:
                    direction[w] = s.reshape(w.shape)
        if kl_terms and direction:
            # ν = min(1, sqrt(κ / (η² Σ⟨Δ, g⟩))): cap on the (approximate) KL change of the step
            total = torch.stack(kl_terms).sum().abs().clamp_min(torch.finfo(torch.float32).tiny)
            nu = torch.sqrt(float(self.kl_clip or 0.0) / total).clamp(max=1.0)
            self._last_kl_scale = nu.detach()
            keys = list(direction)
            scaled = torch._foreach_mul([direction[p] for p in keys], nu.to(keys[0].dtype))
            direction = dict(zip(keys, scaled))

        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            ds = [direction.get(p, p.grad) for p in ps]
            sgd_update(
                ps,
                ds,
                [self.state[p] for p in ps],
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
            )
        self.steps = t + 1
        return loss

    @staticmethod
    def _grad_matrix(layer: _Layer) -> Tensor:
        assert layer.weight.grad is not None
        g = layer.weight.grad.reshape(layer.weight.shape[0], -1)
        if layer.bias is not None:
            b = layer.bias.grad if layer.bias.grad is not None else torch.zeros_like(layer.bias)
            g = torch.cat([g, b.reshape(-1, 1)], dim=1)
        return g


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
