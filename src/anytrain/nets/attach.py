"""Exits on any backbone: split a user's model at named submodules and attach a head after each.

``attach_exits(model, at=["layer1", "layer2", "layer3"], num_classes=10, input_shape=(3, 32, 32))`` returns a
:class:`StagedNet` whose exit ``k`` reads the output of submodule ``at[k]`` and whose last exit is the model's
own output, unchanged. How:

1. ``torch.export`` captures the model's forward as one graph of aten operations (in train mode, with a dynamic
   batch dimension). It works where ``torch.fx`` symbolic tracing does not (``transformers`` models).
2. The graph is cut after the last operation of each named submodule's call. A stage is the run of
   operations between two cuts; its *state* is every value computed before the cut and still needed after it
   (the residual branch, the CLS token, an attention mask), a tuple whose first entry is the named submodule's
   output (the exit's feature). Parameters and buffers are not state: each stage reads them from the model.
3. A stage runs its operations one by one, except that every call of a *leaf* submodule (no children: Linear,
   Conv, BatchNorm, LayerNorm, Dropout, ...) with one tensor in and one out is replaced by a call of the module
   itself. So the model's parameters are the ones trained (no copies), BatchNorm and Dropout follow the
   module's own ``train()``/``eval()`` (a frozen BatchNorm kept in eval mode stays in eval mode), and forward
   hooks on those layers fire (``CurvatureCorrected`` sees its Linear and Conv layers).

The graph was taken in train mode; a model whose forward branches on ``self.training`` outside those leaf
modules would run its train-mode branch in eval mode too. ``attach_exits`` checks, in eval mode on a sample,
that the last exit equals ``model(x)`` exactly and refuses the model with one line otherwise.

The returned net holds the model as ``net.backbone`` (its state dict keys are ``backbone.<the model's own
keys>`` and ``exits.<k>.*``); ``net.stages[k].parameters()`` are the model's parameters that stage ``k`` uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import Node
from torch.utils import _pytree as pytree

from anytrain.nets.heads import make_head
from anytrain.nets.staged import StagedNet

HeadFactory = Callable[[Sequence[int], int], nn.Module]


# ---- exit heads for token features ---------------------------------------------------------------------------
class TokenHead(nn.Module):
    """Exit head on token features ``(B, T, D)``: pool (the first token, ``cls``, or the mean over tokens,
    ``mean``) → LayerNorm(D) → Linear(D, classes)."""

    def __init__(self, dim: int, num_classes: int, pool: str = "cls") -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"token pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        z = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.fc(self.norm(z))


def default_head(kind: str = "linear", token_pool: str = "cls", **kw: Any) -> HeadFactory:
    """A head factory: ``(B, T, D)`` features (3-D) get a :class:`TokenHead`; ``(B, C, H, W)`` and ``(B, C)``
    features get the registered conv head ``kind`` (``anytrain.nets.heads``)."""

    def build(shape: Sequence[int], num_classes: int) -> nn.Module:
        if len(shape) == 2:
            return TokenHead(int(shape[1]), num_classes, token_pool)
        if len(shape) in (1, 3):
            return make_head(kind, int(shape[0]), num_classes, dims=len(shape) - 1, **kw)
        raise ValueError(f"no exit head for a feature of shape {tuple(shape)} (per sample); pass head=callable")

    return build


# ---- the stage program -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slot:
    index: int  # a value computed earlier in this stage (or one of its inputs)


@dataclass(frozen=True)
class _Lifted:
    index: int  # a parameter, buffer or constant of the model


def _resolve(a: Any, env: list[Any], lifted: list[Tensor]) -> Any:
    if isinstance(a, _Slot):
        return env[a.index]
    if isinstance(a, _Lifted):
        return lifted[a.index]
    if isinstance(a, (list, tuple)):
        return type(a)(_resolve(b, env, lifted) for b in a)
    if isinstance(a, dict):
        return {k: _resolve(v, env, lifted) for k, v in a.items()}
    return a


@dataclass
class _Step:
    fn: Any  # an aten op, or None: call the leaf module ``module`` on ``args[0]``
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    module: nn.Module | None = None


class GraphStage(nn.Module):
    """One stage of an attached net: runs its slice of the exported graph on the state tuple.

    ``mods`` lists the leaf modules this stage calls and ``params`` the model's parameters its graph operations
    use directly (the same objects: the stage partition that DGL, SGL and the trunk/head split read, and the
    layers whose hooks fire). Both are left out of the state dict (``backbone.*`` holds them)."""

    def __init__(
        self,
        steps: list[_Step],
        num_inputs: int,
        outputs: list[int],
        lifted: list[tuple[nn.Module, str]],
        constants: list[Tensor],
        params: list[nn.Parameter],
        mods: list[nn.Module],
        first: bool,
    ) -> None:
        super().__init__()
        self.mods = nn.ModuleList(mods)
        self.params = nn.ParameterList(params)
        for i, c in enumerate(constants):
            self.register_buffer(f"const{i}", c, persistent=False)
        self._n_const = len(constants)
        # the model's modules are reached through plain references, not registered here (net.backbone is)
        self.__dict__["_steps"] = steps
        self.__dict__["_lifted"] = lifted
        self._num_inputs, self._outputs, self._first = num_inputs, outputs, first
        self.register_state_dict_post_hook(_drop_params)
        self.register_load_state_dict_post_hook(_forgive_params)

    def forward(self, state: Any) -> tuple[Any, ...]:
        inputs = (state,) if self._first else tuple(state)
        if len(inputs) != self._num_inputs:
            raise ValueError(f"stage expects a state of {self._num_inputs} values, got {len(inputs)}")
        lifted = [getattr(owner, name) for owner, name in self.__dict__["_lifted"]]
        lifted += [getattr(self, f"const{i}") for i in range(self._n_const)]
        env: list[Any] = list(inputs)
        for s in self.__dict__["_steps"]:
            if s.fn is None:
                assert s.module is not None
                env.append(s.module(_resolve(s.args[0], env, lifted)))
            else:
                env.append(s.fn(*_resolve(s.args, env, lifted), **_resolve(s.kwargs, env, lifted)))
        return tuple(env[i] for i in self._outputs)

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphStage:
        import copy

        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new


def _drop_params(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for k in [k for k in state_dict if k.startswith((prefix + "params.", prefix + "mods."))]:
        del state_dict[k]


def _forgive_params(module: nn.Module, incompatible: Any) -> None:
    own = [k for k in incompatible.missing_keys if any(t in "." + k for t in (".params.", ".mods."))]
    for k in own:
        incompatible.missing_keys.remove(k)


class _Feature(nn.Module):
    """An exit: the head applied to the first entry of the state (the named submodule's output)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, state: tuple[Any, ...]) -> Tensor:
        return self.head(state[0])


class AttachedNet(StagedNet):
    """A :class:`StagedNet` cut out of a user's model by :func:`attach_exits`; ``backbone`` is the model."""

    def __init__(self, backbone: nn.Module, stages: Sequence[nn.Module], exits: Sequence[nn.Module]) -> None:
        super().__init__(stages, exits)
        self.add_module("backbone", backbone)
        # backbone first, so named_parameters() and state_dict() use the model's own names (backbone.*)
        rest = {k: v for k, v in self._modules.items() if k != "backbone"}
        self._modules = {"backbone": backbone, **rest}  # type: ignore[dict-item]

    @property
    def heads(self) -> list[nn.Module]:
        """The exit heads added to the model (the last exit is the model's own output and has none)."""
        return [e.head for e in self.exits if isinstance(e, _Feature)]


# ---- the split -------------------------------------------------------------------------------------------------
_SPLIT_HINT = "split it by hand: StagedNet(stages, exits) over your own blocks"


def _stack(n: Node) -> list[tuple[str, str]]:
    """(call key, module path) of every module on ``n``'s call stack, outermost first."""
    st = n.meta.get("nn_module_stack") or {}
    return [(k, v[0]) for k, v in st.items()]


def _inside(path: str, name: str) -> bool:
    return path == name or path.startswith(name + ".")


def _export(model: nn.Module, sample: Tensor) -> Any:
    batch = torch.export.Dim("batch", min=1)
    was = model.training
    model.train()
    try:
        return torch.export.export(model, (sample,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:  # noqa: BLE001 - any failure to capture is one line naming what failed
        first = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot split {type(model).__name__}: torch.export failed ({first}); {_SPLIT_HINT}") from None
    finally:
        model.train(was)


def _logits_leaf(out_spec: Any) -> int:
    """Which flat output is the model's prediction: the output itself, its ``logits`` field, or its first entry."""
    n = out_spec.num_leaves
    out = pytree.tree_unflatten(list(range(n)), out_spec)
    if isinstance(out, int):
        return out
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        if "logits" in out:
            return int(out["logits"])
    if hasattr(out, "logits"):
        return int(out.logits)
    if isinstance(out, (list, tuple)) and len(out) and isinstance(out[0], int):
        return out[0]
    raise ValueError("the model's output has no tensor prediction (a tensor, .logits or a first entry); " + _SPLIT_HINT)


def attach_exits(
    model: nn.Module,
    at: Sequence[str],
    num_classes: int,
    *,
    input_shape: Sequence[int] | None = None,
    example: Tensor | None = None,
    head: str | HeadFactory = "linear",
    token_pool: str = "cls",
    head_options: dict[str, Any] | None = None,
) -> AttachedNet:
    """Split ``model`` after each submodule named in ``at`` and attach an exit head there.

    Args:
        model: any ``nn.Module`` that ``torch.export`` captures, taking one tensor ``(B, ...)``.
        at: names of submodules (as in ``model.named_modules()``), in the order the forward pass calls them.
        num_classes: outputs of the added heads.
        input_shape: shape of one sample (no batch); or ``example``, a batch to capture and size with.
        head: a conv head kind (``anytrain.nets.heads``) for ``(C, H, W)`` / ``(C,)`` features, or a callable
            ``(feature_shape, num_classes) -> nn.Module``. Token features ``(T, D)`` get a :class:`TokenHead`.
        token_pool: ``cls`` (first token) or ``mean``, for token features.
        head_options: keywords of the conv head kind.

    Returns:
        An :class:`AttachedNet` with ``len(at) + 1`` exits; the last is ``model(x)`` (its logits), unchanged.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        >>> _ = m(torch.zeros(1, 1, 6, 6))
        >>> net = attach_exits(m, at=["1"], num_classes=3, input_shape=(1, 6, 6))
        >>> x = torch.randn(5, 1, 6, 6)
        >>> [o.shape for o in net(x)]
        [torch.Size([5, 3]), torch.Size([5, 3])]
        >>> torch.equal(net(x)[-1], m(x))
        True
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"attach_exits needs an nn.Module, got {type(model).__name__}")
    at = [str(a) for a in at]
    names = dict(model.named_modules())
    for a in at:
        if a not in names or a == "":
            some = ", ".join(n for n in list(names)[1:8] if n)
            raise ValueError(f"{a!r} is not a submodule of {type(model).__name__} (some are: {some})")
    if len(set(at)) != len(at):
        raise ValueError(f"split points must be distinct, got {at}")
    if example is None:
        if input_shape is None:
            raise ValueError("attach_exits needs input_shape (one sample's shape) or example (a batch)")
        p = next(model.parameters(), None)
        example = torch.randn(2, *input_shape, device=p.device if p is not None else None)
    if example.shape[0] < 2:
        example = torch.cat([example, example])  # batch 1 would be specialised by the capture
    head_fn: HeadFactory = head if callable(head) else default_head(head, token_pool, **(head_options or {}))

    ep = _export(model, example)
    sig = ep.graph_signature
    lifted_fqn = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    user_inputs = list(sig.user_inputs)
    if len(user_inputs) != 1:
        raise ValueError(f"attach_exits needs a model of one tensor input, got {len(user_inputs)}; {_SPLIT_HINT}")
    graph = ep.graph_module.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    x_node = placeholders[user_inputs[0]]
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    out_node = next(n for n in graph.nodes if n.op == "output")
    for n in body:
        if n.op != "call_function":
            raise ValueError(
                f"cannot split {type(model).__name__}: its graph has a {n.op} node {n.name!r}; {_SPLIT_HINT}"
            )
    pos = {n: i for i, n in enumerate(body)}
    pos[x_node] = -1

    # cut after the last operation of each named submodule
    cuts: list[int] = []
    features: list[Node] = []
    for a in at:
        mine = [n for n in body if any(_inside(p, a) for _, p in _stack(n))]
        if not mine:
            raise ValueError(f"submodule {a!r} does not appear in the captured graph (never called?)")
        cut = pos[mine[-1]]
        if cuts and cut <= cuts[-1]:
            raise ValueError(f"split points out of order: {a!r} ends before {at[len(cuts) - 1]!r} in the forward pass")
        if cut >= len(body) - 1:
            raise ValueError(f"split point {a!r} is the model's output: the last exit is that already")
        inside = set(mine)
        leaving = [n for n in mine if any(u not in inside for u in n.users)]
        features.append(leaving[-1] if leaving else mine[-1])
        cuts.append(cut)
    bounds = [-1, *cuts, len(body) - 1]

    flat_out = list(out_node.args[0])
    logits = flat_out[_logits_leaf(ep.call_spec.out_spec)]
    if not isinstance(logits, Node):
        raise ValueError(f"the output of {type(model).__name__} is a constant; {_SPLIT_HINT}")

    def last_use(v: Node) -> float:
        return max((math.inf if u.op == "output" else pos[u] for u in v.users), default=-math.inf)

    def is_sym(v: Node) -> bool:
        return isinstance(v.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))

    values = [x_node, *body]
    # state after stage k: the feature first, then every non-symbolic value that is still needed later
    states: list[list[Node]] = []
    for k, cut in enumerate(cuts):
        live = [v for v in values if pos[v] <= cut and last_use(v) > cut and not is_sym(v)]
        states.append([features[k]] + [v for v in live if v is not features[k]])
    # symbolic sizes (the batch size) are recomputed from a state tensor; one that cannot be is carried
    carried = _carried_syms(body, bounds, states, pos, is_sym)
    for k, cut in enumerate(cuts):
        states[k] += [v for v in carried if pos[v] <= cut < last_use(v)]

    owners = {fqn: _owner(model, fqn) for fqn in lifted_fqn.values() if fqn not in ep.constants}
    leaves = _leaf_calls(model, body, lifted_fqn)
    stages: list[nn.Module] = []
    for k in range(len(bounds) - 1):
        seg = body[bounds[k] + 1 : bounds[k + 1] + 1]
        ins = [x_node] if k == 0 else states[k - 1]
        outs = (
            states[k] if k < len(cuts) else [logits] + [v for v in flat_out if isinstance(v, Node) and v is not logits]
        )
        stages.append(_build_stage(seg, ins, outs, k == 0, placeholders, lifted_fqn, owners, ep.constants, leaves))
    exits: list[nn.Module] = []
    net_stages = stages
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            s: Any = example
            for k, st in enumerate(net_stages[:-1]):
                s = st(s)
                feat = s[0]
                if not isinstance(feat, Tensor):
                    raise ValueError(f"the output of {at[k]!r} is not a tensor; {_SPLIT_HINT}")
                h = head_fn(tuple(feat.shape[1:]), num_classes)
                exits.append(_Feature(h.to(device=feat.device)))
            exits.append(_Feature(nn.Identity()))
            net = AttachedNet(model, net_stages, exits)
            got = net(example)[-1]
            want = model(example)
            want = want if isinstance(want, Tensor) else pytree.tree_leaves(want)[_logits_leaf(ep.call_spec.out_spec)]
            if got.shape != want.shape or not torch.equal(got, want):
                raise ValueError(
                    f"{type(model).__name__} in eval mode differs from its graph captured in train mode (a branch on "
                    f"self.training outside BatchNorm/Dropout modules?); {_SPLIT_HINT}"
                )
        finally:
            model.train(was)
    net.train(was)
    return net


def _owner(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    mod, _, name = fqn.rpartition(".")
    return (model.get_submodule(mod) if mod else model), name


def _carried_syms(
    body: list[Node], bounds: list[int], states: list[list[Node]], pos: dict[Node, int], is_sym: Callable[[Node], bool]
) -> list[Node]:
    carried: list[Node] = []
    for k in range(1, len(bounds) - 1):
        seg = body[bounds[k] + 1 : bounds[k + 1] + 1]
        for n in seg:
            for a in n.all_input_nodes:
                if (
                    is_sym(a)
                    and pos.get(a, -1) <= bounds[k]
                    and a not in carried
                    and _sym_source(a, states[k - 1]) is None
                ):
                    carried.append(a)
    return carried


def _sym_source(v: Node, inputs: list[Node]) -> tuple[Node, int] | None:
    """A tensor among ``inputs`` and a dimension whose size is the symbolic value ``v``."""
    expr = v.meta["val"].node.expr
    for t in inputs:
        val = t.meta.get("val")
        if isinstance(val, Tensor):
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and s.node.expr == expr:
                    return t, d
    return None


def _leaf_calls(
    model: nn.Module, body: list[Node], lifted_fqn: dict[str, str]
) -> dict[Node, tuple[nn.Module, Node, Node]]:
    """Calls of leaf modules that can be replaced by calling the module: ``{last node: (module, input, first)}``.

    A call is a run of consecutive nodes with the same innermost call key; it qualifies when the module has no
    children, takes exactly one tensor from outside the run (besides its own parameters and buffers) and
    exactly one of its values is used after it."""
    runs: list[list[Node]] = []
    for n in body:
        st = _stack(n)
        key = st[-1][0] if st else None
        if runs and key is not None and _stack(runs[-1][0])[-1:] and _stack(runs[-1][0])[-1][0] == key:
            runs[-1].append(n)
        else:
            runs.append([n])
    out: dict[Node, tuple[nn.Module, Node, Node]] = {}
    for run in runs:
        st = _stack(run[0])
        if not st:
            continue
        path = st[-1][1]
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if any(True for _ in mod.children()):
            continue
        members = set(run)
        own = {f"{path}.{n}" if path else n for n, _ in mod.named_parameters()} | {
            f"{path}.{n}" if path else n for n, _ in mod.named_buffers()
        }
        ext = []
        ok = True
        for n in run:
            for a in n.all_input_nodes:
                if a in members:
                    continue
                if a.op == "placeholder" and a.name in lifted_fqn:
                    ok &= lifted_fqn[a.name] in own
                elif a not in ext:
                    ext.append(a)
        used_after = [n for n in run if any(u not in members for u in n.users)]
        if ok and len(ext) == 1 and isinstance(ext[0].meta.get("val"), Tensor) and used_after == [run[-1]]:
            out[run[-1]] = (mod, ext[0], run[0])
    return out


def _build_stage(
    seg: list[Node],
    ins: list[Node],
    outs: list[Node],
    first: bool,
    placeholders: dict[str, Node],
    lifted_fqn: dict[str, str],
    owners: dict[str, tuple[nn.Module, str]],
    constants: dict[str, Any],
    leaves: dict[Node, tuple[nn.Module, Node, Node]],
) -> GraphStage:
    slot: dict[Node, _Slot] = {v: _Slot(i) for i, v in enumerate(ins)}
    lifted_idx: dict[str, _Lifted] = {}
    lifted: list[tuple[nn.Module, str]] = []
    const_list: list[Tensor] = []
    const_names: list[str] = []
    params: dict[int, nn.Parameter] = {}
    mods: dict[int, nn.Module] = {}
    steps: list[_Step] = []
    in_seg = set(seg)
    skip: set[Node] = set()
    # leaf-module calls wholly inside this stage become one step each
    leaf_at: dict[Node, tuple[nn.Module, Node]] = {}
    for last, (mod, inp, first_node) in leaves.items():
        if last in in_seg and first_node in in_seg:
            i0, i1 = seg.index(first_node), seg.index(last)
            run = [n for n in seg[i0 : i1 + 1]]
            leaf_at[last] = (mod, inp)
            skip.update(n for n in run if n is not last)
            mods[id(mod)] = mod

    def ref(a: Node) -> Any:
        if a in slot:
            return slot[a]
        if a.op == "placeholder" and a.name in lifted_fqn:
            fqn = lifted_fqn[a.name]
            if fqn not in lifted_idx:
                if fqn in constants:
                    c = constants[fqn]
                    const_names.append(fqn)
                    const_list.append(c)
                    lifted_idx[fqn] = _Lifted(-len(const_list))  # fixed below
                else:
                    owner, name = owners[fqn]
                    lifted.append((owner, name))
                    lifted_idx[fqn] = _Lifted(len(lifted) - 1)
                    t = getattr(owner, name)
                    if isinstance(t, nn.Parameter):
                        params[id(t)] = t
            return lifted_idx[fqn]
        if isinstance(a.meta.get("val"), torch.SymInt):
            src = _sym_source(a, ins)
            if src is not None:
                steps.append(_Step(torch.ops.aten.sym_size.int, (slot[src[0]], src[1]), {}))
                slot[a] = _Slot(len(ins) + len(steps) - 1)
                return slot[a]
        raise ValueError(f"cannot split: {a.name} ({a.target}) is needed across a split point but is not carried")

    def convert(x: Any) -> Any:
        return torch.fx.node.map_arg(x, ref)

    # a symbolic size used here may come from outside: resolve lazily via ref()
    for n in seg:
        if n in skip:
            continue
        if n in leaf_at:
            mod, inp = leaf_at[n]
            steps.append(_Step(None, (ref(inp),), {}, mod))
        else:
            steps.append(_Step(n.target, convert(n.args), convert(n.kwargs)))
        slot[n] = _Slot(len(ins) + len(steps) - 1)
    outputs = [ref(v).index for v in outs]
    # constants come after the model's tensors in the lifted list
    fixed: list[_Step] = []
    for s in steps:
        fixed.append(_Step(s.fn, _fix_consts(s.args, len(lifted)), _fix_consts(s.kwargs, len(lifted)), s.module))
    in_mods = {id(p) for m in mods.values() for p in m.parameters()}
    functional = [p for p in params.values() if id(p) not in in_mods]
    return GraphStage(fixed, len(ins), outputs, lifted, const_list, functional, list(mods.values()), first)


def _fix_consts(a: Any, n_lifted: int) -> Any:
    if isinstance(a, _Lifted) and a.index < 0:
        return _Lifted(n_lifted + (-a.index - 1))
    if isinstance(a, (list, tuple)):
        return type(a)(_fix_consts(b, n_lifted) for b in a)
    if isinstance(a, dict):
        return {k: _fix_consts(v, n_lifted) for k, v in a.items()}
    return a


__all__ = ["AttachedNet", "GraphStage", "TokenHead", "attach_exits", "default_head"]
