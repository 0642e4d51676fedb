"""Orthogonalized SGD (OSGD): Gram–Schmidt over the per-exit gradients, earliest exit first.

For a staged network with exits ``1..K`` (earliest first) and per-exit losses ``L_k``, let ``g_k = ∇_θ L_k``
over the parameters the exits share. OSGD updates along

.. math::

    u_1 = g_1, \\qquad u_k = g_k - \\sum_{j<k} \\frac{\\langle u_j, g_k\\rangle}{\\lVert u_j\\rVert^2} u_j,
    \\qquad d = \\sum_k u_k ,

so a later exit may only move the shared parameters in directions that do not interfere (to first order)
with any earlier exit: early exits keep priority. Exit heads get their own exit's gradient.

Everything in the global mode is a function of the ``K×K`` Gram matrix ``M = G Gᵀ``: ``U = C G`` with ``C``
lower-triangular (``C = diag(L) L⁻¹`` for the Cholesky factor ``M = L Lᵀ``), so ``d = (1ᵀ C) G = Σ_k a_k g_k``
and ``d`` is the gradient of ``Σ_k a_k L_k``. That is what makes OSGD (i) a TorchJD *weighting*
(:class:`OSGDWeighting`) and (ii) amortizable: recompute ``a`` every ``N`` steps from K per-exit gradients and
otherwise do one backward pass.

Reference: the anytime-network OSGD rule of the ICML 2020 paper on nested anytime networks (orthogonalized
SGD); this module is our implementation of it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from anytrain.nets.staged import require_staged
from anytrain.rules._base import GradientWeighting, Reduce, check_losses_for
from anytrain.rules._pergrad import GRAD_METHODS, ExitPartition, backward_averaged

MODES = ("global", "per_tensor")


def _check_float(t: Tensor, what: str) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {t.dtype}")


def default_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance below which a residual row counts as zero: ``sqrt(eps)`` of ``dtype``.

    Classical Gram–Schmidt with re-orthogonalization leaves a residual of order ``eps·‖g_k‖`` on a row that
    lies in the span of earlier rows, far below ``sqrt(eps)·‖g_k‖`` (3.5e-4 relative in float32).
    """
    return float(torch.finfo(dtype).eps) ** 0.5


def orthogonalize(G: Tensor, rtol: float | None = None) -> Tensor:
    """Gram–Schmidt the rows of ``G`` in order.

    .. math:: u_k = g_k - \\mathrm{proj}_{\\mathrm{span}(g_1..g_{k-1})}\\, g_k

    Args:
        G: ``K×P`` per-exit gradients, earliest exit first (float32 or float64).
        rtol: a residual with ``‖u_k‖ ≤ rtol·Σ_j |c_kj|·‖g_j‖`` (``u_k = Σ_j c_kj g_j``, ``c_kk = 1``; see
            :func:`osgd_coefficients`) is set to exactly zero (``g_k`` lies in the span of the
            earlier rows); default ``sqrt(eps)`` of ``G``'s dtype, at least ``10·sqrt(eps)`` of float64.

    Returns:
        ``U`` (``K×P``, same dtype): mutually orthogonal rows with ``span(u_1..u_k) = span(g_1..g_k)``; zero
        rows for dependent (or zero) rows, never NaN.

    The same Gram–Schmidt the OSGD rule runs: :func:`osgd_coefficients` of the float64 Gram matrix
    ``G Gᵀ`` gives ``C`` with ``U = C G``.

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
        >>> orthogonalize(G)
        tensor([[1., 0.],
                [0., 1.],
                [0., 0.]])
    """
    if G.dim() != 2:
        raise ValueError(f"orthogonalize expects a K×P matrix, got shape {tuple(G.shape)}")
    _check_float(G, "G")
    tol = max(default_rtol(G.dtype), 10.0 * default_rtol(torch.float64)) if rtol is None else float(rtol)
    Gd = G.to(torch.float64)
    C, _ = osgd_coefficients(Gd @ Gd.T, tol)
    return (C @ Gd).to(G.dtype)


def osgd_coefficients(gram: Tensor, rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """Gram–Schmidt in coefficient space: ``C`` with ``U = C G`` and the squared norms ``‖u_k‖²``.

    Args:
        gram: ``…×K×K`` Gram matrices ``M = G Gᵀ`` (any batch of leading dimensions).
        rtol: relative tolerance: a row with ``‖u_k‖ ≤ rtol·Σ_j |C_kj|·√M_jj`` becomes zero (the right side is
            at least ``rtol·‖g_k‖``; it is the size of the terms that cancel in ``‖u_k‖²``, so the rounding
            error of a residual formed from nearly dependent earlier rows is not mistaken for a new direction);
            default ``10·sqrt(eps)`` of ``gram``'s dtype, since forming ``M`` squares the condition number.

    Returns:
        ``(C, sq_norms)``: ``C`` is ``…×K×K`` lower-triangular with unit diagonal on kept rows and zero rows on
        dropped ones; ``sq_norms`` (``…×K``) are ``‖u_k‖² = C_k M C_kᵀ`` (zero on dropped rows).

    The recursion is the Cholesky-type factorisation ``M = L Lᵀ`` written for semidefinite ``M``
    (``C = diag(L) L⁻¹`` where ``L`` is invertible). It runs in float64 and stays on ``gram``'s device: no
    host synchronisation.
    """
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be …×K×K, got shape {tuple(gram.shape)}")
    _check_float(gram, "gram")
    tol = 10.0 * default_rtol(gram.dtype) if rtol is None else float(rtol)
    M = gram.to(torch.float64)
    M = 0.5 * (M + M.transpose(-1, -2))
    K = M.shape[-1]
    batch = M.shape[:-2]
    C = torch.zeros(*batch, K, K, dtype=M.dtype, device=M.device)
    sq = torch.zeros(*batch, K, dtype=M.dtype, device=M.device)
    inv = torch.zeros(*batch, K, dtype=M.dtype, device=M.device)
    eye = torch.eye(K, dtype=M.dtype, device=M.device)
    diag = torch.diagonal(M, dim1=-2, dim2=-1)
    for k in range(K):
        c = eye[k].expand(*batch, K)
        if k:
            Ck = C[..., :k, :]
            for _ in range(2):  # second pass: re-orthogonalization, as in CGS2
                ip = ((Ck @ M) * c.unsqueeze(-2)).sum(-1)  # <u_j, current row>, j < k
                c = c - ((ip * inv[..., :k]).unsqueeze(-1) * Ck).sum(-2)
        nk = ((c.unsqueeze(-2) @ M).squeeze(-2) * c).sum(-1)
        # ‖u_k‖² = cᵀMc is a sum of terms as large as (Σ_j |c_j|·‖g_j‖)²: its rounding error scales with that,
        # not with ‖g_k‖², once earlier rows are nearly dependent (large coefficients). c_k = 1, so this is
        # never below ‖g_k‖.
        size = (c.abs() * diag.clamp_min(0).sqrt()).sum(-1)
        keep = nk > (tol * size) ** 2
        C[..., k, :] = torch.where(keep.unsqueeze(-1), c, torch.zeros_like(c))
        sq[..., k] = torch.where(keep, nk, torch.zeros_like(nk))
        inv[..., k] = torch.where(keep, 1.0 / torch.where(keep, nk, torch.ones_like(nk)), torch.zeros_like(nk))
    return C, sq


def osgd_weights(gram: Tensor, rescale: bool = False, rtol: float | None = None) -> Tensor:
    """Weights ``a`` with ``Σ_k u_k = aᵀ G`` (``a = 1ᵀ C``), from the Gram matrix alone.

    With ``rescale=True`` each ``u_k`` is first scaled to the norm of ``g_k`` (``a = sᵀ C`` with
    ``s_k = ‖g_k‖/‖u_k‖``, zero for dropped rows). Returned in ``gram``'s dtype, shape ``…×K``.

    Example:
        >>> G = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> osgd_weights(G @ G.T)
        tensor([0., 1.])
    """
    C, sq = osgd_coefficients(gram, rtol)
    return _weights_from(C, sq, gram, rescale)


def _weights_from(C: Tensor, sq: Tensor, gram: Tensor, rescale: bool) -> Tensor:
    if rescale:
        diag = torch.diagonal(gram.to(torch.float64), dim1=-2, dim2=-1)
        s = torch.where(sq > 0, (diag / torch.where(sq > 0, sq, torch.ones_like(sq))).sqrt(), torch.zeros_like(sq))
    else:
        s = (sq > 0).to(C.dtype)
    return (s.unsqueeze(-1) * C).sum(-2).to(gram.dtype)


# ---- the gradient rule ----------------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``w`` (a 0-d tensor on the device)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (w,) = ctx.saved_tensors
        return grad * w.to(grad.dtype), None


def scale_grad(state: Any, w: Tensor) -> Any:
    """Scale the gradient flowing back through every tensor of a state pytree by ``w``."""
    return tree_map(lambda t: _ScaleGrad.apply(t, w) if isinstance(t, Tensor) and t.requires_grad else t, state)


def segment_grams(
    G: Tensor, numels: Sequence[int], support: Sequence[int] | None = None, lengths: Tensor | None = None
) -> Tensor:
    """Per-tensor Gram matrices ``T×K×K`` of a ``K×P`` matrix whose columns form ``T`` contiguous segments of
    ``numels`` columns (one per parameter tensor); ``lengths`` is the same as a tensor on ``G``'s device.

    Loops over K (not over tensors): row ``i`` of every Gram is one segment sum of ``g_i ⊙ g_j`` (``j ≥ i``,
    mirrored by symmetry). ``support[i]``, if given, says row ``i`` is zero beyond that column (exit ``i``
    only reaches stages ``≤ i``) and must be a segment boundary; the products known to vanish are skipped.
    """
    K, P = G.shape
    T = len(numels)
    if lengths is None:
        lengths = torch.tensor(list(numels), device=G.device)
    ends = list(itertools.accumulate(int(n) for n in numels))  # host ints: no device sync
    out = torch.zeros(T, K, K, dtype=G.dtype, device=G.device)
    for i in range(K):
        n = P if support is None else int(support[i])
        if n == 0:
            continue
        cnt = T if n == P else ends.index(n) + 1
        prod = (G[i:, :n] * G[i, :n]).T  # n×(K−i)
        blk = torch.segment_reduce(prod, "sum", lengths=lengths[:cnt], axis=0, unsafe=True)
        out[:cnt, i, i:] = blk
        out[:cnt, i + 1 :, i] = blk[:, 1:]
    return out


def combine_segments(W: Tensor, G: Tensor, lengths: Tensor, support: Sequence[int] | None = None) -> Tensor:
    """``d[p] = Σ_k W[t(p), k] G[k, p]`` for per-segment weights ``W`` (``T×K``), touching only each row's
    support."""
    K, P = G.shape
    d = torch.zeros(P, dtype=G.dtype, device=G.device)
    for k in range(K):
        n = P if support is None else int(support[k])
        if n == 0:
            continue
        wk = torch.repeat_interleave(W[:, k].to(G.dtype), lengths, output_size=P)[:n]
        d[:n].addcmul_(wk, G[k, :n])
    return d


class OSGD(GradientWeighting):
    """Orthogonalized SGD over exits.

    Algorithm (one step; exits in priority order, earliest first)::

        g_k  = ∇_trunk L_k               for k = 1..K   (backward of L_k only reaches stages ≤ k)
        u_k  = g_k − proj_{span(g_1..g_{k−1})} g_k      (global, or per parameter tensor)
        u_k ← u_k · ‖g_k‖/‖u_k‖          if rescale
        trunk.grad = Σ_k u_k ;  head_k.grad = ∇_{head_k} L_k

    Amortized (``amortize=N > 1``, global mode): at steps ``t ≡ 0 (mod N)`` the above runs and caches
    ``a = osgd_weights(G Gᵀ)``; at other steps one backward of ``Σ_k L_k`` runs with the gradient entering the
    trunk from exit ``k`` scaled by ``a_k`` (a scaling node between stage ``k``'s state and head ``k``), so the
    trunk gets ``Σ_k a_k g_k`` and each head still gets its own exit's gradient. This needs a
    :class:`~anytrain.nets.StagedNet` and the forward to go through :meth:`forward` (the trainer does); a step
    whose forward did not raises rather than silently running another update.

    Args:
        mode: ``"global"`` (the whole flattened shared vector) or ``"per_tensor"`` (each parameter tensor
            separately, over the exits that reach it).
        rescale: scale each ``u_k`` to ``‖g_k‖``.
        amortize: recompute the coefficients every ``amortize`` steps (global mode only); 1 = exact.
        rtol: tolerance for dropping dependent rows (see :func:`osgd_coefficients`).
        grad_method: ``"loop"`` or ``"batched"`` per-exit gradients (see ``anytrain.rules._pergrad``).

    Example:
        >>> from anytrain.nets import StagedNet
        >>> net = StagedNet([nn.Linear(3, 4), nn.Linear(4, 4)], [nn.Linear(4, 2), nn.Linear(4, 2)])
        >>> rule = OSGD()
        >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
        >>> losses = [nn.functional.cross_entropy(z, y) for z in rule.forward(net, x)]
        >>> sorted(rule.backward(net, losses))
        ['loss', 'osgd/kept']
    """

    name = "osgd"

    def __init__(
        self,
        mode: str = "global",
        rescale: bool = False,
        amortize: int = 1,
        rtol: float | None = None,
        grad_method: str = "loop",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"osgd mode must be one of {MODES}, got {mode!r}")
        if int(amortize) != amortize or int(amortize) < 1:
            raise ValueError(f"osgd amortize must be an integer ≥ 1, got {amortize!r}")
        if int(amortize) > 1 and mode != "global":
            raise ValueError("osgd amortize > 1 needs mode 'global' (per-tensor weights are not one loss)")
        if grad_method not in GRAD_METHODS:
            raise ValueError(f"osgd grad_method must be one of {GRAD_METHODS}, got {grad_method!r}")
        if rtol is not None and not 0.0 <= float(rtol) < 1.0:
            raise ValueError(f"osgd rtol must be in [0, 1), got {rtol}")
        self.mode = mode
        self.rescale = bool(rescale)
        self.amortize = int(amortize)
        self.rtol = None if rtol is None else float(rtol)
        self.grad_method = grad_method
        self.steps = 0
        self.weights: Tensor | None = None  # cached amortized coefficients a (K,)
        self._seg: tuple[tuple[int, ...], Tensor] | None = None
        self._scaled_forward = False

    def _lengths(self, part: ExitPartition, device: torch.device) -> Tensor:
        key = tuple(part.numels)
        if self._seg is None or self._seg[0] != key or self._seg[1].device != device:
            self._seg = (key, torch.tensor(part.numels, device=device))  # cached: no host-to-device copy per step
        return self._seg[1]

    def _refresh_due(self) -> bool:
        return self.amortize == 1 or self.weights is None or self.steps % self.amortize == 0

    def needs_forward(self) -> str | None:
        if self.amortize > 1:
            return (
                "osgd with amortize > 1 scales each exit's gradient inside its own forward: call "
                "rule.forward(net, x) and rule.backward(net, losses) on an anytrain.nets.StagedNet"
            )
        return None

    # ---- rule interface ------------------------------------------------------------------------------------
    def bind(self, net: nn.Module) -> None:
        if self.amortize > 1:
            require_staged(net, "osgd with amortize > 1")
        super().bind(net)

    def forward(self, net: nn.Module, x: Tensor) -> list[Tensor]:
        self._scaled_forward = False
        if self.amortize == 1:
            return super().forward(net, x)
        staged = require_staged(net, "osgd with amortize > 1")
        if self._refresh_due():
            return super().forward(net, x)
        assert self.weights is not None
        w = self.weights
        out = [head(scale_grad(s, w[k])) for k, (head, s) in enumerate(zip(staged.exits, staged.states(x)))]
        self._scaled_forward = True
        return out

    def backward(
        self,
        net: nn.Module,
        losses: Sequence[Tensor],
        *,
        reduce: Reduce | None = None,
        scale: Tensor | None = None,
        micro: tuple[int, int] = (0, 1),
    ) -> dict[str, Tensor]:
        check_losses_for(net, losses, self)
        self._check_micro(micro)
        scaled, self._scaled_forward = self._scaled_forward, False
        refresh = self._refresh_due()
        if not refresh and not scaled:
            raise ValueError(
                f"osgd amortize={self.amortize}: step {self.steps} reuses cached weights, which needs the forward "
                "to go through rule.forward(net, x), not net(x)"
            )
        if micro[0] == micro[1] - 1:  # one step per large batch: the schedule of refreshes counts steps
            self.steps += 1
        if not refresh:
            vec = torch.stack(list(losses))
            # trunk gets Σ a_k g_k through the scaling nodes; heads their own gradient; linear in the losses (so
            # micro-batches add up and the loss scale multiplies the seed, as for a loss weighting)
            seed = vec.sum() if micro[1] == 1 else vec.sum() / micro[1]
            if scale is not None:
                seed = seed * scale
            if reduce is None:
                seed.backward()
            else:
                backward_averaged(seed, net.parameters(), reduce)
            return {"loss": vec.detach().sum()}
        return self.combine(list(losses), None, net=net, reduce=reduce, scale=scale, micro=micro)

    def aggregate(self, G: Tensor, part: ExitPartition) -> tuple[Tensor, dict[str, Tensor]]:
        if self.mode == "global":
            gram = G @ G.T
            C, sq = osgd_coefficients(gram, self.rtol)
            w = _weights_from(C, sq, gram, self.rescale)
            direction = w @ G
            kept = (sq > 0).sum()
            if self.amortize > 1:
                self.weights = w.detach()
        else:
            lengths = self._lengths(part, G.device)
            grams = segment_grams(G, part.numels, part.trunk_offset, lengths)  # T×K×K
            C, sq = osgd_coefficients(grams, self.rtol)
            W = _weights_from(C, sq, grams, self.rescale)  # T×K
            direction = combine_segments(W, G, lengths, part.trunk_offset)
            kept = (sq > 0).to(G.dtype).mean(0).sum()  # mean over tensors of the number of kept rows
        return direction, {"osgd/kept": kept.to(G.dtype)}

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "weights": None if self.weights is None else self.weights.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        w = state.get("weights")
        self.weights = None if w is None else w.clone()

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, rescale={self.rescale}, amortize={self.amortize}, rtol={self.rtol}, "
            f"grad_method={self.grad_method!r}"
        )
