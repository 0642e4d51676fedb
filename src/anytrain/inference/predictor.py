"""The anytime predictor: early exit that really stops computing.

Stage ``k`` runs only on the rows still undecided: after each exit the rows that stopped are dropped from every
tensor of the stage state (a pytree; the state is gathered with one ``index_select`` per tensor), and the next
stage resumes from what is left (as :meth:`StagedNet.continue_from` does). A sample's answer is written when it
exits. The MACs of a sample are counted as the loop runs: the MACs of every stage and head evaluated on its row
(``stage_macs[k]``/``head_macs[k]`` from :meth:`StagedNet.flops_breakdown`, for one sample; every running row
runs the same parts, so one running total serves them all). One host synchronisation per exit (how many rows stop)
decides the shapes of what follows.

The predictor runs eager networks and exported parts (:meth:`AnytimePredictor.load`) through the same loop;
both sit behind :class:`Parts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from anytrain.eval.anytime import exit_costs, exit_scores
from anytrain.inference.parts import MANIFEST, VAL_SCORES, ExportedParts, read_manifest
from anytrain.inference.policies import Budget, Policy, make_policy, policy_from_dict
from anytrain.nets.staged import StagedNet, require_staged

State = Any


@dataclass
class Prediction:
    """What :meth:`AnytimePredictor.predict` returns, one entry per sample (tensors of length ``N``)."""

    labels: Tensor  # int64, the predicted class
    exits: Tensor  # int64, the exit the sample left at
    macs: Tensor  # int64, multiply-adds spent on the sample (stages and heads run on its row)
    logits: Tensor  # (N, C), the logits of the exit the sample left at


class Parts(Protocol):
    """What the loop runs: stage ``k`` maps a state to the next, head ``k`` a state to logits."""

    num_exits: int

    def stage(self, k: int, state: State) -> State: ...

    def head(self, k: int, state: State) -> Tensor: ...

    def macs(self, input_shape: tuple[int, ...]) -> tuple[list[int], list[int]]: ...


class EagerParts:
    """The stages and heads of a :class:`StagedNet`, run as they are (eval mode is set by the predictor)."""

    def __init__(self, net: StagedNet) -> None:
        self.net = net
        self.num_exits = net.num_exits
        self._macs: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}

    def stage(self, k: int, state: State) -> State:
        return self.net.stages[k](state)

    def head(self, k: int, state: State) -> Tensor:
        return self.net.exits[k](state)

    def macs(self, input_shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
        if input_shape not in self._macs:
            self._macs[input_shape] = self.net.flops_breakdown(input_shape)
        return self._macs[input_shape]


def gather_rows(state: State, rows: Tensor) -> State:
    """The rows ``rows`` of every tensor in a state (first dimension: the batch)."""
    return tree_map(lambda t: t.index_select(0, rows) if isinstance(t, Tensor) else t, state)


class AnytimePredictor:
    """Batched early-exit inference on a staged network.

    Args:
        net: a :class:`~anytrain.nets.StagedNet` (or, from :meth:`load`, exported parts).
        policy: a :class:`~anytrain.inference.Policy` or a name: ``"max-prob"``, ``"entropy"`` (with
            ``thresholds``), ``"patience"`` (with ``patience``), ``"deadline"`` (with ``exit``), ``"budget"`` (with
            ``budget`` and ``val=(x, y)``, the validation split to fit the thresholds on, or already fitted
            ``thresholds``).
        thresholds: one per exit but the last, each in ``[0, 1]`` (or ``anytrain.eval.NEVER``).
        input_shape: the shape of one sample; inputs of another shape are refused, and the MACs per stage and
            head are counted here rather than on the first call (default: the shape of ``val`` if given, else
            not enforced).
        input_dtype: the dtype inputs must have (default: the network's floating-point dtype).

    Example:
        >>> from anytrain.nets import build_model
        >>> net = build_model("nested-width", in_shape=(1, 40), num_classes=10, stages=3)
        >>> pred = AnytimePredictor(net, "max-prob", thresholds=[0.9, 0.8]).predict(torch.randn(5, 1, 40))
        >>> pred.labels.shape, pred.exits.shape, pred.macs.shape
        (torch.Size([5]), torch.Size([5]), torch.Size([5]))
    """

    def __init__(
        self,
        net: StagedNet | Parts,
        policy: str | Policy = "max-prob",
        thresholds: Sequence[float] | None = None,
        *,
        patience: int | None = None,
        exit: int | None = None,
        budget: float | None = None,
        val: tuple[Tensor, Tensor] | None = None,
        input_shape: Sequence[int] | None = None,
        input_dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(net, nn.Module):
            self.net: StagedNet | None = require_staged(net, "AnytimePredictor")
            self.parts: Parts = EagerParts(self.net)
            self._module_list: list[nn.Module] = list(self.net.modules())
            p = next(self.net.parameters(), None)
            self.device = p.device if p is not None else torch.device("cpu")
            default_dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        else:
            self.net, self.parts = None, net
            self._module_list = []
            self.device = torch.device("cpu")
            default_dtype = torch.float32
        self.manifest: dict[str, Any] | None = getattr(self.parts, "manifest", None)  # exported parts only
        self.input_dtype = input_dtype or default_dtype
        self.input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        if val is not None and self.input_shape is None:
            self.input_shape = tuple(val[0].shape[1:])
        K = self.parts.num_exits
        if isinstance(policy, Policy):
            self.policy = policy
        elif policy == "budget" and thresholds is None:
            if budget is None or val is None:
                raise ValueError("policy 'budget' needs budget=... and val=(x, y), the validation split to fit on")
            self.policy = self.fit_budget(val, budget)
        else:
            self.policy = make_policy(policy, thresholds=thresholds, patience=patience, exit=exit, budget=budget)
        self.policy.check(K)
        if self.input_shape is not None:
            self.parts.macs(self.input_shape)  # counted once here (a dry run), not inside predict

    # ---- fitting -----------------------------------------------------------------------------------------
    def fit_budget(self, val: tuple[Tensor, Tensor], budget: float, batch_size: int = 1000) -> Budget:
        """A :class:`Budget` policy fitted on the validation split ``val = (x, y)`` (all exits evaluated)."""
        if self.net is None:
            raise ValueError("fit_budget needs the eager network; exported parts carry their validation scores")
        x, y = val
        self.check_input(x)
        batches = ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size))
        conf, correct = exit_scores(self.net, batches)
        return Budget.fit(conf, correct, exit_costs(*self.parts.macs(tuple(x.shape[1:]))), budget)

    # ---- inference ---------------------------------------------------------------------------------------
    def check_input(self, x: Any) -> None:
        """A one-line ``ValueError`` unless ``x`` is a non-empty batch of the expected shape and dtype."""
        if not isinstance(x, Tensor):
            raise ValueError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != self.input_dtype:
            raise ValueError(f"inputs have dtype {x.dtype}, expected {self.input_dtype}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"inputs have shape {tuple(x.shape)}, expected (N, {', '.join(map(str, self.input_shape))})"
            )
        if x.dim() < 2:
            raise ValueError(f"inputs have shape {tuple(x.shape)}, expected a batch (N, ...) of samples")
        if x.shape[0] == 0:
            raise ValueError("inputs hold no samples")

    def predict(self, x: Tensor, batch_size: int | None = None) -> Prediction:
        """Labels, exits and MACs per sample of ``x`` (``(N, *input_shape)``), in chunks of ``batch_size``."""
        self.check_input(x)
        if batch_size is None or batch_size >= x.shape[0]:
            return self._predict(x)
        parts = [self._predict(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        return Prediction(*(torch.cat([getattr(p, f) for p in parts]) for f in ("labels", "exits", "macs", "logits")))

    def _predict(self, x: Tensor) -> Prediction:
        # eval mode for the call, restored after; the module list is walked once, at construction (a walk per
        # call costs about as much as a small net's forward at batch 1)
        training = [m for m in self._module_list if m.training]
        for m in training:
            m.training = False
        try:
            with torch.inference_mode():
                return self._loop(x.to(self.device))
        finally:
            for m in training:
                m.training = True

    def _loop(self, x: Tensor) -> Prediction:
        policy, K = self.policy, self.parts.num_exits
        stage_macs, head_macs = self.parts.macs(tuple(x.shape[1:]))
        last = policy.last_exit(K)
        n, dev = x.shape[0], x.device
        labels = torch.empty(n, dtype=torch.long, device=dev)
        exits = torch.empty(n, dtype=torch.long, device=dev)
        macs = torch.empty(n, dtype=torch.long, device=dev)
        logits: Tensor | None = None
        rows = torch.arange(n, device=dev)  # the samples still running, in the order of the state's rows
        spent = 0  # MACs every running row has spent: each stage and head is run on all of them
        state: State = x
        carry = policy.start(n, dev)
        for k in range(last + 1):
            state = self.parts.stage(k, state)
            spent += int(stage_macs[k])
            if not policy.runs_head(k, K):
                continue
            z = self.parts.head(k, state)
            spent += int(head_macs[k])
            if logits is None:
                logits = torch.empty(n, z.shape[-1], dtype=z.dtype, device=dev)
            if k == last:
                stop, n_stop = None, rows.numel()
            else:
                stop, carry = policy.decide(k, z, carry)
                n_stop = int(stop.sum())  # the one host sync per exit: how many rows go on
            if n_stop == rows.numel():  # every running row answers here
                labels[rows], exits[rows], macs[rows], logits[rows] = z.argmax(-1), k, spent, z
                break
            if n_stop == 0:
                continue
            assert stop is not None
            idx = stop.nonzero().squeeze(1)
            done, zd = rows.index_select(0, idx), z.index_select(0, idx)
            labels[done], exits[done], macs[done], logits[done] = zd.argmax(-1), k, spent, zd
            kept = (~stop).nonzero().squeeze(1)
            state, carry, rows = gather_rows(state, kept), gather_rows(carry, kept), rows.index_select(0, kept)
        assert logits is not None
        return Prediction(labels, exits, macs, logits)

    # ---- exported parts ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, **policy: Any) -> AnytimePredictor:
        """A predictor over the exported parts in ``path`` (``anytrain export``), with the manifest's policy or
        the one given: ``policy=`` (a name or a :class:`Policy`) with its parameter (``thresholds=``,
        ``patience=``, ``exit=``), or ``budget=`` alone, which refits the thresholds on the validation scores
        stored with the export. The manifest, every part and their checksums are checked first."""
        root = Path(path)
        m = read_manifest(root)
        parts = ExportedParts(root, m)
        dtype = getattr(torch, str(m.get("input_dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{root / MANIFEST}: unknown input dtype {m.get('input_dtype')!r}")
        budget = policy.pop("budget", None)
        chosen: Policy
        if budget is not None:
            if policy:
                raise ValueError("give budget= alone: it replaces the policy")
            if VAL_SCORES not in m["files"]:
                raise ValueError(f"{root} holds no validation scores ({VAL_SCORES}): a budget cannot be fitted")
            s = torch.load(root / VAL_SCORES, weights_only=True)
            chosen = Budget.fit(s["conf"], s["correct"], exit_costs(*parts.macs(parts.input_shape)), budget)
        elif policy:
            name = policy.pop("policy", None)
            chosen = (
                name if isinstance(name, Policy) else policy_from_dict({"name": name or m["policy"]["name"], **policy})
            )
        else:
            chosen = policy_from_dict(m["policy"])
        return cls(parts, chosen, input_shape=parts.input_shape, input_dtype=dtype)


__all__ = ["AnytimePredictor", "EagerParts", "Parts", "Prediction", "gather_rows"]
