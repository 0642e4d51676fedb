"""Independent references for OSGD tests (QR-based Gram–Schmidt, brute-force per-exit gradients)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anytrain.nets import StagedNet


def qr_orthogonalize(G: Tensor) -> Tensor:
    """Reference for full-row-rank ``G``: ``Gᵀ = Q R`` gives ``u_k = R_kk q_k`` (the sign ambiguity of a QR
    cancels in the product). Computed in float64."""
    Q, R = torch.linalg.qr(G.double().T)
    return (Q * torch.diagonal(R)).T


def pinv_orthogonalize(G: Tensor, rcond: float = 1e-10) -> Tensor:
    """Reference for any ``G``: ``u_k = g_k − P_k g_k`` with the projector ``P_k`` onto ``span(g_<k)`` from a
    pseudo-inverse (float64); rows below ``rcond`` relative norm are set to zero."""
    G = G.double()
    U = torch.zeros_like(G)
    for k in range(G.shape[0]):
        g = G[k]
        if k:
            A = G[:k]
            g = g - A.T @ (torch.linalg.pinv(A.T, rtol=1e-9) @ g)
        U[k] = g if g.norm() > rcond * max(G[k].norm().item(), 1e-300) else 0.0
    return U


def tiny_net(K: int = 3, width: int = 5, din: int = 4, classes: int = 3, tanh: bool = True) -> StagedNet:
    stages = []
    for k in range(K):
        layers: list[nn.Module] = [nn.Linear(din if k == 0 else width, width)]
        if tanh:
            layers.append(nn.Tanh())
        stages.append(nn.Sequential(*layers))
    return StagedNet(stages, [nn.Linear(width, classes) for _ in range(K)])


def brute_force_grads(net: StagedNet, x: Tensor, y: Tensor) -> tuple[list[nn.Parameter], Tensor, list[list[Tensor]]]:
    """Per-exit gradients by K independent forward+backward passes over *all* trunk parameters."""
    trunk = net.trunk_parameters()
    rows, heads = [], []
    for k in range(net.num_exits):
        loss = nn.functional.cross_entropy(net(x)[k], y)
        g = torch.autograd.grad(loss, trunk + list(net.exit_parameters(k)), allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(trunk + list(net.exit_parameters(k)), g)]
        rows.append(torch.cat([gi.reshape(-1) for gi in g[: len(trunk)]]))
        heads.append(g[len(trunk) :])
    return trunk, torch.stack(rows), heads


def flat_grad(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])
