"""Winning tickets from the regularization path, and the baselines at equal sparsity.

A DessiLBI ticket is the architecture left by ``Γ``'s support at an early-stopping point (``zero_channel_plan``
on ``W*``), with its weights rewound to their initial values (or re-initialised), then retrained. The
baselines remove the same number of channels from every coupled group: by smallest filter norm of a trained
dense net (magnitude pruning), or uniformly at random.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anytrain.sparsity.prune import LayerTypes, PruningPlan, _heads_final_layers, apply_plan, build_graph


def _group_scores(model: nn.Module, example_inputs: Tensor) -> dict[str, Tensor]:
    """Per group (keyed by root name): sum over coupled producers of each channel's filter L2 norm."""
    dg = build_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, Tensor] = {}
    for group in dg.get_all_groups(
        ignored_layers=_heads_final_layers(model, example_inputs), root_module_types=LayerTypes
    ):
        n_root = len(group[0].idxs)
        score = torch.zeros(n_root)
        for dep, idxs in group:
            m = dep.target.module
            if isinstance(m, LayerTypes) and dg.is_out_channel_pruning_fn(dep.handler):
                norms = m.weight.detach().flatten(1).norm(dim=1).cpu()[[int(i) for i in idxs]]
                k = len(idxs) // n_root
                score += norms.view(n_root, k).sum(1)
        out[names[group[0].dep.target.module]] = score
    return out


def magnitude_plan(model: nn.Module, like: PruningPlan, example_inputs: Tensor) -> PruningPlan:
    """Remove, in every group of ``like``, as many channels as ``like`` does: those of smallest norm."""
    scores = _group_scores(model, example_inputs)
    plan = PruningPlan(channels=dict(like.channels))
    for name, idxs in like.groups:
        order = torch.argsort(scores[name], stable=True)
        plan.groups.append((name, sorted(order[: len(idxs)].tolist())))
    return plan


def random_plan(like: PruningPlan, seed: int = 0) -> PruningPlan:
    """Remove, in every group of ``like``, as many channels as ``like`` does, chosen uniformly at random."""
    g = torch.Generator().manual_seed(seed)
    plan = PruningPlan(channels=dict(like.channels))
    for name, idxs in like.groups:
        perm = torch.randperm(like.channels[name], generator=g)
        plan.groups.append((name, sorted(perm[: len(idxs)].tolist())))
    return plan


def make_ticket(
    init_model: nn.Module, plan: PruningPlan, example_inputs: Tensor, *, rewind: bool = True, seed: int = 0
) -> nn.Module:
    """The pruned architecture of ``plan`` with the initial weights of ``init_model`` (``rewind=True``,
    the lottery-ticket rewinding) or freshly initialised ones (``rewind=False``)."""
    ticket = apply_plan(init_model, plan, example_inputs, compensate=False).train()
    if not rewind:
        torch.manual_seed(seed)
        for m in ticket.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return ticket


__all__ = ["magnitude_plan", "make_ticket", "random_plan"]
