"""Deep linear networks: the exactly solvable testbed of curvature-corrected learning (Huh, ICML 2020).

Student ``W_tot = W_L ⋯ W_1`` learns a teacher map ``M`` from whitened inputs (``E[x xᵀ] = I``) under the
population loss ``L = ½ E‖M x − W_tot x‖² = ½‖W_tot − M‖²_F + const``. With ``E = W_tot − M`` and the partial
products ``W_{<l} = W_{l−1} ⋯ W_1``, ``W_{>l} = W_L ⋯ W_{l+1}``::

    ∇_l = W_{>l}ᵀ E W_{<l}ᵀ                                     (gradient of layer l)
    A_l = W_{<l} W_{<l}ᵀ,   G_l = W_{>l}ᵀ W_{>l}                (exact Gauss–Newton factors: GN_ll = A_l ⊗ G_l)

Rules compared (all on the same functions, float64):
    ``gd``          Δ_l = ∇_l
    ``fractional``  Δ_l = (G_l + λI)^(−α) ∇_l (A_l + λI)^(−α)  (α = 1: NGD-d, α = ½: partial correction)
    ``ngd``         full natural gradient, the pseudo-inverse of the whole Gauss–Newton matrix: with
                    ``J = ∂vec(W_tot)/∂θ``, ``Δθ = (JᵀJ)⁺ Jᵀ vec(E) = J⁺ vec(E)`` (λ > 0: ``(JᵀJ + λI)⁻¹Jᵀ vec(E)``)

Weight balance ``D_l = W_{l+1}ᵀ W_{l+1} − W_l W_lᵀ`` is conserved by any flow ``dW_l/dt = −W_{>l}ᵀ X W_{<l}ᵀ``
with one matrix ``X`` shared by all layers (then ``W_{l+1}ᵀ dW_{l+1} = dW_l W_lᵀ``). Gradient flow has this form
(``X = E``) and so does full natural-gradient flow (``Δθ = Jᵀ (J Jᵀ + λI)⁺ vec(E)``, ``X`` = that vector as a
matrix): both conserve balance exactly in continuous time. Block-diagonal NGD and the fractional rules
precondition each layer separately and do not. ``balance_rate`` computes ``dD_l/dt`` of a direction.

A gradient-descent *step* changes the balance by exactly ``η² (∇_{l+1}ᵀ ∇_{l+1} − ∇_l ∇_lᵀ)`` (the first-order
terms cancel), so the drift of GD is O(η²) per step and O(η) at a fixed time ``η·t``; a finite NGD step can
drift much more (its steps are large where ``J`` is small). ``simulate`` runs finite steps; ``integrate`` runs
the flow with an adaptive ODE solver (SciPy's ``solve_ivp``, DOP853) and records every accepted solver step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from anytrain.optim.curvature import precondition

__all__ = [
    "Teacher",
    "make_teacher",
    "init_student",
    "product",
    "gradients",
    "gn_factors",
    "full_gn_jacobian",
    "balance",
    "mode_strengths",
    "direction",
    "balance_rate",
    "step",
    "simulate",
    "integrate",
    "whitened_inputs",
]

DTYPE = torch.float64
DIVERGED = 1e12  # a loss above this (or non-finite) counts as divergence in ``simulate``


@dataclass
class Teacher:
    """``M = U diag(s) Vᵀ`` (rank ``len(s)``)."""

    M: Tensor
    U: Tensor
    s: Tensor
    V: Tensor


def _orthonormal(n: int, k: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))  # unique (Haar) orthonormal columns


def make_teacher(d_out: int, d_in: int, singular_values: Sequence[float], seed: int = 0) -> Teacher:
    """A low-rank teacher with the given singular values and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.tensor(list(singular_values), dtype=DTYPE)
    u, v = _orthonormal(d_out, len(s), gen), _orthonormal(d_in, len(s), gen)
    return Teacher(u @ torch.diag(s) @ v.T, u, s, v)


def whitened_inputs(n: int, d: int, seed: int = 0) -> Tensor:
    """``X`` of shape ``(n, d)`` with exactly ``XᵀX / n = I`` (``n ≥ d``)."""
    gen = torch.Generator().manual_seed(seed)
    q = _orthonormal(n, d, gen)
    return q * n**0.5


def init_student(dims: Sequence[int], scale: float, seed: int = 0) -> list[Tensor]:
    """``W_l`` of shape ``(dims[l+1], dims[l])`` with i.i.d. ``N(0, scale²/dims[l])`` entries."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o, i, generator=gen, dtype=DTYPE) * scale / i**0.5 for i, o in zip(dims[:-1], dims[1:])]


def product(ws: Sequence[Tensor], lo: int, hi: int) -> Tensor:
    """``W_{hi−1} ⋯ W_lo`` (identity of size ``ws[lo].shape[1]`` when ``lo == hi``)."""
    if lo >= hi:
        n = ws[lo].shape[1] if lo < len(ws) else ws[-1].shape[0]
        return torch.eye(n, dtype=ws[0].dtype)
    out = ws[lo]
    for w in ws[lo + 1 : hi]:
        out = w @ out
    return out


def gradients(ws: Sequence[Tensor], M: Tensor) -> list[Tensor]:
    """``∇_l = W_{>l}ᵀ (W_tot − M) W_{<l}ᵀ`` for the population loss ``½‖W_tot − M‖²_F``."""
    err = product(ws, 0, len(ws)) - M
    return [product(ws, l + 1, len(ws)).T @ err @ product(ws, 0, l).T for l in range(len(ws))]


def gn_factors(ws: Sequence[Tensor], cov_x: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """Exact Kronecker factors ``(A_l, G_l) = (W_{<l} Σ_x W_{<l}ᵀ, W_{>l}ᵀ W_{>l})`` of the GN diagonal blocks."""
    out = []
    for l in range(len(ws)):
        below = product(ws, 0, l)
        a = below @ below.T if cov_x is None else below @ cov_x @ below.T
        above = product(ws, l + 1, len(ws))
        out.append((a, above.T @ above))
    return out


def full_gn_jacobian(ws: Sequence[Tensor]) -> Tensor:
    """``J = ∂vec(W_tot)/∂θ`` (row-major vec, θ = all weights concatenated): ``GN = JᵀJ`` for whitened inputs.

    ``∂W_tot = W_{>l} ∂W_l W_{<l}``, so in row-major vec the block of layer ``l`` is ``W_{>l} ⊗ W_{<l}ᵀ``.
    """
    blocks = [torch.kron(product(ws, l + 1, len(ws)), product(ws, 0, l).T.contiguous()) for l in range(len(ws))]
    return torch.cat(blocks, dim=1)


def balance(ws: Sequence[Tensor]) -> list[float]:
    """``‖W_{l+1}ᵀ W_{l+1} − W_l W_lᵀ‖_F`` for each pair of adjacent layers."""
    return [float(torch.linalg.matrix_norm(b.T @ b - a @ a.T)) for a, b in zip(ws[:-1], ws[1:])]


def mode_strengths(ws: Sequence[Tensor], teacher: Teacher) -> Tensor:
    """Learned strength of each teacher mode, ``u_iᵀ W_tot v_i`` (→ ``s_i`` at convergence)."""
    return torch.einsum("oi,oj,ji->i", teacher.U, product(ws, 0, len(ws)), teacher.V)


def direction(ws: Sequence[Tensor], M: Tensor, rule: str, alpha: float = 0.5, damping: float = 0.0) -> list[Tensor]:
    """``Δ_l`` of ``gd``, ``fractional`` (exponent ``alpha``) or ``ngd`` (full, pseudo-inverse): a step is
    ``W_l ← W_l − η Δ_l``, the flow ``dW_l/dt = −Δ_l``."""
    grads = gradients(ws, M)
    if rule == "gd":
        dirs = grads
    elif rule == "fractional":
        dirs = [precondition(g, a, gg, alpha, damping) for g, (a, gg) in zip(grads, gn_factors(ws))]
    elif rule == "ngd":
        J = full_gn_jacobian(ws)
        err = (product(ws, 0, len(ws)) - M).reshape(-1)
        if damping > 0:  # (JᵀJ + λI)⁻¹ Jᵀ e = Jᵀ (J Jᵀ + λI)⁻¹ e: solve in the smaller output space
            flat = J.T @ torch.linalg.solve(J @ J.T + damping * torch.eye(J.shape[0], dtype=J.dtype), err)
        else:
            flat = torch.linalg.pinv(J) @ err
        dirs, i = [], 0
        for w in ws:
            dirs.append(flat[i : i + w.numel()].reshape(w.shape))
            i += w.numel()
    else:
        raise ValueError(f"unknown rule {rule!r} (gd, fractional, ngd)")
    return dirs


def step(ws: list[Tensor], M: Tensor, rule: str, lr: float, alpha: float = 0.5, damping: float = 0.0) -> list[Tensor]:
    """One step ``W_l ← W_l − lr·Δ_l`` of ``rule`` (see :func:`direction`)."""
    return [w - lr * d for w, d in zip(ws, direction(ws, M, rule, alpha, damping))]


def balance_rate(ws: Sequence[Tensor], dirs: Sequence[Tensor]) -> list[Tensor]:
    """``dD_l/dt`` along the flow ``dW_l/dt = −dirs[l]``, with ``D_l = W_{l+1}ᵀ W_{l+1} − W_l W_lᵀ``."""
    out = []
    for l in range(len(ws) - 1):
        a, b, da, db = ws[l], ws[l + 1], -dirs[l], -dirs[l + 1]
        out.append(db.T @ b + b.T @ db - da @ a.T - a @ da.T)
    return out


@dataclass
class History:
    """What ``simulate`` records every ``record_every`` steps and ``integrate`` at every accepted solver step:
    the step index, the time (``lr·step`` for finite steps), loss, mode strengths and balance."""

    steps: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    modes: list[list[float]] = field(default_factory=list)
    balance: list[list[float]] = field(default_factory=list)
    diverged_at: int | None = None
    weights: list[Tensor] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "times": self.times,
            "loss": self.loss,
            "modes": self.modes,
            "balance": self.balance,
            "diverged_at": self.diverged_at,
        }


def simulate(
    ws: list[Tensor],
    teacher: Teacher,
    rule: str,
    lr: float,
    steps: int,
    alpha: float = 0.5,
    damping: float = 0.0,
    record_every: int = 1,
) -> History:
    """Run ``steps`` steps and record loss ``½‖W_tot − M‖²``, mode strengths and balance."""
    hist = History()
    for t in range(steps + 1):
        err = product(ws, 0, len(ws)) - teacher.M
        loss = 0.5 * float((err**2).sum())
        if not loss < DIVERGED:  # record the blow-up and stop (inf/NaN would follow)
            hist.diverged_at = t
        if t % record_every == 0 or t == steps or hist.diverged_at is not None:
            hist.steps.append(t)
            hist.times.append(lr * t)
            hist.loss.append(loss)
            hist.modes.append(mode_strengths(ws, teacher).tolist())
            hist.balance.append(balance(ws))
        if hist.diverged_at is not None:
            break
        if t < steps:
            ws = step(ws, teacher.M, rule, lr, alpha, damping)
    hist.weights = ws
    return hist


def integrate(
    ws: list[Tensor],
    teacher: Teacher,
    rule: str,
    t_end: float,
    alpha: float = 0.5,
    damping: float = 0.0,
    rtol: float = 1e-9,
    atol: float = 1e-12,
    stop_below: float | None = 1e-9,
) -> History:
    """Integrate the flow ``dW_l/dt = −Δ_l`` of ``rule`` from ``t = 0`` to ``t_end`` with SciPy's DOP853
    (explicit Runge–Kutta of order 8, adaptive steps at tolerances ``rtol``/``atol``), recording loss, modes and
    balance at every accepted solver step. Stops early once the loss is below ``stop_below`` × its initial
    value (``None``: never). ``History.steps`` counts solver steps; ``History.times`` holds the times."""
    import numpy as np
    from scipy.integrate import solve_ivp

    shapes = [w.shape for w in ws]
    sizes = [w.numel() for w in ws]

    def unflatten(y: np.ndarray) -> list[Tensor]:
        parts = torch.split(torch.from_numpy(np.ascontiguousarray(y)).to(DTYPE), sizes)
        return [p.reshape(s) for p, s in zip(parts, shapes)]

    def loss_of(y: np.ndarray) -> float:
        return 0.5 * float(((product(unflatten(y), 0, len(ws)) - teacher.M) ** 2).sum())

    def rhs(_t: float, y: np.ndarray) -> np.ndarray:
        dirs = direction(unflatten(y), teacher.M, rule, alpha, damping)
        return -torch.cat([d.reshape(-1) for d in dirs]).numpy()

    y0 = torch.cat([w.reshape(-1) for w in ws]).numpy()
    loss0 = loss_of(y0)
    events = []
    if stop_below is not None:

        def converged(_t: float, y: np.ndarray) -> float:
            return loss_of(y) - stop_below * loss0

        converged.terminal = True  # type: ignore[attr-defined]
        events.append(converged)
    sol = solve_ivp(rhs, (0.0, float(t_end)), y0, method="DOP853", rtol=rtol, atol=atol, events=events or None)
    if sol.status < 0:
        raise RuntimeError(f"integrate: the ODE solver failed: {sol.message}")
    hist = History()
    for i, (t, y) in enumerate(zip(sol.t, sol.y.T)):
        w = unflatten(y)
        hist.steps.append(i)
        hist.times.append(float(t))
        hist.loss.append(loss_of(y))
        hist.modes.append(mode_strengths(w, teacher).tolist())
        hist.balance.append(balance(w))
    hist.weights = unflatten(sol.y[:, -1])
    return hist
