"""Per-exit gradients without waste.

Exit ``k``'s loss depends only on stages ``0..k`` and head ``k``, so the autograd graph of ``L_k`` already stops
at stage ``k``: a backward of ``L_k`` is *truncated* by construction and never touches later stages. The one
forward pass is shared by every exit (``retain_graph=True``). Two ways to run the K backward passes:

``"loop"``
    K calls of ``torch.autograd.grad(L_k, params of stages ≤ k and head k)``. Exactly the unavoidable work
    (Σ_k backward through stages ≤ k); K engine launches.
``"batched"``
    One call of ``torch.autograd.grad`` with ``is_grads_batched=True`` over the stacked losses (vmap over the
    backward). One engine launch, but every stage is differentiated for all K rows, including the rows of
    exits that do not reach it (they come out zero): ``K·Σ_j cost_j`` instead of ``Σ_k Σ_{j≤k} cost_j``, about
    twice the arithmetic for equal-cost stages. Worth it only where launch overhead dominates (small nets on
    a GPU); on CPU ``"loop"`` is faster (see ``benchmarks/results/osgd.md``).

The result is a dense ``K×P`` matrix over the shared (trunk) parameters, whose row ``k`` is zero outside the
parameters of stages ``≤ k``, plus each exit's own head gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from anytrain.rules.base import GradientRule

GRAD_METHODS = ("loop", "batched")


@dataclass
class ExitPartition:
    """Which parameters each exit reaches.

    ``trunk`` lists the shared parameters ordered by the stage that first uses them, so exit ``k`` reaches the
    prefix ``trunk[:trunk_count[k]]`` (flat length ``trunk_offset[k]``). ``heads[k]`` are exit ``k``'s own
    parameters.
    """

    trunk: list[nn.Parameter]
    trunk_count: list[int]
    heads: list[list[nn.Parameter]]
    numels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.numels = [p.numel() for p in self.trunk]
        offs, acc, j = [], 0, 0
        for c in self.trunk_count:
            while j < c:
                acc += self.numels[j]
                j += 1
            offs.append(acc)
        self.trunk_offset = offs

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    @property
    def size(self) -> int:
        return sum(self.numels)


def exit_partition(net: nn.Module, num_exits: int) -> ExitPartition:
    """Partition ``net``'s trainable parameters by exit.

    For a ``StagedNet`` (anything with ``stages`` and ``exits``), stage ``j``'s parameters are shared by exits
    ``≥ j`` and head ``k`` belongs to exit ``k`` alone; a parameter that appears in several stages is assigned
    to the earliest. Any other module is treated as one trunk shared by every exit (no heads): correct, but
    each exit's backward then runs through the whole net.
    """
    seen: set[int] = set()
    trunk: list[nn.Parameter] = []
    count: list[int] = []
    heads: list[list[nn.Parameter]] = []
    stages = getattr(net, "stages", None)
    exits = getattr(net, "exits", None)
    if stages is not None and exits is not None and len(stages) == num_exits:
        for st in stages:
            for p in st.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    trunk.append(p)
            count.append(len(trunk))
        for h in exits:
            hp = [p for p in h.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in hp)
            heads.append(hp)
        return ExitPartition(trunk, count, heads)
    trunk = [p for p in net.parameters() if p.requires_grad]
    return ExitPartition(trunk, [len(trunk)] * num_exits, [[] for _ in range(num_exits)])


def per_exit_grads(
    losses: Sequence[Tensor], part: ExitPartition, method: str = "loop"
) -> tuple[Tensor, list[list[Tensor]]]:
    """Gradients of each exit's loss: ``(G, head_grads)``.

    ``G`` is ``K×P`` over ``part.trunk`` (flattened in order; row ``k`` is zero beyond ``trunk_offset[k]``);
    ``head_grads[k]`` matches ``part.heads[k]``. The autograd graph is freed after the last exit.
    """
    K = len(losses)
    if K != part.num_exits:
        raise ValueError(f"got {K} losses for a partition of {part.num_exits} exits")
    if method not in GRAD_METHODS:
        raise ValueError(f"grad_method must be one of {GRAD_METHODS}, got {method!r}")
    ref = losses[0]
    P = part.size
    G = torch.zeros(K, P, dtype=part.trunk[0].dtype if part.trunk else ref.dtype, device=ref.device)
    head_grads: list[list[Tensor]] = []
    if method == "loop":
        for k in range(K):
            n = part.trunk_count[k]
            inputs = part.trunk[:n] + part.heads[k]
            grads = torch.autograd.grad(
                losses[k], inputs, retain_graph=k < K - 1, allow_unused=True, materialize_grads=True
            )
            if n:
                torch.cat([g.reshape(-1) for g in grads[:n]], out=G[k, : part.trunk_offset[k]])
            head_grads.append(list(grads[n:]))
        return G, head_grads
    # "batched": one vmapped backward of the K-vector of losses over every parameter.
    vec = torch.stack(list(losses))
    eye = torch.eye(K, dtype=vec.dtype, device=vec.device)
    heads_flat = [p for hs in part.heads for p in hs]
    grads = torch.autograd.grad(
        vec,
        part.trunk + heads_flat,
        grad_outputs=eye,
        is_grads_batched=True,
        allow_unused=True,
        materialize_grads=True,
    )
    if part.trunk:
        torch.cat([g.reshape(K, -1) for g in grads[: len(part.trunk)]], dim=1, out=G)
    i = len(part.trunk)
    for k in range(K):
        m = len(part.heads[k])
        head_grads.append([g[k] for g in grads[i : i + m]])
        i += m
    return G, head_grads


def write_grads(params: Sequence[nn.Parameter], grads: Sequence[Tensor]) -> None:
    """Accumulate ``grads`` into ``p.grad`` (assigning where ``p.grad`` is ``None``), as ``backward`` does."""
    acc_p, acc_g = [], []
    for p, g in zip(params, grads):
        if p.grad is None:
            # a view into the rule's flat direction: no copy (split of a contiguous vector stays contiguous)
            p.grad = g.detach().reshape(p.shape)
        else:
            acc_p.append(p.grad)
            acc_g.append(g.reshape(p.shape))
    if acc_p:
        torch._foreach_add_(acc_p, acc_g)


def write_flat(part: ExitPartition, direction: Tensor, head_grads: Sequence[Sequence[Tensor]]) -> None:
    """Write a flat trunk direction and the per-exit head gradients into ``.grad``."""
    if part.trunk:
        write_grads(part.trunk, list(torch.split(direction, part.numels)))
    write_grads([p for hs in part.heads for p in hs], [g for gs in head_grads for g in gs])


def reduce_per_exit(
    rule: GradientRule, G: Tensor, head_grads: Sequence[Sequence[Tensor]]
) -> tuple[Tensor, list[list[Tensor]]]:
    """Average ``G`` and the head gradients over the data-parallel ranks in one collective call
    (``rule.reduce_tensors``), before any non-linear combination of the rows."""
    flat_heads = [g for gs in head_grads for g in gs]
    G, *rest = rule.reduce_tensors([G, *flat_heads])
    out: list[list[Tensor]] = []
    i = 0
    for gs in head_grads:
        out.append(list(rest[i : i + len(gs)]))
        i += len(gs)
    return G, out
