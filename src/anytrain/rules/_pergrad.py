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
parameters exit ``k`` reaches, plus the gradients of each exit's own (non-shared) parameters.

Which parameters an exit reaches comes from the network's structure for a staged network
(:func:`exit_partition`: stages ``≤ k`` and head ``k``) or, for any model, from the losses' autograd graphs
(:func:`graph_partition`: a walk over the graph nodes, no backward pass). This is the one per-exit gradient
pipeline: OSGD and every TorchJD aggregator read ``G`` from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

GRAD_METHODS = ("loop", "batched")


@dataclass
class ExitPartition:
    """Which parameters each exit reaches.

    ``trunk`` lists the shared parameters ordered by the first exit that reaches them, so exit ``k`` reaches
    parameters within the prefix ``trunk[:trunk_count[k]]`` (flat length ``trunk_offset[k]``; its row of ``G`` is
    zero beyond). ``reach[k]`` is ``None`` when exit ``k`` reaches that whole prefix (a staged network), else the
    sorted indices it does reach. ``heads[k]`` are the other parameters exit ``k`` reaches (its head).
    """

    trunk: list[Tensor]
    trunk_count: list[int]
    heads: list[list[Tensor]]
    reach: list[list[int] | None] | None = None
    numels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.reach is None:
            self.reach = [None] * len(self.heads)
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

    def head_params(self) -> list[Tensor]:
        """Every non-shared parameter, each once."""
        seen: set[int] = set()
        out = []
        for hs in self.heads:
            for p in hs:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out


def exit_partition(net: nn.Module, num_exits: int, what: str = "this rule") -> ExitPartition:
    """Partition a staged network's trainable parameters by exit.

    Stage ``j``'s parameters are shared by exits ``≥ j`` and head ``k`` belongs to exit ``k``; a parameter that
    appears in several stages is assigned to the earliest. Any other module raises: which of its parameters the
    exits share is the caller's to say (``anytrain.rules.backward(losses, rule, shared=...)``).
    """
    stages = getattr(net, "stages", None)
    exits = getattr(net, "exits", None)
    if stages is None or exits is None:
        raise ValueError(
            f"{what} needs to know which parameters the exits share, and {type(net).__name__} has no stages and "
            "exits: call anytrain.rules.backward(losses, rule, shared=trunk_params) or wrap the blocks and heads "
            "in anytrain.nets.StagedNet(stages, exits)"
        )
    if len(stages) != num_exits or len(exits) != num_exits:
        raise ValueError(f"got {num_exits} losses for a network with {len(stages)} exits (one loss per exit)")
    seen: set[int] = set()
    trunk: list[Tensor] = []
    count: list[int] = []
    heads: list[list[Tensor]] = []
    for st in stages:
        for p in st.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                trunk.append(p)
        count.append(len(trunk))
    for h in exits:
        heads.append([p for p in h.parameters() if p.requires_grad and id(p) not in seen])
    return ExitPartition(trunk, count, heads)


def reached_leaves(loss: Tensor) -> list[Tensor]:
    """The leaf tensors (requiring grad) that ``loss``'s autograd graph reaches, in discovery order.

    A walk over the graph's nodes (each visited once); no gradient is computed."""
    if loss.grad_fn is None:
        return [loss] if loss.requires_grad else []
    out: list[Tensor] = []
    seen = {loss.grad_fn}
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None or nxt in seen:
                continue
            seen.add(nxt)
            var = getattr(nxt, "variable", None)  # AccumulateGrad: the node of a leaf tensor
            if var is not None:
                out.append(var)
            else:
                stack.append(nxt)
    return out


def graph_partition(losses: Sequence[Tensor], shared: Sequence[Tensor]) -> ExitPartition:
    """Partition by exit from the losses' autograd graphs: ``shared`` is the trunk; every other leaf a loss
    reaches is that exit's own parameter. One-line ``ValueError`` for a ``shared`` tensor no loss reaches."""
    index = {id(p): i for i, p in enumerate(shared)}
    reach_sets: list[list[int]] = []
    heads: list[list[Tensor]] = []
    for loss in losses:
        leaves = reached_leaves(loss)
        reach_sets.append(sorted({index[id(t)] for t in leaves if id(t) in index}))
        heads.append([t for t in leaves if id(t) not in index])
    first = [len(losses)] * len(shared)
    for k in reversed(range(len(losses))):
        for i in reach_sets[k]:
            first[i] = k
    for i, f in enumerate(first):
        if f == len(losses):
            raise ValueError(
                f"shared tensor {i} (shape {tuple(shared[i].shape)}) is not reached by any loss; "
                "pass only parameters the losses depend on"
            )
    # Order the shared tensors by the first exit reaching them (stable), so a nested structure gives prefixes.
    order = sorted(range(len(shared)), key=lambda i: first[i])
    pos = {i: j for j, i in enumerate(order)}
    count: list[int] = []
    reach: list[list[int] | None] = []
    for rs in reach_sets:
        r = sorted(pos[i] for i in rs)
        n = r[-1] + 1 if r else 0
        count.append(n)
        reach.append(None if len(r) == n else r)
    return ExitPartition([shared[i] for i in order], count, heads, reach)


def per_exit_grads(
    losses: Sequence[Tensor], part: ExitPartition, method: str = "loop"
) -> tuple[Tensor, list[list[Tensor]]]:
    """Gradients of each exit's loss: ``(G, head_grads)``.

    ``G`` is ``K×P`` over ``part.trunk`` (flattened in order; row ``k`` is zero outside what exit ``k`` reaches);
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
    assert part.reach is not None
    if method == "loop":
        for k in range(K):
            n = part.trunk_count[k]
            idx = part.reach[k]
            tin = part.trunk[:n] if idx is None else [part.trunk[i] for i in idx]
            inputs = tin + part.heads[k]
            if not inputs:
                head_grads.append([])
                continue
            grads = torch.autograd.grad(
                losses[k], inputs, retain_graph=k < K - 1, allow_unused=True, materialize_grads=True
            )
            if n:
                rows = list(grads[: len(tin)])
                if idx is not None:  # zeros (expanded views, no memory) where exit k does not reach
                    got = dict(zip(idx, rows))
                    zero = G.new_zeros(())
                    rows = [got.get(i, zero.expand(part.numels[i])) for i in range(n)]
                torch.cat([g.reshape(-1) for g in rows], out=G[k, : part.trunk_offset[k]])
            head_grads.append(list(grads[len(tin) :]))
        return G, head_grads
    # "batched": one vmapped backward of the K-vector of losses over every parameter.
    vec = torch.stack(list(losses))
    eye = torch.eye(K, dtype=vec.dtype, device=vec.device)
    heads_flat = part.head_params()
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
    where = {id(p): grads[len(part.trunk) + i] for i, p in enumerate(heads_flat)}
    for k in range(K):
        head_grads.append([where[id(p)][k] for p in part.heads[k]])
    return G, head_grads


def write_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
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


def reduce_tensors(reduce: Callable[[Tensor], Tensor] | None, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Average several tensors over the ranks with one collective call per dtype and device: flatten into one
    buffer, ``reduce`` it, return views of it shaped like the inputs (the inputs themselves when ``reduce`` is
    ``None``)."""
    if reduce is None or not tensors:
        return list(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out: list[Tensor] = list(tensors)
    for idx in groups.values():
        flat = reduce(torch.cat([tensors[i].reshape(-1) for i in idx]))
        for i, v in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = v.view_as(tensors[i])
    return out


def backward_averaged(total: Tensor, params: Iterable[Tensor], reduce: Callable[[Tensor], Tensor]) -> None:
    """``total.backward()`` into ``params``, what it adds to ``.grad`` averaged over the ranks first (data
    parallelism for a loss that is linear in the per-exit losses)."""
    params = [p for p in params if p.requires_grad]
    got = [(p, g) for p, g in zip(params, torch.autograd.grad(total, params, allow_unused=True)) if g is not None]
    write_grads([p for p, _ in got], reduce_tensors(reduce, [g for _, g in got]))


def reduce_per_exit(
    reduce: Callable[[Tensor], Tensor], G: Tensor, head_grads: Sequence[Sequence[Tensor]]
) -> tuple[Tensor, list[list[Tensor]]]:
    """Average ``G`` and the head gradients over the data-parallel ranks in one collective call, before any
    non-linear combination of the rows."""
    flat_heads = [g for gs in head_grads for g in gs]
    G, *rest = reduce_tensors(reduce, [G, *flat_heads])
    out: list[list[Tensor]] = []
    i = 0
    for gs in head_grads:
        out.append(list(rest[i : i + len(gs)]))
        i += len(gs)
    return G, out


def average_grads_(params: Iterable[Tensor], reduce: Callable[[Tensor], Tensor]) -> None:
    """Average the ``.grad`` of ``params`` over the data-parallel ranks in place (one collective per dtype and
    device). Parameters without a gradient are skipped."""
    grads = [p.grad for p in params if p.grad is not None]
    if any(g.is_sparse for g in grads):
        raise ValueError("data-parallel training does not support sparse gradients")
    if grads:
        torch._foreach_copy_(grads, reduce_tensors(reduce, grads))


def grads_finite(params: Iterable[Tensor]) -> Tensor | None:
    """A 0-d bool tensor: all gradients of ``params`` are finite. One fused pass (``_foreach_norm``, L1), no
    host synchronisation. ``None`` when no parameter has a gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads, 1)
    return torch.isfinite(torch.stack([n.to(norms[0].device, torch.float32) for n in norms]).sum())
