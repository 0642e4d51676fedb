"""Which layers of a model produce its outputs (the logits of its exits).

Structured sparsity must never remove an output unit of an exit: a pruned classifier that answers with fewer
classes is a silent wrong result. On a :class:`~anytrain.nets.StagedNet` the heads are ``net.exits``. On a
plain multi-exit ``nn.Module`` we find them from the computation itself:

    **An output layer** is a convolution or linear layer whose result reaches one of the model's outputs
    without passing through another convolution or linear layer.

With an example input this is read off the autograd graph of one forward pass (eval mode, weights that require
grad): walking back from every output tensor, each path stops at the first conv/linear layer it meets. Without
one, the same walk runs over the ``torch.fx`` graph of the model (``symbolic_trace``), which needs no input but
cannot trace data-dependent control flow; then a one-line ``ValueError`` asks for an input or the layer names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def output_layers(model: nn.Module, example_inputs: Tensor | None = None) -> list[nn.Module]:
    """The output layers of ``model`` (see the module docstring).

    Args:
        model: any module whose forward returns a tensor or a list/tuple of tensors (one per exit).
        example_inputs: one input batch; when ``None`` the model is traced with ``torch.fx`` instead.

    Raises:
        ValueError: one line, when the model cannot be traced without an input, or no output layer is found.
    """
    found = _by_autograd(model, example_inputs) if example_inputs is not None else _by_fx(model)
    if not found:
        raise ValueError(
            f"no convolution or linear layer produces an output of {type(model).__name__}: cannot tell its exit heads"
        )
    return found


def output_layers_by_name(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The modules ``names`` of ``model``, each a conv/linear layer (a one-line ``ValueError`` otherwise)."""
    out: list[nn.Module] = []
    for n in names:
        try:
            m = model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"output_layers: {type(model).__name__} has no submodule {n!r}") from None
        if not isinstance(m, LAYERS):
            raise ValueError(f"output_layers: {n!r} is a {type(m).__name__}, expected a convolution or linear layer")
        out.append(m)
    return out


def _by_autograd(model: nn.Module, x: Tensor) -> list[nn.Module]:
    layers = [m for m in model.modules() if isinstance(m, LAYERS)]
    produced: dict[Any, nn.Module] = {}

    def hook(mod: nn.Module, inputs: Any, out: Any) -> None:
        if isinstance(out, Tensor) and out.grad_fn is not None:
            produced.setdefault(out.grad_fn, mod)

    handles = [m.register_forward_hook(hook) for m in layers]
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the layers' weights require grad, so their outputs carry grad_fn nodes
            outs = [t for t in tree_flatten(model(x))[0] if isinstance(t, Tensor)]
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    found: list[nn.Module] = []
    seen: set[Any] = set()
    for t in outs:
        stack = [t.grad_fn] if t.grad_fn is not None else []
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in produced:
                if all(produced[node] is not m for m in found):
                    found.append(produced[node])
                continue
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return found


def _by_fx(model: nn.Module) -> list[nn.Module]:
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # fx raises many kinds (TraceError, TypeError on proxies, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(
            f"cannot tell which layers of {type(model).__name__} produce its outputs without an input (torch.fx: "
            f"{first}); pass example_inputs (one input batch) or output_layers (their names), or wrap the blocks "
            "and heads in anytrain.nets.StagedNet"
        ) from None
    found: list[nn.Module] = []
    seen: set[Any] = set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            if isinstance(m, LAYERS):
                if all(m is not f for f in found):
                    found.append(m)
                continue
        stack.extend(node.all_input_nodes)
    return found


__all__ = ["output_layers", "output_layers_by_name"]
