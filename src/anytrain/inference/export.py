"""Export of a staged network as one program per stage and per exit head, plus a JSON manifest.

Each part takes and returns flat tuples of tensors: a stage state (any pytree) is flattened with
``torch.utils._pytree`` and its spec recorded in the manifest, so the parts chain as ``stage_k(*leaves)`` →
``leaves`` and ``head_k(*leaves)`` → logits. The batch dimension of every input is dynamic. ``pt2`` parts are
``torch.export`` programs (``torch.export.save``); ``onnx`` parts go through torch's ONNX exporter
(``torch.onnx.export(dynamo=True)``) and run in onnxruntime (``pip install anytrain[onnx]``).

Directory layout::

    manifest.json      format, backend, policy, input shape and dtype, class count, MACs per stage and head,
                       state specs, optional preprocessing and class names, per-file SHA-256, and the manifest's
                       own checksum (SHA-256 of its canonical JSON without that field)
    stage_<k>.<ext>    stage k: leaves of the state after stage k−1 (stage 0: the input) → leaves after stage k
    head_<k>.<ext>     head k: leaves after stage k → logits
    val_scores.pt      optional: per-exit validation confidences and correctness (refitting a budget), tensors only

Loading checks the manifest checksum, that every part is present, and each file's SHA-256, before anything runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten, treespec_dumps

from anytrain.inference.parts import (
    BACKENDS,
    FORMAT,
    MANIFEST,
    VAL_SCORES,
    VERSION,
    _manifest_checksum,
    _require_onnx,
    _sha256,
)
from anytrain.inference.policies import Deadline, Policy
from anytrain.nets.staged import StagedNet


class _FlatPart(nn.Module):
    """``module`` on the state rebuilt from flat leaves; returns the flat leaves of its output (or the tensor)."""

    def __init__(self, module: nn.Module, spec: TreeSpec, flat_out: bool) -> None:
        super().__init__()
        self.module, self.spec, self.flat_out = module, spec, flat_out

    def forward(self, *leaves: Tensor) -> Any:
        out = self.module(tree_unflatten(list(leaves), self.spec))
        return tuple(tree_flatten(out)[0]) if self.flat_out else out


def _export_part(part: nn.Module, leaves: list[Tensor], path: Path, backend: str) -> None:
    batch = torch.export.Dim("batch")
    dyn = (tuple({0: batch} for _ in leaves),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' own deprecation and tracing notes
        if backend == "pt2":
            torch.export.save(torch.export.export(part, tuple(leaves), dynamic_shapes=dyn), str(path))
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
                torch.onnx.export(part, tuple(leaves), str(path), dynamo=True, dynamic_shapes=dyn, verbose=False)


def export_parts(
    net: StagedNet,
    out: str | Path,
    *,
    input_shape: Sequence[int],
    format: str = "pt2",
    policy: Policy | None = None,
    val_scores: tuple[Tensor, Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write every stage and exit head of ``net`` as its own program, and the manifest, into ``out``.

    Args:
        net: the staged network (exported in eval mode; left as it was).
        out: a directory that does not exist yet (or is empty); written in a temporary sibling and renamed.
        input_shape: the shape of one sample.
        format: ``"pt2"`` (torch.export) or ``"onnx"``.
        policy: the early-exit policy recorded in the manifest (default: the full network, a deadline at the
            last exit).
        val_scores: ``(conf, correct)`` of every exit on the validation split (:func:`anytrain.eval.exit_scores`),
            stored so that ``load(..., budget=B)`` can refit thresholds.
        extra: further JSON-able manifest entries (``preprocess``, ``classes``, ``source``).
    """
    if format not in BACKENDS:
        raise ValueError(f"unknown export format {format!r}; known: {', '.join(BACKENDS)}")
    if format == "onnx":
        _require_onnx(export=True)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory")
    shape = tuple(int(s) for s in input_shape)
    K = net.num_exits
    policy = policy or Deadline(K - 1)
    policy.check(K)
    p = next(net.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    stage_macs, head_macs = net.flops_breakdown(shape)
    ext = BACKENDS[format]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export-tmp", dir=out.parent))
    was = net.training
    net.eval()
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(2, *shape, generator=gen).to(device=device, dtype=dtype)  # batch 2: not specialised
        state: Any = x
        states, files = [], {}
        with torch.no_grad():
            for k in range(K):
                leaves, spec = tree_flatten(state)
                _export_part(_FlatPart(net.stages[k], spec, True), leaves, tmp / f"stage_{k}{ext}", format)
                state = net.stages[k](state)
                leaves, spec = tree_flatten(state)
                _export_part(_FlatPart(net.exits[k], spec, False), leaves, tmp / f"head_{k}{ext}", format)
                logits = net.exits[k](state)
                states.append(
                    {
                        "spec": treespec_dumps(spec),
                        "shapes": [list(t.shape[1:]) for t in leaves],
                        "dtypes": [str(t.dtype).removeprefix("torch.") for t in leaves],
                    }
                )
        if val_scores is not None:
            buf = io.BytesIO()
            torch.save({"conf": val_scores[0].float().cpu(), "correct": val_scores[1].bool().cpu()}, buf)
            (tmp / VAL_SCORES).write_bytes(buf.getvalue())
        for f in sorted(tmp.iterdir()):
            files[f.name] = _sha256(f)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "backend": format,
            "num_exits": K,
            "num_classes": int(logits.shape[-1]),
            "input_shape": list(shape),
            "input_dtype": str(dtype).removeprefix("torch."),
            "policy": policy.to_dict(),
            "macs": {"stages": [int(m) for m in stage_macs], "heads": [int(m) for m in head_macs]},
            "states": states,
            "parts": {"stages": [f"stage_{k}{ext}" for k in range(K)], "heads": [f"head_{k}{ext}" for k in range(K)]},
            "files": files,
            **(extra or {}),
        }
        manifest["checksum"] = _manifest_checksum(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        net.train(was)
    return out


__all__ = ["export_parts"]
