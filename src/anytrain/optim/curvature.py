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

    ``micro_batches=K`` (gradient accumulation, each micro-batch loss divided by K): the output gradient of
    a micro-batch is ``∂L/∂z / K`` of the whole-batch loss, so ``δ = K·B·∂L_k/∂z`` and ``Ĝ`` is ``K²`` times
    the mean over the K forward calls — the statistic of the whole batch of K·B.
    ``capture="functional"``: instead of a tensor hook, the forward hook returns the output through an autograd
    function whose backward hands ``B·Σ g gᵀ`` to a preallocated probe leaf (autograd sums it over the passes);
    nothing has Python side effects in the backward, so ``torch.compile`` traces the hooks without graph breaks.
    It is the sum of per-pass statistics, which equals the default only with one backward pass per forward call
    (checked: a pass counter is compared with the forward calls at each factor update).
    Statistics, decompositions and the products of the step run with autocast disabled, in float32 at least.

Layers: ``nn.Linear`` (inputs of any rank; extra dims count as positions), ``nn.Conv1d``, ``nn.Conv2d`` of any
stride, padding, padding mode and dilation (factors from unfolded patches, Grosse & Martens 2016: ``A`` is the
mean over samples and positions, ``G`` the mean over samples of the sum over positions); grouped convolutions get
one Kronecker block per group (``A``, ``G`` of shape ``(groups, ·, ·)``), exactly the factors of one ordinary
convolution per group. Tied weights: the modules that share a weight (and its bias) are one layer applied at
more positions — ``A`` averages the rows of all of them, ``G`` sums their per-module statistics — exactly the
factors of the untied equivalent (one module applied to the stacked inputs). Every other module holding a
parameter of the optimizer (norms, embeddings, ``nn.MultiheadAttention``'s packed ``in_proj`` and its
``out_proj``, which it calls functionally; a weight tied to one of them) takes the plain (momentum,
weight-decay) step and is listed, with the reason, by ``coverage()`` and in one log line at construction;
``strict=True`` raises instead. A covered layer whose forward hook never fires although its weight gets a
gradient (called functionally) is a ``RuntimeError`` naming it at the first factor update. Layers whose weight
is not among ``params`` (decoupled greedy learning gives one optimizer per module) are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CurvatureCorrected", "eig_factor", "precondition", "precondition_eig", "kron_factors_of_batch"]

logger = logging.getLogger(__name__)
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
# per-layer-type helpers: every statistic carries a leading ``groups`` dim (1 except for grouped convolutions)
# ---------------------------------------------------------------------------------------------------------
def _groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1))


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """Rows ``a`` whose second moment is the factor ``A``: ``(rows, groups, in / groups)``.

    Linear: one row per sample (and per position for inputs with more than two dims). Conv: one row per
    sample and output position, the unfolded receptive field in the weight's ``(C_in, k...)`` order, split into
    the convolution's channel groups (each group is an independent Kronecker block).
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1])
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    # Pad explicitly with the module's own padding (covers padding='same' and non-zero padding modes).
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, dil, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
    else:
        kernel, dil, stride = module.kernel_size, module.dilation, module.stride
    cols = F.unfold(x, kernel, dilation=dil, padding=0, stride=stride)  # (B, C·k, L), channel-major
    return cols.transpose(1, 2).reshape(-1, module.groups, cols.shape[1] // module.groups)


def output_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradients as rows ``(rows, groups, out / groups)`` (channels last for convolutions)."""
    if isinstance(module, nn.Linear):
        return g.reshape(-1, 1, g.shape[-1])
    return g.transpose(1, -1).reshape(-1, _groups(module), g.shape[1] // _groups(module))


def _gram(rows: Tensor) -> Tensor:
    """``Σ_rows r rᵀ`` per group: ``(rows, groups, m) -> (groups, m, m)``."""
    if rows.shape[1] == 1:  # one group: a plain matmul, no transposed copy of the rows
        r = rows[:, 0]
        return (r.T @ r).unsqueeze(0)
    r = rows.transpose(0, 1)
    return r.mT @ r


def _input_gram(a: Tensor, with_bias: bool) -> Tensor:
    """``Σ ã ãᵀ`` with ``ã = [a, 1]`` when the layer has a bias, without materializing the column of ones."""
    aat = _gram(a)
    if not with_bias:
        return aat
    g, m = aat.shape[0], aat.shape[-1]
    col = a.sum(0)  # (groups, m): Σ a
    out = aat.new_empty(g, m + 1, m + 1)
    out[:, :m, :m] = aat
    out[:, :m, m] = col
    out[:, m, :m] = col
    out[:, m, m] = a.shape[0]
    return out


def _stat(t: Tensor) -> Tensor:
    """Statistics are accumulated in at least float32 (half-precision activations are upcast)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _squeeze(t: Tensor) -> Tensor:
    return t[0] if t.shape[0] == 1 else t


def kron_factors_of_batch(
    module: nn.Module, x: Tensor, output_grad: Tensor, with_bias: bool | None = None
) -> tuple[Tensor, Tensor]:
    """``(A, G)`` of one batch for ``module`` given its input and ``∂L/∂z`` of a batch-mean loss ``L``.

    ``A = Σ a aᵀ / rows`` and ``G = B · Σ gᵀ g`` over output rows (per-sample gradient ``δ = B·g``, summed
    over positions, averaged over samples); ``(groups, ·, ·)`` blocks for a grouped convolution. This is the
    statistic the optimizer's hooks compute; exposed for tests and benchmarks.
    """
    with_bias = (getattr(module, "bias", None) is not None) if with_bias is None else with_bias
    a = layer_inputs(module, _stat(x))
    g = output_rows(module, _stat(output_grad))
    return _squeeze(_input_gram(a, with_bias) / a.shape[0]), _squeeze(_gram(g) * x.shape[0])


class _OutputGradStat(torch.autograd.Function):
    """Identity on a layer output whose backward also returns ``B · Σ g gᵀ`` (per group) of the output
    gradient ``g`` as the gradient of a probe leaf of G's shape, and 1 for a counter leaf: autograd itself
    accumulates the statistic, with no hook and no Python side effect, so ``torch.compile`` traces it."""

    @staticmethod
    def forward(output: Tensor, probe: Tensor, counter: Tensor, linear: bool, groups: int) -> Tensor:
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, probe, _, ctx.linear, ctx.groups = inputs
        ctx.dtype = probe.dtype

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        gf = g.to(ctx.dtype)
        rows = (
            gf.reshape(-1, 1, g.shape[-1])
            if ctx.linear
            else gf.transpose(1, -1).reshape(-1, ctx.groups, g.shape[1] // ctx.groups)
        )
        return g, _gram(rows) * g.shape[0], gf.new_ones(1), None, None


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------------------------
# the optimizer
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Capture:
    """Statistics of one forward call of one module on a capture step."""

    source: int  # index of the module in _Layer.modules (several when the weight is tied)
    batch: int
    aat: Tensor  # (groups, m, m): Σ ã ãᵀ
    rows: int
    grad_sum: Tensor | None = None  # Σ over backward passes of ∂L/∂z (empirical G of the combined gradient)
    sampled_g: Tensor | None = None  # G from the sampled / Gauss–Newton backward
    output: Tensor | None = None  # kept only in the sampled modes until that backward ran


@dataclass
class _Layer:
    """One preconditioned weight: the modules that use it (more than one when tied) and their captures."""

    name: str
    modules: list[nn.Module]
    weight: Tensor
    bias: Tensor | None
    groups: int
    captures: list[_Capture] = field(default_factory=list)
    probes: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # capture="functional": (G-sum, passes)


@dataclass
class _Stack:
    """Layers of one param group whose blocks have equal shape, with their stacked preconditioner and the
    preallocated buffers of the step.

    ``powers = (alpha, damping, P_A, P_G)`` are the matrices ``(A + λ_A I)^(−α)``, ``(G + λ_G I)^(−α)`` of all
    blocks (cached until the next decomposition or a change of alpha / damping). ``grads`` and ``steps`` are
    ``(blocks, out, in [+1])`` buffers; ``params[i]`` is a weight or bias, ``grad_views[i]`` / ``step_views[i]``
    its slot in ``grads`` / ``steps`` in the parameter's own shape, so one ``_foreach_copy_`` gathers the
    gradients and the directions need no copy."""

    layers: list[_Layer]
    eig: tuple[Tensor, Tensor, Tensor, Tensor] | None  # (d_A, Q_A, d_G, Q_G) stacked, or None (Cholesky)
    powers: tuple[float, float, Tensor, Tensor] | None
    grads: Tensor
    steps: Tensor
    params: list[Tensor]
    grad_views: list[Tensor]
    step_views: list[Tensor]


def _make_stack(layers: list[_Layer], eig: Any, powers: Any, n_out: int, n_in: int, dtype: torch.dtype) -> _Stack:
    w0 = layers[0].weight
    blocks = sum(layer.groups for layer in layers)
    grads = torch.zeros(blocks, n_out, n_in, dtype=dtype, device=w0.device)
    steps = torch.zeros_like(grads)
    params: list[Tensor] = []
    grad_views: list[Tensor] = []
    step_views: list[Tensor] = []
    i = 0
    for layer in layers:
        k = layer.weight[0].numel()
        for buf, views in ((grads, grad_views), (steps, step_views)):
            blk = buf[i : i + layer.groups]
            views.append(blk[..., :k].view(layer.weight.shape))
            if layer.bias is not None:
                views.append(blk[..., k].view(layer.bias.shape))
        params += [layer.weight] if layer.bias is None else [layer.weight, layer.bias]
        i += layer.groups
    return _Stack(layers, eig, powers, grads, steps, params, grad_views, step_views)


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
        self.layers, self._uncovered = self._find_layers(model)
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
    def _find_layers(self, model: nn.Module) -> tuple[list[_Layer], dict[str, str]]:
        """The preconditioned layers (one per weight, tied modules merged) and, for every other module that
        holds a parameter of this optimizer, why it takes plain steps."""
        owned = set(self._group_of)
        users: dict[Tensor, list[tuple[str, nn.Module]]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            for p in m.parameters(recurse=False):
                if p in owned and all(u is not m for _, u in users.get(p, [])):
                    users.setdefault(p, []).append((name, m))
        mha_outs = {
            f"{n}.out_proj" if n else "out_proj"
            for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)
        }

        def reason(name: str, m: nn.Module) -> str | None:
            if name in mha_outs:
                return "out_proj of nn.MultiheadAttention, which calls it functionally (its forward hook never fires)"
            if isinstance(m, nn.MultiheadAttention):
                return "nn.MultiheadAttention's packed in_proj has no Kronecker hook"
            if type(m) not in _LAYER_TYPES and type(m).__name__ != "NonDynamicallyQuantizableLinear":
                return f"{type(m).__name__} is not a Linear/Conv1d/Conv2d layer"
            if m.weight not in owned:
                return "its weight is not among the optimizer's params"
            return None

        uncovered: dict[str, str] = {}
        layers: list[_Layer] = []
        done: set[int] = set()
        for name, m in model.named_modules():
            if id(m) in done or not any(p in owned for p in m.parameters(recurse=False)):
                continue
            why = reason(name, m)
            if why is not None:
                uncovered[name] = why
                continue
            # every module that holds this weight (tied weights) must be a covered layer of the same kind and
            # share the bias too: the statistics of all of them are then those of one layer at more positions
            tied = users[m.weight]
            bias = m.bias if (m.bias is not None and m.bias in owned) else None
            for n2, m2 in tied:
                if m2 is m:
                    continue
                why2 = reason(n2, m2)
                if why2 is not None or type(m2) is not type(m) or _groups(m2) != _groups(m):
                    why = f"its weight is tied to {n2!r} ({type(m2).__name__}), which is not the same kind of layer"
                elif (m2.bias if (m2.bias is not None and m2.bias in owned) else None) is not bias:
                    why = f"its weight is tied to {n2!r} but its bias is not"
            if why is not None:
                uncovered.update({n2: why for n2, _ in tied if n2 not in uncovered})
                done.update(id(m2) for _, m2 in tied)
                continue
            if bias is not None and self._group_of[bias] != self._group_of[m.weight]:
                raise ValueError("a layer's weight and bias must be in the same parameter group")
            done.update(id(m2) for _, m2 in tied)
            names = [n2 for n2, _ in tied]
            layers.append(_Layer(" = ".join(names), [m2 for _, m2 in tied], m.weight, bias, _groups(m)))
        in_model = {p for p in model.parameters()}
        if any(p not in in_model for p in owned):
            uncovered["<outside model>"] = "parameters that are not in `model`"
        return layers, uncovered

    def coverage(self) -> dict[str, dict[str, str]]:
        """``{"preconditioned": {name: kind}, "plain": {name: reason}}`` over the modules holding this
        optimizer's parameters. Tied modules are listed as ``"a = b"``; grouped convolutions as block
        diagonal over their groups."""
        kinds = {}
        for layer in self.layers:
            m = layer.modules[0]
            kind = type(m).__name__ + (f", block-diagonal over {layer.groups} groups" if layer.groups > 1 else "")
            kinds[layer.name] = kind
        return {"preconditioned": kinds, "plain": dict(self._uncovered)}

    # ---- hooks -----------------------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """Whether the current step records curvature statistics (``steps % factor_every == 0``)."""
        return self._capturing

    def _forward_hook(self, layer: _Layer, index: int, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if self._sampling or not self._capturing or not torch.is_grad_enabled():
            return None
        if not isinstance(output, Tensor) or not output.requires_grad:
            return None
        x = inputs[0].detach()
        with torch.no_grad(), _no_autocast(x.device):
            a = layer_inputs(module, _stat(x))
            cap = _Capture(index, x.shape[0], _input_gram(a, layer.bias is not None), a.shape[0])
        layer.captures.append(cap)
        if self.capture == "functional":
            probe, count = layer.probes[index]
            return _OutputGradStat.apply(output, probe, count, isinstance(module, nn.Linear), layer.groups)
        output.register_hook(partial(self._on_grad, cap))
        if self.curvature != "empirical":
            cap.output = output
        return None

    def _on_grad(self, cap: _Capture, g: Tensor) -> None:
        if self._sampling:
            return
        g = _stat(g.detach())
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
        pending = [
            (layer.modules[c.source], c) for layer in self.layers for c in layer.captures if c.output is not None
        ]
        if not outs or not pending:
            return
        targets: list[Tensor] = [c.output for _, c in pending if c.output is not None]
        self._sampling = True
        try:
            with _no_autocast(targets[0].device):
                if self.curvature == "mc_fisher":
                    loss = torch.stack([self._sampled_loss(o) for o in outs]).sum()
                    grads = torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
                    for (m, cap), g in zip(pending, grads):
                        if g is not None:  # loss is a batch mean: δ = B·g, G = Σ δδᵀ / B = B Σ g gᵀ
                            self._add_sampled(cap, _gram(output_rows(m, _stat(g.detach()))) * cap.batch)
                else:  # gn_mse: one backward per output coordinate, G = (1/B) Σ_b Σ_k J_bkᵀ J_bk
                    for o in outs:
                        flat = o.reshape(o.shape[0], -1)
                        for k in range(flat.shape[1]):
                            grads = torch.autograd.grad(flat[:, k].sum(), targets, retain_graph=True, allow_unused=True)
                            for (m, cap), g in zip(pending, grads):
                                if g is not None:
                                    self._add_sampled(cap, _gram(output_rows(m, _stat(g.detach()))) / cap.batch)
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

    def _layer_g(self, layer: _Layer, caps: list[_Capture]) -> Tensor | None:
        """``Ĝ`` of this step: per module the mean over its forward calls of ``B Σ g gᵀ``, summed over the
        modules that share the weight (positions of one layer), times K² under K micro-batches (each loss was
        divided by K, so ``δ = K·B·g``)."""
        k2 = float(self.micro_batches**2)
        total: Tensor | None = None
        for i, m in enumerate(layer.modules):
            mine = [c for c in caps if c.source == i]
            if not mine:
                continue
            if self.capture == "functional":
                probe, count = layer.probes[i]
                stat, passes = probe.grad, count.grad
                probe.grad = count.grad = None
                if stat is None or passes is None:
                    continue
                if int(passes.item()) != len(mine):
                    raise RuntimeError(
                        f"capture='functional' needs one backward pass per forward call, got {int(passes.item())} "
                        f"for {len(mine)} calls of {layer.name!r}; use capture='hook'"
                    )
                g_i = stat / len(mine) * k2
            else:
                parts = []
                for c in mine:
                    if c.sampled_g is not None:
                        parts.append(c.sampled_g)
                    elif c.grad_sum is not None:
                        if self.curvature != "empirical":
                            self._fallbacks += 1
                        parts.append(_gram(output_rows(m, c.grad_sum)) * (c.batch * k2))
                if not parts:
                    continue
                g_i = torch.stack(parts).mean(0)
            total = g_i if total is None else total + g_i
        return total

    def _update_factors(self) -> bool:
        """Fold this step's captures into the running averages. Returns whether any factor was new."""
        beta = self.factor_decay
        fresh = False
        new: list[tuple[_Layer, Tensor, Tensor]] = []
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

    def _use_cholesky(self, layer: _Layer) -> bool:
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
                damped = self._damped_batch(mats, lams.to(mats.device))
                work = damped.to(self.eigh_dtype) if self.eigh_dtype is not None else damped
                chol_l, info = torch.linalg.cholesky_ex(0.5 * (work + work.mT))
                if bool((info == 0).all()):
                    inv = torch.cholesky_inverse(chol_l).to(mats.dtype)
                else:  # not numerically positive definite: the same inverse by eigendecomposition
                    d, q = eig_factor(damped, self.eigh_dtype)
                    inv = (q * _inverse_power(d, 0.0, 1.0).unsqueeze(-2)) @ q.mT
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

    def _damped_batch(self, mats: Tensor, lams: Tensor) -> Tensor:
        n = mats.shape[-1]
        shift = lams
        if self.adaptive_damping:
            shift = lams * (mats.diagonal(dim1=-2, dim2=-1).sum(-1) / n).clamp_min(torch.finfo(mats.dtype).tiny)
        return mats + shift[:, None, None] * torch.eye(n, dtype=mats.dtype, device=mats.device)

    def _stacks(self) -> dict[tuple[int, int, int], _Stack]:
        """Preconditioned layers grouped by (param group, block out, block in), eigenpairs stacked."""
        if not self._stacks_cache:
            groups: dict[tuple[int, int, int], list[_Layer]] = {}
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
                n_a, n_g = key[2], key[1]
                dtype = sts[0]["A"].dtype
                if all("PA" in s for s in sts):
                    p_a = torch.cat([s["PA"].reshape(-1, n_a, n_a) for s in sts])
                    p_g = torch.cat([s["PG"].reshape(-1, n_g, n_g) for s in sts])
                    powers = (float(self.param_groups[key[0]]["alpha"]), float(sts[0]["lamA"]), p_a, p_g)
                    self._stacks_cache[key] = _make_stack(ls, None, powers, n_g, n_a, dtype)
                    continue
                eig = tuple(
                    torch.cat([s[k].reshape(-1, *s[k].shape[-(1 if k[0] == "d" else 2) :]) for s in sts])
                    for k in ("dA", "QA", "dG", "QG")
                )
                self._stacks_cache[key] = _make_stack(ls, eig, None, n_g, n_a, dtype)
        return self._stacks_cache

    def _powers(self, stack: _Stack, alpha: float, lam: float) -> tuple[Tensor, Tensor]:
        """``P_A = (A + λ_A I)^(−α)``, ``P_G = (G + λ_G I)^(−α)`` as matrices, cached until the next decomposition.

        Two matmuls per step (``P_G ∇ P_A``) instead of four rotations; recomputed only when the eigenpairs or
        the (scheduled) ``alpha``/``damping`` change.
        """
        if stack.powers is not None and stack.powers[0] == alpha and stack.powers[1] == lam:
            return stack.powers[2], stack.powers[3]
        assert stack.eig is not None
        d_a, q_a, d_g, q_g = stack.eig
        if self.adaptive_damping:  # λ relative to the mean eigenvalue of each factor
            lam_a: Tensor | float = lam * d_a.mean(-1, keepdim=True).clamp_min(torch.finfo(d_a.dtype).tiny)
            lam_g: Tensor | float = lam * d_g.mean(-1, keepdim=True).clamp_min(torch.finfo(d_g.dtype).tiny)
        else:
            lam_a = lam_g = lam
        p_a = (q_a * _inverse_power(d_a, lam_a, alpha).unsqueeze(-2)) @ q_a.mT
        p_g = (q_g * _inverse_power(d_g, lam_g, alpha).unsqueeze(-2)) @ q_g.mT
        stack.powers = (alpha, lam, p_a, p_g)
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
        for gi, stack in [(k[0], v) for k, v in self._stacks().items()]:
            group = self.param_groups[gi]
            alpha, lam = float(group["alpha"]), float(group["damping"])
            if stack.layers[0].weight.grad is None and all(layer.weight.grad is None for layer in stack.layers):
                continue
            if stack.eig is None and stack.powers is not None and stack.powers[:2] != (alpha, lam):
                # Cholesky inverses but alpha / damping were changed by hand: decompose the current factors again
                self._decompose(only_missing=False)
                return self._directions()
            # a layer without a gradient this step gets a zero block (its step is zero and is not applied)
            srcs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in stack.params]
            torch._foreach_copy_(stack.grad_views, srcs)
            if alpha == 0:  # gradient descent, bit for bit
                stack.steps.copy_(stack.grads)
            else:
                p_a, p_g = self._powers(stack, alpha, lam)
                torch.matmul(torch.matmul(p_g, stack.grads), p_a, out=stack.steps)
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
