"""Structured pruning and export: remove zero filters/neurons for real with Torch-Pruning.

Torch-Pruning builds the layer dependency graph (``tp.DependencyGraph``) and groups every set of coupled
channels: a conv's output filters with the following BN entries, the next layers' input channels, every
other conv that writes into the same residual stream, and the exit heads that read the stream. We only decide
*which* channels of each group go:

- **Coupling rule (intersection).** A channel of a group is removed when *every producer* in the group (each
  conv/linear whose output channel is in the group) has an all-zero filter for it in ``W*``, or when *every
  consumer* (each conv/linear reading it) has an all-zero input slice for it. Across a residual add this is
  the intersection of the zero sets of all coupled filters: a stream channel only goes when nothing writes it.
- **Exactness (constant compensation).** A channel whose producers are all zero is not zero after them: BN
  (eval) maps 0 to ``β − γ·μ/σ``, a bias adds a constant, ReLU keeps it. So each consumer receives a
  per-channel *constant* map ``r_c`` from a removed channel. We measure the consumer inputs on probe inputs,
  check they are input-independent and spatially constant, and add their contribution back: folded into the
  bias for a linear layer or an unpadded conv, and as an exact position-dependent map (a conv of the constant
  with the removed kernel slice, cached per input size) for a padded conv. The exported model then equals
  ``W*`` in eval mode up to float rounding; ``compensate=False`` drops the constants (the winning-ticket
  architecture, which is retrained anyway).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from anytrain.nets.outputs import output_layers

LayerTypes = (nn.modules.conv._ConvNd, nn.Linear)

# Layers the exact export understands: each acts on every channel separately (or is a conv/linear layer whose
# channels the plan removes), so a removed channel's constant passes through it unchanged. A layer that mixes
# channels (LayerNorm, GroupNorm, softmax, attention, recurrent layers) would compute something else once a
# channel is gone, so the export refuses it up front.
_PER_CHANNEL_MODULES = (
    "torch.nn.modules.activation",
    "torch.nn.modules.dropout",
    "torch.nn.modules.pooling",
    "torch.nn.modules.padding",
    "torch.nn.modules.flatten",
)
_CHANNEL_MIXING = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.MultiheadAttention)
_SUPPORTED = (*LayerTypes, nn.modules.batchnorm._BatchNorm, nn.Embedding, nn.Identity, nn.Upsample)


def check_exportable(model: nn.Module) -> None:
    """A one-line ``ValueError`` naming the first layer of ``model`` the exact export does not support."""
    for name, m in model.named_modules():
        leaf = next(m.children(), None) is None
        own_params = next(m.parameters(recurse=False), None) is not None
        if not (leaf or own_params):
            continue  # a container: its children are checked
        ok = isinstance(m, _SUPPORTED) or (
            type(m).__module__ in _PER_CHANNEL_MODULES and not isinstance(m, _CHANNEL_MIXING)
        )
        if not ok:
            raise ValueError(
                f"cannot export {name or 'the model'!r} ({type(m).__name__}) exactly: it mixes channels or is "
                "not a layer the pruner knows; supported: conv, linear, batch norm, embedding, per-channel "
                "activations, pooling, dropout, flatten"
            )


def default_probe(example_inputs: Tensor, n: int = 4) -> Tensor:
    """``n`` probe inputs shaped and typed like ``example_inputs``: standard normal for floating-point inputs,
    integers drawn from the range ``example_inputs`` spans (valid token ids) otherwise. Seeded: the same every
    call."""
    gen = torch.Generator().manual_seed(0)
    shape = (n, *example_inputs.shape[1:])
    if example_inputs.is_floating_point():
        return torch.randn(shape, generator=gen).to(example_inputs)
    lo, hi = int(example_inputs.min()), int(example_inputs.max())
    return torch.randint(lo, hi + 1, shape, generator=gen).to(device=example_inputs.device, dtype=example_inputs.dtype)


@dataclass
class PruningPlan:
    """Which channels to remove: per group, the root layer's name and the root channel indices.

    Plans refer to modules by name, so a plan computed on one copy of a network applies to another copy
    with the same architecture (the initial weights, for rewinding a winning ticket)."""

    groups: list[tuple[str, list[int]]] = field(default_factory=list)
    channels: dict[str, int] = field(default_factory=dict)  # root name -> channels in the group before pruning

    @property
    def removed(self) -> int:
        return sum(len(i) for _, i in self.groups)

    @property
    def total(self) -> int:
        return sum(self.channels.values())

    def fraction(self) -> float:
        """Fraction of prunable channels (over all groups) that the plan removes."""
        return self.removed / max(self.total, 1)


def _heads_final_layers(model: nn.Module, example_inputs: Tensor) -> list[nn.Module]:
    """Layers whose outputs are logits, never pruned: the output layers of the model (each conv/linear layer
    whose result reaches an output without passing through another; :func:`anytrain.nets.outputs.output_layers`),
    plus the last conv/linear of each exit head of a staged net."""
    out = output_layers(model, example_inputs)
    exits = getattr(model, "exits", None)
    for h in exits if isinstance(exits, nn.ModuleList) else []:
        layers = [m for m in h.modules() if isinstance(m, LayerTypes)]
        if layers and all(layers[-1] is not m for m in out):
            out.append(layers[-1])
    return out


def _output_shapes(model: nn.Module, x: Tensor) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(t.shape) for t in tree_flatten(model(x))[0] if isinstance(t, Tensor)]


def check_output_shapes(model: nn.Module, pruned: nn.Module, example_inputs: Tensor) -> None:
    """A one-line ``ValueError`` when ``pruned`` answers with other output shapes than ``model`` (an exit that
    lost classes is a silent wrong result)."""
    was = model.training
    model.eval()
    try:
        before = _output_shapes(model, example_inputs)
    finally:
        model.train(was)
    after = _output_shapes(pruned.eval(), example_inputs)
    if len(before) != len(after):
        raise ValueError(f"pruning would change the number of outputs from {len(before)} to {len(after)}: refused")
    for i, (a, b) in enumerate(zip(before, after)):
        if a != b:
            raise ValueError(
                f"pruning would change output {i} (exit {i}) from shape {list(a)} to {list(b)}: refused; keep the "
                "layers that produce outputs out of the plan (SLBI does so by default)"
            )


def build_graph(model: nn.Module, example_inputs: Tensor) -> tp.DependencyGraph:
    was = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
    finally:
        model.train(was)


def _zero_out(m: Any) -> Tensor:
    """Per output channel: is the filter all zero?"""
    w = m.weight.detach()
    return w.flatten(1).abs().sum(1) == 0


def _zero_in(m: Any) -> Tensor:
    """Per input channel: is the slice of every filter all zero? (grouped convs: never)"""
    w = m.weight.detach()
    if isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1:
        return torch.zeros(m.in_channels, dtype=torch.bool, device=w.device)
    return w.transpose(0, 1).flatten(1).abs().sum(1) == 0


def _positions(item: Any, n_root: int) -> list[int]:
    """Map each index of a group item to the root channel it belongs to: Torch-Pruning's ``root_idxs`` when
    it records them (concatenations, splits), else by order (flatten → linear expands each channel into a
    block of consecutive features)."""
    if getattr(item, "root_idxs", None) is not None:
        return [int(i) for i in item.root_idxs]
    idxs = item.idxs
    if len(idxs) % n_root:
        raise ValueError(f"cannot map {len(idxs)} coupled indices onto {n_root} channels")
    k = len(idxs) // n_root
    return [p // k for p in range(len(idxs))]


def zero_channel_plan(model: nn.Module, example_inputs: Tensor, dg: tp.DependencyGraph | None = None) -> PruningPlan:
    """Plan removing every channel whose producers are all zero or whose consumers all ignore it (see the
    module docstring), computed on ``model`` as is (pass the ``W*`` model)."""
    dg = dg or build_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    plan = PruningPlan()
    ignored = _heads_final_layers(model, example_inputs)
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=LayerTypes):
        root = group[0].dep.target.module
        n_root = len(group[0].idxs)
        prod_zero = torch.ones(n_root, dtype=torch.bool)
        cons_zero = torch.ones(n_root, dtype=torch.bool)
        n_cons = 0
        for item in group:
            dep, idxs = item.dep, item.idxs
            m = dep.target.module
            if not isinstance(m, LayerTypes):
                continue
            pos = torch.tensor(_positions(item, n_root))
            ix = torch.tensor([int(i) for i in idxs])
            if dg.is_out_channel_pruning_fn(dep.handler):
                # a root channel is zero only if every coupled filter (and flattened position) is zero
                z = _zero_out(m).cpu()[ix]
                bad = torch.zeros(n_root, dtype=torch.bool).index_put_((pos[~z],), torch.tensor(True))
                prod_zero &= ~bad
            elif dg.is_in_channel_pruning_fn(dep.handler):
                n_cons += 1
                z = _zero_in(m).cpu()[ix]
                bad = torch.zeros(n_root, dtype=torch.bool).index_put_((pos[~z],), torch.tensor(True))
                cons_zero &= ~bad
        if n_cons == 0:
            cons_zero[:] = False
        remove = (prod_zero | cons_zero).nonzero().flatten().tolist()
        if len(remove) == n_root:  # keep one channel so every layer keeps a valid shape
            remove = remove[1:]
        plan.channels[names[root]] = n_root
        if remove:
            plan.groups.append((names[root], remove))
    return plan


class ConstantInputShift(nn.Module):
    """``layer(x) + layer_without_bias(const)``: restores the contribution of removed input channels that
    carried a constant ``r_c`` (exact, including zero-padding borders). The map is cached per input size."""

    removed_weight: Tensor
    const: Tensor
    layer: Any

    def __init__(self, layer: nn.Module, removed_weight: Tensor, const: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("removed_weight", removed_weight.detach().clone())
        self.register_buffer("const", const.detach().clone())
        self._cache: dict[tuple[Any, ...], Tensor] = {}

    def shift(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape[2:]), x.device, x.dtype)
        if self.training or key not in self._cache:
            m = self.layer
            shape = (1, self.const.numel(), *x.shape[2:])
            c = self.const.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2))).expand(shape)
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
            out = conv(c, self.removed_weight.to(x.dtype), None, m.stride, m.padding, m.dilation, 1)
            if self.training:
                return out
            self._cache[key] = out
        return self._cache[key]

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x) + self.shift(x)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _capture_inputs(model: nn.Module, layers: list[nn.Module], x: Tensor) -> dict[nn.Module, Tensor]:
    seen: dict[nn.Module, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.__setitem__(mod, a[0].detach())) for m in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def apply_plan(
    model: nn.Module,
    plan: PruningPlan,
    example_inputs: Tensor,
    *,
    compensate: bool = True,
    probe_inputs: Tensor | None = None,
) -> nn.Module:
    """A pruned deep copy of ``model`` (``model`` is untouched). With ``compensate``, the constant
    contributions of removed channels are added back (see the module docstring) so that the result equals
    ``model`` in eval mode; they are measured on ``probe_inputs`` (default :func:`default_probe`)."""
    if compensate:
        check_exportable(model)
    out = copy.deepcopy(model).eval()
    dg = build_graph(out, example_inputs)
    # (consumer layer, its removed input indices) per group, resolved on the unpruned copy
    consumers: list[tuple[nn.Module, list[int]]] = []
    removed_out: dict[nn.Module, set[int]] = {}
    # resolve every group on the unpruned copy (for the consumers to compensate), then prune them one by
    # one, re-resolving each right before pruning: Torch-Pruning refreshes concat/split offsets per call
    roots = []
    for name, idxs in plan.groups:
        root = out.get_submodule(name)
        handler = dg.get_pruner_of_module(root).prune_out_channels
        roots.append((root, handler, idxs))
        for dep, ix in dg.get_pruning_group(root, handler, idxs):
            m = dep.target.module
            if isinstance(m, LayerTypes) and dg.is_in_channel_pruning_fn(dep.handler):
                consumers.append((m, [int(i) for i in ix]))
            elif isinstance(m, LayerTypes) and dg.is_out_channel_pruning_fn(dep.handler):
                removed_out.setdefault(m, set()).update(int(i) for i in ix)
    shifts: list[tuple[Any, Tensor, Tensor]] = []
    if compensate and consumers:
        probe = probe_inputs if probe_inputs is not None else default_probe(example_inputs)
        merged: dict[Any, list[int]] = {}  # a consumer may read channels of several groups (concat)
        for m, ix in consumers:
            merged.setdefault(m, []).extend(i for i in ix if i not in merged.get(m, []))
        seen = _capture_inputs(out, list(merged), probe)
        for m, ix in merged.items():
            w_all = m.weight.detach()
            live = [i for i in ix if w_all[:, i].abs().sum() > 0]  # zero slices contribute nothing
            if not live:
                continue
            ix = live
            xin = seen[m][:, ix]
            flat = xin.flatten(2) if xin.dim() > 2 else xin.unsqueeze(-1)
            const = flat[0, :, 0]
            tol = 1e-5 * (1 + float(flat.abs().max()))
            if (flat - const.view(1, -1, 1)).abs().max() > tol:
                raise ValueError(
                    f"channels removed from {type(m).__name__} inputs are not constant: "
                    "cannot export exactly (use compensate=False)"
                )
            gone = removed_out.get(m, set())
            kept_out = [o for o in range(w_all.shape[0]) if o not in gone]  # the consumer may lose outputs too
            w = w_all[kept_out][:, ix]
            if const.abs().max() > 0:
                shifts.append((m, w.clone(), const.clone()))
    for root, handler, idxs in roots:
        dg.get_pruning_group(root, handler, idxs).prune()
    names = {m: n for n, m in out.named_modules()}
    for m, w, const in shifts:
        if isinstance(m, nn.Linear) or all(p == 0 for p in m.padding):
            # constant input, no zero padding: the contribution is the same everywhere → fold into the bias
            add = w.flatten(2).sum(2) @ const if w.dim() > 2 else w @ const
            with torch.no_grad():
                if m.bias is None:
                    m.bias = nn.Parameter(add.clone())
                else:
                    m.bias.add_(add)
        else:
            if m.groups != 1:
                raise ValueError("cannot compensate removed inputs of a grouped convolution")
            _set_module(out, names[m], ConstantInputShift(m, w, const))
    check_output_shapes(model, out, example_inputs)
    return out


def export_pruned(
    model: nn.Module, example_inputs: Tensor, *, compensate: bool = True, probe_inputs: Tensor | None = None
) -> tuple[nn.Module, PruningPlan]:
    """Physically remove the zero channels of ``model`` (typically ``SLBI.projected_model(net)``, i.e. W*).

    Args:
        model: the network to export (left untouched).
        example_inputs: one input batch (any dtype: integer token ids work) to trace the layer graph.
        compensate: add back the constant contributions of removed channels so the export is exact.
        probe_inputs: inputs on which those constants are measured and checked to be input-independent; a
            few real samples are best. Default: :func:`default_probe` of ``example_inputs``.

    Returns:
        The smaller module (outputs equal to ``model``'s in eval mode) and the plan.

    Raises:
        ValueError: up front, naming the layer, when ``model`` holds a layer the exact export does not support
            (LayerNorm, GroupNorm, attention, ...; see :func:`check_exportable`); and, one line, when the pruned
            model would answer with another output shape than ``model`` (an exit losing classes). The layers
            that produce the outputs are never pruned by the zero-channel plan.
    """
    if compensate:
        check_exportable(model)
    plan = zero_channel_plan(model, example_inputs)
    return apply_plan(model, plan, example_inputs, compensate=compensate, probe_inputs=probe_inputs), plan


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_inputs: Tensor) -> int:
    """Multiply-adds for one sample (torch FlopCounterMode, eval mode)."""
    from anytrain.nets.flops import macs_of

    was = model.training
    model.eval()
    try:
        return macs_of(model, example_inputs[:1])
    finally:
        model.train(was)


def cpu_latency(
    model: nn.Module,
    x: Tensor,
    repeats: int = 20,
    warmup: int = 3,
    fn: Callable[[nn.Module, Tensor], Any] | None = None,
) -> float:
    """Median seconds of one forward pass of ``x`` in eval mode."""
    fn = fn or (lambda m, t: m(t))
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            fn(model, x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


__all__ = [
    "ConstantInputShift",
    "PruningPlan",
    "apply_plan",
    "build_graph",
    "check_exportable",
    "check_output_shapes",
    "count_macs",
    "count_params",
    "cpu_latency",
    "default_probe",
    "export_pruned",
    "zero_channel_plan",
]
