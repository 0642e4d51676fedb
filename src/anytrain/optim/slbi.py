"""DessiLBI: Split Linearized Bregman Iteration with momentum (Fu et al., ICML 2020).

The optimizer couples every sparsified weight ``W`` to an auxiliary sparse copy ``Γ`` through the loss
``L(W) + ‖W − Γ‖²/(2ν)`` and moves ``Γ`` along an inverse-scale-space (regularization) path: ``Γ`` starts at
zero, and groups (filters, neurons) enter its support one by one, most important first. ``W* = P_supp(Γ)(W)``,
the weight projected onto ``Γ``'s support, is the sparse network at the current point of the path.

Stability of the coupling step (why ``lr·κ/ν < 1``)
----------------------------------------------------
Write ``r = lr·κ/ν`` and ``e = W − Γ``. The coupling alone (loss gradient set aside) moves
``W ← W − r·e`` and ``Z ← Z + (lr/ν)·e``. Where ``Γ`` is off its support (``‖Z_g‖ ≤ 1``) ``Γ`` stays 0 and
``e ← (1 − r)·e``: stable iff ``0 < r < 2``. Where ``Γ`` is on its support, ``Γ = κ·prox(Z)`` moves with
``Z`` at rate at most ``κ`` (the Jacobian of the lasso prox there is the identity; that of the group prox has
eigenvalues ``1`` radially and ``1 − 1/‖Z_g‖ ∈ (0, 1)`` tangentially), so along the radial/elementwise
direction ``Γ ← Γ + r·e`` and ``e ← (1 − 2r)·e``: stable iff ``0 < r < 1`` (monotone, no oscillation, iff
``r ≤ ½``). Momentum does not enter because the coupling term is added outside the momentum buffer. Hence
the optimizer requires ``lr·κ/ν < 1`` (checked at construction and again at every step, since a scheduler may
raise ``lr``); the loss part adds the usual SGD condition ``lr·κ·λ_max(∇²L) < 2`` on top, which cannot be
checked up front. The authors' settings (``lr=0.1``, ``κ=1``, ``ν=mu ∈ [20, 500]``) give ``r ≤ 0.005``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from anytrain.nets import outputs

# State keys (module constants so tools reading checkpoints agree with the optimizer).
MOMENTUM_BUFFER = "momentum_buffer"
Z = "z"
GAMMA = "gamma"

PENALTIES = ("auto", "lasso", "group", "none")
GROUP_BY = ("out", "in")
DECAY = ("torch", "authors")


def soft_threshold(z: Tensor, threshold: float = 1.0) -> Tensor:
    """Elementwise soft-thresholding ``sign(z)·max(|z| − t, 0)``: the prox of ``t·‖·‖₁``.

    Example:
        >>> soft_threshold(torch.tensor([-2.0, 0.5, 1.5]))
        tensor([-1.0000,  0.0000,  0.5000])
    """
    return torch.nn.functional.softshrink(z, threshold) if threshold > 0 else z.clone()


def group_norms(z: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """Euclidean norm of each group of ``z``, the groups being indexed by dimension ``dim``
    (``dim=0`` on a conv weight: one norm per output filter; ``dim=1``: one per input channel)."""
    if z.dim() <= 1:
        return z.abs()
    others = [d for d in range(z.dim()) if d != dim % z.dim()]
    return torch.linalg.vector_norm(z, dim=others, keepdim=keepdim)


def group_soft_threshold(z: Tensor, dim: int = 0, threshold: float = 1.0) -> Tensor:
    """Group soft-thresholding ``max(0, 1 − t/‖z_g‖)·z_g``: the prox of ``t·Σ_g ‖z_g‖₂``.

    Groups are indexed by ``dim``; one ``vector_norm`` over the other dimensions computes every group norm
    at once. A zero group stays zero (``1/0 = inf`` is clamped, no NaN).

    Example:
        >>> group_soft_threshold(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
        tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]])
    """
    if z.dim() <= 1:
        return soft_threshold(z, threshold)
    norms = group_norms(z, dim, keepdim=True)
    return z * (1.0 - threshold / norms).clamp_min_(0.0)


def _prox_into(out: Tensor, z: Tensor, kappa: float, group_dim: int | None) -> None:
    """``out ← κ·prox(z)`` in place (lasso when ``group_dim`` is None, group lasso over ``group_dim``)."""
    if group_dim is None or z.dim() <= 1:
        torch.mul(torch.nn.functional.softshrink(z, 1.0), kappa, out=out)
    else:
        scale = (1.0 - 1.0 / group_norms(z, group_dim, keepdim=True)).clamp_min_(0.0).mul_(kappa)
        torch.mul(z, scale, out=out)


def slbi(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_bufs: list[Tensor | None],
    zs: Sequence[Tensor | None],
    gammas: Sequence[Tensor | None],
    *,
    lr: float,
    kappa: float,
    nu: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    group_dims: Sequence[int | None] | None = None,
    decay: str = "torch",
) -> None:
    """One DessiLBI step on lists of tensors, in place (the functional core of :class:`SLBI`).

    For every tensor ``i`` (``d`` is the gradient after weight decay and momentum):

    - plain (``zs[i] is None``):  ``W ← W − lr·κ·d``
    - sparsified, with ``e = W − Γ`` taken before the step:
      ``W ← W − lr·κ·(d + e/ν)``,  ``Z ← Z + lr·e/ν``,  ``Γ ← κ·prox(Z)``

    ``prox`` is soft-thresholding at 1 when ``group_dims[i] is None`` (lasso) and group soft-thresholding with
    groups indexed by dimension ``group_dims[i]`` otherwise. ``momentum_bufs`` entries that are ``None`` are
    created (as a copy of the gradient, like torch's SGD) and written back into the list. ``nu = inf`` gives
    exactly SGD with step ``lr·κ`` (``Z`` and ``Γ`` stay 0).

    ``decay`` is the weight-decay convention (``b`` the momentum buffer, ``m`` the momentum, ``τ`` the dampening):

    - ``"torch"`` (as ``torch.optim.SGD``): every tensor is decayed and the decay is dampened with the gradient,
      ``b ← m·b + (1 − τ)·(∇L + wd·W)``.
    - ``"authors"`` (as the released DessiLBI optimizer): 1-D tensors (biases, norm layers) are not decayed,
      and the decay enters the buffer undampened, ``b ← m·b + (1 − τ)·∇L + wd·W``.

    Both start the buffer at the first step's direction and give ``d = b``; without momentum both give
    ``d = ∇L + wd·W`` (on the decayed tensors).
    """
    if decay not in DECAY:
        raise ValueError(f"slbi: unknown decay convention {decay!r}; known: {', '.join(DECAY)}")
    if decay == "authors" and nesterov:
        raise ValueError("slbi: decay='authors' has no Nesterov variant (the released optimizer has none)")
    n = len(params)
    if not (len(grads) == len(momentum_bufs) == len(zs) == len(gammas) == n):
        raise ValueError("slbi: params, grads, momentum_bufs, zs and gammas must have the same length")
    if n == 0:
        return
    dims: Sequence[int | None] = group_dims if group_dims is not None else [None] * n
    # torch: d = ∇L + wd·W, then heavy-ball momentum (as torch.optim.SGD does it).
    # authors: heavy-ball momentum on ∇L, then wd·W added to the buffer itself (1-D tensors not decayed).
    torch_decay = decay == "torch" and weight_decay != 0
    d = torch._foreach_add(grads, params, alpha=weight_decay) if torch_decay else list(grads)
    if momentum != 0:
        missing = [i for i, b in enumerate(momentum_bufs) if b is None]
        have = [i for i, b in enumerate(momentum_bufs) if b is not None]
        for i in missing:
            momentum_bufs[i] = torch.clone(d[i]).detach()
        if have:
            bufs = [cast(Tensor, momentum_bufs[i]) for i in have]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [d[i] for i in have], alpha=1.0 - dampening)
        full = [cast(Tensor, b) for b in momentum_bufs]
        d = torch._foreach_add(d, full, alpha=momentum) if nesterov else full
    if decay == "authors" and weight_decay != 0:
        decayed = [i for i in range(n) if params[i].dim() != 1]
        if decayed:
            w_d = [params[i] for i in decayed]
            if momentum == 0:
                d = list(d)
                for i, t in zip(decayed, torch._foreach_add([d[i] for i in decayed], w_d, alpha=weight_decay)):
                    d[i] = t
            else:  # into the buffer itself, so it carries over to later steps
                torch._foreach_add_([d[i] for i in decayed], w_d, alpha=weight_decay)
    sparse = [i for i in range(n) if zs[i] is not None]
    coupled = math.isfinite(nu) and bool(sparse)
    if coupled:
        w_s = [params[i] for i in sparse]
        z_s = [cast(Tensor, zs[i]) for i in sparse]
        g_s = [cast(Tensor, gammas[i]) for i in sparse]
        e = torch._foreach_sub(w_s, g_s)  # W − Γ before this step's update
    # W ← W − lr·κ·d (every tensor), then the coupling term outside the momentum buffer.
    torch._foreach_add_(params, d, alpha=-lr * kappa)
    if coupled:
        torch._foreach_add_(w_s, e, alpha=-lr * kappa / nu)
        torch._foreach_add_(z_s, e, alpha=lr / nu)
        for z, g, i in zip(z_s, g_s, sparse):
            _prox_into(g, z, kappa, dims[i])


def resolve_penalty(p: Tensor, penalty: str | None, group_by: str) -> tuple[bool, int | None]:
    """(sparsified?, group dim or None for lasso) for a tensor under a param group's ``penalty``."""
    if penalty is None or penalty == "none":
        return False, None
    if penalty == "auto":  # conv weights: group lasso; linear weights: lasso; vectors (bias, norm): none
        if p.dim() >= 3:
            penalty = "group"
        elif p.dim() == 2:
            penalty = "lasso"
        else:
            return False, None
    if penalty == "lasso" or p.dim() <= 1:
        return True, None
    return True, 0 if group_by == "out" else 1


def check_stability(lr: float, kappa: float, nu: float) -> None:
    """Raise a one-line ``ValueError`` unless ``lr, κ, ν > 0`` and ``lr·κ/ν < 1`` (see the module docstring)."""
    if not lr > 0:
        raise ValueError(f"SLBI: invalid learning rate lr={lr} (need lr > 0)")
    if not (kappa > 0 and math.isfinite(kappa)):
        raise ValueError(f"SLBI: invalid kappa={kappa} (need 0 < kappa < inf)")
    if not nu > 0:
        raise ValueError(f"SLBI: invalid nu (mu)={nu} (need nu > 0)")
    if math.isfinite(nu) and lr * kappa / nu >= 1.0:
        raise ValueError(
            f"SLBI: unstable coupling, lr*kappa/nu = {lr}*{kappa}/{nu} = {lr * kappa / nu:.4g} >= 1 "
            "(need lr*kappa < nu)"
        )


class SLBI(torch.optim.Optimizer):
    r"""DessiLBI (Split LBI with momentum): SGD on ``W`` plus a sparse regularization path ``Γ``.

    Algorithm (one step; ``Z = Γ = 0`` at the start; ``α`` = ``lr``)::

        d   = momentum_SGD_direction(∇L(W) + wd·W)          # torch.optim.SGD semantics
        W'  = W − α·κ·( d + (W − Γ)/ν )                      # coupling added outside the momentum buffer
        Z'  = Z + α·(W − Γ)/ν                                # W, Γ before this step
        Γ'  = κ·prox(Z'),  prox = soft-threshold at 1 (lasso)   or   max(0, 1 − 1/‖Z'_g‖)·Z'_g (group)

    Parameters that are not sparsified (``penalty="none"``; by default biases and norm weights) take the
    plain step ``W' = W − α·κ·d``: the ``ν → ∞`` limit, as in the authors' optimizer, so ``κ`` scales every
    step alike. ``W* = P_supp(Γ)(W)`` is the sparse model at the current point of the path
    (:meth:`projected`, :meth:`projected_model`); ``epoch_metrics()`` reports each layer's fraction of
    non-zero groups of ``Γ``.

    Args:
        params: parameters, ``named_parameters()`` (the names then label the metrics and :meth:`sparsified`), or
            param groups. Per-group options: ``penalty`` (``"auto"``: group lasso for conv
            weights (dim ≥ 3), lasso for 2-D weights, none for vectors; or ``"group"``, ``"lasso"``,
            ``"none"``), ``group_by`` (``"out"``: one group per output filter/neuron, ``"in"``: per input
            channel/feature), ``names`` (layer names for the metrics), and any hyper-parameter below.
        lr: step size α (the authors' ``lr``).
        kappa: κ, the damping factor of the inverse-scale-space dynamics (``kappa``; default 1).
        nu: ν, the coupling strength of ``‖W − Γ‖²/(2ν)`` (the authors' ``mu``; default 100). ``inf``
            decouples ``W`` from ``Γ`` (plain SGD with step ``lr·κ``).
        mu: alias of ``nu`` (the authors' name); give one or the other.
        momentum, dampening, nesterov, weight_decay: as in ``torch.optim.SGD`` (the authors' default
            momentum is 0.9).
        decay: weight-decay convention. ``"torch"`` (default): as ``torch.optim.SGD``, every tensor decayed,
            the decay dampened with the gradient. ``"authors"``: as the released DessiLBI optimizer, no decay
            on 1-D tensors (biases, norm layers) and the decay added to the momentum buffer undampened
            (``b ← m·b + (1 − τ)·∇L + wd·W``); no Nesterov. See :func:`slbi`.

    Stability: ``lr·κ/ν < 1`` is required (derivation in the module docstring of ``anytrain.optim.slbi``).

    Example:
        >>> lin = nn.Linear(3, 2, bias=False)
        >>> opt = SLBI(lin.parameters(), lr=0.1, kappa=1.0, nu=10.0)
        >>> lin(torch.ones(4, 3)).pow(2).mean().backward()
        >>> opt.step()
        >>> float(opt.state[lin.weight]["gamma"].abs().sum())  # Γ starts at 0 and stays 0 for a while
        0.0

    References:
        Fu, Liu, Li, Sun, Zeng & Yao, "DessiLBI: Exploring Structural Sparsity on Deep Network via
        Differential Inclusion Paths", ICML 2020.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        kappa: float = 1.0,
        nu: float | None = None,
        *,
        mu: float | None = None,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        penalty: str = "auto",
        group_by: str = "out",
        decay: str = "torch",
    ) -> None:
        if nu is not None and mu is not None and float(nu) != float(mu):
            raise ValueError(f"SLBI: give nu or its alias mu, not both (nu={nu}, mu={mu})")
        nu = float(nu if nu is not None else (mu if mu is not None else 100.0))
        lr, kappa = float(lr), float(kappa)
        check_stability(lr, kappa, nu)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SLBI: invalid momentum={momentum} (need 0 <= momentum < 1)")
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"SLBI: invalid dampening={dampening} (need 0 <= dampening <= 1)")
        if weight_decay < 0:
            raise ValueError(f"SLBI: invalid weight_decay={weight_decay} (need >= 0)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SLBI: nesterov needs momentum > 0 and dampening = 0")
        defaults = dict(
            lr=lr,
            kappa=kappa,
            nu=nu,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            penalty=penalty,
            group_by=group_by,
            decay=decay,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts written before the decay option existed
            group.setdefault("decay", "torch")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "mu" in param_group:  # the authors' name for nu, per group too
            mu = float(param_group.pop("mu"))
            if "nu" in param_group and float(param_group["nu"]) != mu:
                raise ValueError(f"SLBI: give nu or its alias mu, not both (nu={param_group['nu']}, mu={mu})")
            param_group["nu"] = mu
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_stability(float(group["lr"]), float(group["kappa"]), float(group["nu"]))
        if group["penalty"] not in PENALTIES and group["penalty"] is not None:
            raise ValueError(f"SLBI: unknown penalty {group['penalty']!r}; known: {', '.join(PENALTIES)}")
        if group["group_by"] not in GROUP_BY:
            raise ValueError(f"SLBI: unknown group_by {group['group_by']!r}; known: out, in")
        if group["decay"] not in DECAY:
            raise ValueError(f"SLBI: unknown decay {group['decay']!r}; known: {', '.join(DECAY)}")
        if group["decay"] == "authors" and group["nesterov"]:
            raise ValueError("SLBI: decay='authors' has no Nesterov variant (the released optimizer has none)")
        names = group.get("names")
        if names is not None and len(names) != len(group["params"]):
            raise ValueError(f"SLBI: {len(names)} names for {len(group['params'])} parameters")

    # ---- the step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # A scheduler may have changed lr since construction: keep the coupling stable (host floats only).
            check_stability(float(group["lr"]), float(group["kappa"]), float(group["nu"]))
            params, grads, bufs, zs, gammas, dims = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SLBI does not support sparse gradients")
                state = self.state[p]
                sparse, gdim = resolve_penalty(p, group["penalty"], group["group_by"])
                if sparse and Z not in state:
                    state[Z] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state[GAMMA] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state.get(MOMENTUM_BUFFER))
                zs.append(state.get(Z) if sparse else None)
                gammas.append(state.get(GAMMA) if sparse else None)
                dims.append(gdim)
            slbi(
                params,
                grads,
                bufs,
                zs,
                gammas,
                lr=group["lr"],
                kappa=group["kappa"],
                nu=group["nu"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                group_dims=dims,
                decay=group["decay"],
            )
            if group["momentum"] != 0:
                for p, b in zip(params, bufs):
                    self.state[p][MOMENTUM_BUFFER] = b
        return loss

    # ---- the path -------------------------------------------------------------------------------------
    def _sparse_params(self) -> Iterator[tuple[str, Tensor, int | None]]:
        """(name, param, group dim) of every sparsified parameter that has state."""
        for gi, group in enumerate(self.param_groups):
            names = (
                group.get("names")
                or group.get("param_names")  # SLBI(model.named_parameters(), ...)
                or [f"group{gi}.param{j}" for j in range(len(group["params"]))]
            )
            for name, p in zip(names, group["params"]):
                sparse, gdim = resolve_penalty(p, group["penalty"], group["group_by"])
                if sparse:
                    yield name, p, gdim

    def sparsified(self) -> dict[str, str]:
        """Which tensors this optimizer sparsifies: name → ``"lasso"`` or ``"group"`` (over dim 0 for
        ``group_by="out"``, 1 for ``"in"``: ``"group/dim0"``). Every other tensor takes the plain step. Names come
        from ``named_parameters()`` (or a group's ``names``) when given, else ``group<i>.param<j>``."""
        return {n: "lasso" if d is None else f"group/dim{d}" for n, _, d in self._sparse_params()}

    def support(self, p: Tensor) -> Tensor:
        """Boolean mask of ``p``'s shape: True where ``Γ`` is non-zero (whole groups under group lasso).
        A sparsified parameter that has not been stepped yet has ``Γ = 0``: an all-False mask."""
        for _, q, gdim in self._sparse_params():
            if q is p:
                return self._mask(p, gdim)
        raise KeyError("SLBI.support: parameter is not sparsified by this optimizer")

    def _mask(self, p: Tensor, gdim: int | None) -> Tensor:
        gamma = self.state.get(p, {}).get(GAMMA)
        if gamma is None:
            return torch.zeros_like(p, dtype=torch.bool)
        if gdim is None or gamma.dim() <= 1:
            return gamma != 0
        return (group_norms(gamma, gdim, keepdim=True) > 0).expand_as(gamma)

    def group_support(self) -> dict[str, Tensor]:
        """Per sparsified layer, a boolean vector: which groups (or elements, flattened, under lasso) of
        ``Γ`` are non-zero."""
        out = {}
        for name, p, gdim in self._sparse_params():
            gamma = self.state.get(p, {}).get(GAMMA)
            if gamma is None:
                gamma = torch.zeros_like(p)
            out[name] = (gamma.flatten() != 0) if (gdim is None or gamma.dim() <= 1) else group_norms(gamma, gdim) > 0
        return out

    def epoch_metrics(self) -> dict[str, float]:
        """Fraction of non-zero groups of ``Γ`` per sparsified layer (``support/<name>``) and over all of them
        (``support/all``): one point of the regularization path. Called once per epoch (host syncs here)."""
        sup = self.group_support()
        if not sup:
            return {}
        out = {f"support/{k}": float(v.float().mean()) for k, v in sup.items()}
        total = sum(int(v.numel()) for v in sup.values())
        out["support/all"] = sum(float(v.sum()) for v in sup.values()) / max(total, 1)
        return out

    @contextlib.contextmanager
    def projected(self) -> Iterator[None]:
        """Within the block the sparsified parameters hold ``W* = P_supp(Γ)(W)``; restored on exit.

        Example:
            >>> lin = nn.Linear(3, 2, bias=False)
            >>> opt = SLBI(lin.parameters(), lr=0.1, nu=10.0)
            >>> with opt.projected():
            ...     float(lin.weight.detach().abs().sum())  # Γ = 0 before any step: W* = 0
            0.0
        """
        saved = []
        with torch.no_grad():
            for _, p, gdim in self._sparse_params():
                saved.append((p, p.detach().clone()))
                p.mul_(self._mask(p, gdim))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in saved:
                    p.copy_(w)

    def projected_model(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` whose sparsified weights are ``W*`` (``model`` is left untouched)."""
        masks = {id(p): self._mask(p, gdim) for _, p, gdim in self._sparse_params()}
        out = copy.deepcopy(model)
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), out.named_parameters()):
                if id(p) in masks:
                    q.mul_(masks[id(p)])
        return out


def slbi_param_groups(
    net: nn.Module,
    params: Sequence[nn.Parameter] | None = None,
    *,
    conv: str = "group",
    linear: str = "lasso",
    group_by: str = "out",
    heads: bool = False,
    example_inputs: Tensor | None = None,
    output_layers: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Param groups for :class:`SLBI` from a network: sparsified trunk conv/linear weights vs. the rest.

    ``conv``/``linear``: penalty of conv / linear weights (``"group"``, ``"lasso"`` or ``"none"``).
    ``group_by``: ``"out"`` (per output filter/neuron) or ``"in"`` (per input channel). Biases, norm layers and
    the exit heads are not sparsified unless ``heads=True`` (heads are then treated like the trunk), so no
    output unit of an exit is ever on the path. The heads are: ``net.exits`` on a
    :class:`~anytrain.nets.StagedNet` (whole heads); on any other module, its *output layers* — the conv/linear
    layers whose result reaches an output of the model without passing through another one
    (:func:`anytrain.nets.outputs.output_layers`), found on ``example_inputs`` when given, else by tracing the
    model with ``torch.fx``; or the layers named in ``output_layers``. A model that cannot be traced without an
    input is a one-line ``ValueError`` asking for one of these."""
    for what, v in (("conv", conv), ("linear", linear)):
        if v not in ("group", "lasso", "none"):
            raise ValueError(f"SLBI: {what} penalty must be group, lasso or none, got {v!r}")
    owned = {id(p) for p in (params if params is not None else net.parameters())}
    head_modules: set[int] = set()
    exits: Any = getattr(net, "exits", None)
    if not heads:
        if output_layers is not None:
            head_modules = {id(m) for m in outputs.output_layers_by_name(net, output_layers)}
        elif isinstance(exits, nn.ModuleList):
            head_modules = {id(m) for h in exits for m in h.modules()}
        else:
            head_modules = {id(m) for m in outputs.output_layers(net, example_inputs)}
    sparse: dict[str, list[Any]] = {"group": [], "lasso": []}
    sparse_names: dict[str, list[str]] = {"group": [], "lasso": []}
    seen: set[int] = set()
    for mname, mod in net.named_modules():
        kind = conv if isinstance(mod, nn.modules.conv._ConvNd) else linear if isinstance(mod, nn.Linear) else None
        if kind is None or kind == "none" or id(mod) in head_modules:
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and id(w) in owned and id(w) not in seen:
            seen.add(id(w))
            sparse[kind].append(w)
            sparse_names[kind].append(f"{mname}.weight")
    plain = [p for p in (params if params is not None else net.parameters()) if id(p) not in seen]
    groups: list[dict[str, Any]] = []
    for kind in ("group", "lasso"):
        if sparse[kind]:
            groups.append({"params": sparse[kind], "penalty": kind, "group_by": group_by, "names": sparse_names[kind]})
    if plain:
        groups.append({"params": plain, "penalty": "none"})
    return groups


__all__ = [
    "SLBI",
    "check_stability",
    "group_norms",
    "group_soft_threshold",
    "slbi",
    "slbi_param_groups",
    "soft_threshold",
]
