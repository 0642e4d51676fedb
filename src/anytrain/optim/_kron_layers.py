"""Kronecker factors per layer type: one small helper per supported layer, and which modules are covered.

A helper (``LinearLayer``, ``ConvLayer``) is one preconditioned weight with the modules that use it (several
when the weight is tied). It knows its factor math: the rows ``a`` whose second moment is ``A`` (the input of
a Linear, the unfolded receptive fields of a convolution), the output-gradient rows whose second moment is
``G``, and where its weight and bias sit in a ``(groups, out, in [+1])`` gradient block. Every statistic
carries a leading ``groups`` dim: 1, except for grouped convolutions, which get one Kronecker block per group.

Layers: ``nn.Linear`` (inputs of any rank; extra dims count as positions), ``nn.Conv1d``, ``nn.Conv2d`` of any
stride, padding, padding mode and dilation (Grosse & Martens 2016: ``A`` is the mean over samples and positions,
``G`` the mean over samples of the sum over positions); a grouped convolution's blocks are exactly the factors
of one ordinary convolution per group. Tied weights: the modules that share a weight (and its bias) are one
layer applied at more positions — ``A`` averages the rows of all of them, ``G`` sums their per-module
statistics — exactly the factors of the untied equivalent (one module applied to the stacked inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear


def stat(t: Tensor) -> Tensor:
    """Statistics are accumulated in at least float32 (half-precision activations are upcast)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def rows(t: Tensor, channel_dim: int, groups: int) -> Tensor:
    """``(rows, groups, C / groups)``: one row per sample and position, the channels of ``channel_dim`` last."""
    return t.transpose(channel_dim, -1).reshape(-1, groups, t.shape[channel_dim] // groups)


def gram(r: Tensor) -> Tensor:
    """``Σ_rows r rᵀ`` per group: ``(rows, groups, m) -> (groups, m, m)``."""
    if r.shape[1] == 1:  # one group: a plain matmul, no transposed copy of the rows
        r0 = r[:, 0]
        return (r0.T @ r0).unsqueeze(0)
    rt = r.transpose(0, 1)
    return rt.mT @ rt


def input_gram(a: Tensor, with_bias: bool) -> Tensor:
    """``Σ ã ãᵀ`` with ``ã = [a, 1]`` when the layer has a bias, without materializing the column of ones."""
    aat = gram(a)
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


@dataclass
class Capture:
    """Statistics of one forward call of one module on a capture step."""

    source: int  # index of the module in KronLayer.modules (several when the weight is tied)
    batch: int
    aat: Tensor  # (groups, m, m): Σ ã ãᵀ
    rows: int
    grad_sum: Tensor | None = None  # Σ over backward passes of ∂L/∂z (empirical G of the combined gradient)
    sampled_g: Tensor | None = None  # G from the sampled / Gauss–Newton backward
    output: Tensor | None = None  # kept only in the sampled modes until that backward ran


@dataclass(eq=False)
class KronLayer:
    """One preconditioned weight (and bias, if the optimizer owns it), the modules that use it, and the
    optimizer's per-step records of them (``captures``; ``probes`` under ``capture="functional"``)."""

    name: str
    modules: list[nn.Module]
    weight: Tensor
    bias: Tensor | None
    captures: list[Capture] = field(default_factory=list)
    probes: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # capture="functional": (G-sum, passes)
    channel_dim: ClassVar[int] = -1  # the channel dim of the layer's input and output

    @property
    def groups(self) -> int:
        return int(getattr(self.modules[0], "groups", 1))

    @property
    def kind(self) -> str:
        return type(self.modules[0]).__name__ + (
            f", block-diagonal over {self.groups} groups" if self.groups > 1 else ""
        )

    def patches(self, module: nn.Module, x: Tensor) -> Tensor:
        """The input rearranged so that the ``channel_dim`` entries at each position are one row ``a``."""
        return x

    def input_stat(self, module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
        """``(Σ ã ãᵀ, rows)`` of one forward call of ``module`` on input ``x``."""
        a = rows(self.patches(module, stat(x)), self.channel_dim, self.groups)
        return input_gram(a, self.bias is not None), a.shape[0]

    def output_stat(self, g: Tensor, scale: float) -> Tensor:
        """``scale · Σ δ δᵀ`` over the rows of the output gradient ``g``."""
        return gram(rows(stat(g), self.channel_dim, self.groups)) * scale

    def block_views(self, block: Tensor) -> list[Tensor]:
        """Views of a ``(groups, out, in [+1])`` block in the shapes of the weight (and bias, last column)."""
        k = self.weight[0].numel()
        views = [block[..., :k].view(self.weight.shape)]
        return views if self.bias is None else [*views, block[..., k].view(self.bias.shape)]


class LinearLayer(KronLayer):
    """``nn.Linear``: ``a`` is the input, ``δ`` the output gradient, one row per sample and position."""


class ConvLayer(KronLayer):
    """``nn.Conv1d`` / ``nn.Conv2d``: ``a`` is the receptive field at one output position in the weight's
    ``(C_in, k...)`` order, ``δ`` the output gradient at that position (channels first)."""

    channel_dim = 1

    def patches(self, module: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
        # pad explicitly with the module's own padding (covers padding='same' and non-zero padding modes)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-2)
            kernel, dil, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
        else:
            kernel, dil, stride = module.kernel_size, module.dilation, module.stride
        return F.unfold(x, kernel, dilation=dil, padding=0, stride=stride)  # (B, C·k, positions)


# exact types: a subclass may change the forward. MHA's out_proj is reported by name before this is consulted.
HELPERS: dict[type, type[KronLayer]] = {
    nn.Linear: LinearLayer,
    NonDynamicallyQuantizableLinear: LinearLayer,
    nn.Conv1d: ConvLayer,
    nn.Conv2d: ConvLayer,
}


class OutputGradStat(torch.autograd.Function):
    """Identity on a layer output whose backward also returns ``B · Σ g gᵀ`` (per group) of the output
    gradient ``g`` as the gradient of a probe leaf of G's shape, and 1 for a counter leaf: autograd itself
    accumulates the statistic, with no hook and no Python side effect, so ``torch.compile`` traces it."""

    @staticmethod
    def forward(output: Tensor, probe: Tensor, counter: Tensor, channel_dim: int, groups: int) -> Tensor:
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, probe, _, ctx.channel_dim, ctx.groups = inputs
        ctx.dtype = probe.dtype

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        gf = g.to(ctx.dtype)
        return g, gram(rows(gf, ctx.channel_dim, ctx.groups)) * g.shape[0], gf.new_ones(1), None, None


def find_layers(model: nn.Module, owned: set[Tensor]) -> tuple[list[KronLayer], dict[str, str]]:
    """The preconditioned layers of ``model`` (one per weight in ``owned``, tied modules merged) and, for
    every other module that holds a parameter in ``owned``, why it takes plain steps."""
    users: dict[Tensor, list[tuple[str, nn.Module]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            if p in owned and all(u is not m for _, u in users.get(p, [])):
                users.setdefault(p, []).append((name, m))
    mha_outs = {
        f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
    }

    def reason(name: str, m: nn.Module) -> str | None:
        if name in mha_outs:
            return "out_proj of nn.MultiheadAttention, which calls it functionally (its forward hook never fires)"
        if isinstance(m, nn.MultiheadAttention):
            return "nn.MultiheadAttention's packed in_proj has no Kronecker hook"
        if type(m) not in HELPERS:
            return f"{type(m).__name__} is not a Linear/Conv1d/Conv2d layer"
        if m.weight not in owned:
            return "its weight is not among the optimizer's params"
        return None

    def owned_bias(m: nn.Module) -> Tensor | None:
        b = getattr(m, "bias", None)
        return b if isinstance(b, Tensor) and b in owned else None

    uncovered: dict[str, str] = {}
    layers: list[KronLayer] = []
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
        for n2, m2 in tied:
            if m2 is m:
                continue
            if (
                reason(n2, m2) is not None
                or type(m2) is not type(m)
                or getattr(m2, "groups", 1) != getattr(m, "groups", 1)
            ):
                why = f"its weight is tied to {n2!r} ({type(m2).__name__}), which is not the same kind of layer"
            elif owned_bias(m2) is not owned_bias(m):
                why = f"its weight is tied to {n2!r} but its bias is not"
        done.update(id(m2) for _, m2 in tied)
        if why is not None:
            uncovered.update({n2: why for n2, _ in tied if n2 not in uncovered})
            continue
        helper = HELPERS[type(m)]
        layers.append(helper(" = ".join(n2 for n2, _ in tied), [m2 for _, m2 in tied], m.weight, owned_bias(m)))
    in_model = set(model.parameters())
    if any(p not in in_model for p in owned):
        uncovered["<outside model>"] = "parameters that are not in `model`"
    return layers, uncovered
