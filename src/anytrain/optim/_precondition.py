"""The preconditioner core: ``(G + λ_G I)^(−α) ∇ (A + λ_A I)^(−α)`` from the factors or their decompositions.

``precondition_eig`` is the composition of the two stages that ``CurvatureCorrected.step`` runs separately:
``damped_power`` turns a decomposition into the matrix ``(M + λI)^(−α)`` (once per decomposition or change of
α / λ), ``kron_apply`` multiplies a gradient by the two matrices (every step). At α = 1 ``damped_inverse`` gives
the same matrix by Cholesky.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Eig(NamedTuple):
    """``M = Q diag(d) Qᵀ`` of a symmetric PSD factor (batched over leading dims), ``d`` clamped at 0."""

    d: Tensor
    q: Tensor


def eig_factor(factor: Tensor, dtype: torch.dtype | None = None) -> Eig:
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
    return Eig(d.clamp_min(0).to(factor.dtype), q.to(factor.dtype))


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


def damped_power(eig: Eig, alpha: float, damping: Tensor | float) -> Tensor:
    """``(M + λI)^(−α) = Q diag((d + λ)^(−α)) Qᵀ``; ``damping`` a float or a ``(..., 1)`` tensor."""
    return (eig.q * _inverse_power(eig.d, damping, alpha).unsqueeze(-2)) @ eig.q.mT


def damped_inverse(mats: Tensor, shift: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``(M + shift·I)^(−1)`` of a ``(batch, n, n)`` stack (``shift``: ``(batch,)``) by Cholesky, ~5× cheaper than
    ``eigh`` for wide factors; if a damped matrix is not numerically positive definite, by its eigendecomposition
    (pseudo-inverse convention). ``dtype``: factorize in this dtype; the result has ``mats.dtype``."""
    n = mats.shape[-1]
    damped = mats + shift[:, None, None] * torch.eye(n, dtype=mats.dtype, device=mats.device)
    work = damped.to(dtype) if dtype is not None else damped
    chol, info = torch.linalg.cholesky_ex(0.5 * (work + work.mT))
    if bool((info == 0).all()):
        return torch.cholesky_inverse(chol).to(mats.dtype)
    return damped_power(eig_factor(damped, dtype), 1.0, 0.0)


def kron_apply(grad: Tensor, p_a: Tensor, p_g: Tensor, out: Tensor | None = None) -> Tensor:
    """``P_G · grad · P_A`` (batched over leading dims), into ``out`` if given."""
    return torch.matmul(torch.matmul(p_g, grad), p_a, out=out)


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

    Each damped power is ``Q diag((d + λ)^(−α)) Qᵀ`` (``damped_power``), then ``P_G ∇ P_A`` (``kron_apply``).
    Leading dimensions are batch dimensions (several layers of the same shape in one call); the dampings
    broadcast as ``(..., 1)`` tensors or floats. ``alpha == 0`` returns ``grad`` itself (bit-exact gradient
    descent, no rounding from the products).
    """
    if alpha == 0:
        return grad
    return kron_apply(
        grad, damped_power(Eig(d_a, q_a), alpha, damping_a), damped_power(Eig(d_g, q_g), alpha, damping_g)
    )


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
