"""Reading an export directory (see :mod:`anytrain.inference.export` for the layout): the manifest checks and
the exported stages and heads behind the predictor's :class:`~anytrain.inference.predictor.Parts` interface."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "anytrain-export"
VERSION = 1
BACKENDS = {"pt2": ".pt2", "onnx": ".onnx"}
MANIFEST = "manifest.json"
VAL_SCORES = "val_scores.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _require_onnx(export: bool = False) -> None:
    need = ["onnx", "onnxscript"] if export else ["onnxruntime"]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"the onnx format needs {', '.join(missing)}: pip install 'anytrain[onnx]'")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an export directory, after checking its checksum, the presence of every part and every
    file's SHA-256 (a one-line ``ValueError`` naming the first problem and the expected value)."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ValueError(f"{root} is not an anytrain export: {MANIFEST} is missing")
    try:
        m = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{mpath} is not an anytrain export manifest (format {FORMAT!r} expected)")
    if m.get("version") != VERSION:
        raise ValueError(f"{mpath}: version {m.get('version')!r}, expected {VERSION}")
    want = _manifest_checksum(m)
    if m.get("checksum") != want:
        raise ValueError(f"{mpath} was edited: its checksum is {m.get('checksum')!r}, expected {want}")
    if m.get("backend") not in BACKENDS:
        raise ValueError(f"{mpath}: unknown backend {m.get('backend')!r}, expected one of {', '.join(BACKENDS)}")
    files = m.get("files")
    parts = m.get("parts", {})
    names = [*parts.get("stages", []), *parts.get("heads", [])]
    if not isinstance(files, dict) or any(n not in files for n in names):
        raise ValueError(f"{mpath}: the file list does not cover every part")
    for name, digest in files.items():
        f = root / name
        if not f.is_file():
            raise ValueError(f"{root}: part {name} is missing")
        got = _sha256(f)
        if got != digest:
            raise ValueError(f"{f} was changed: SHA-256 {got}, expected {digest}")
    return m


class ExportedParts:
    """The stages and heads of an export directory (``pt2`` through torch, ``onnx`` through onnxruntime)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.backend = manifest["backend"]
        self.num_exits = int(manifest["num_exits"])
        self.input_shape = tuple(int(s) for s in manifest["input_shape"])
        stages = [root / n for n in manifest["parts"]["stages"]]
        heads = [root / n for n in manifest["parts"]["heads"]]
        if len(stages) != self.num_exits or len(heads) != self.num_exits:
            raise ValueError(f"{root}: expected {self.num_exits} stages and heads in the manifest")
        if self.backend == "onnx":
            _require_onnx()
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.inter_op_num_threads = 1

            def session(p: Path) -> Any:
                return ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])

            self._stages = [session(p) for p in stages]
            self._heads = [session(p) for p in heads]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._stages = [torch.export.load(str(p)).module() for p in stages]
                self._heads = [torch.export.load(str(p)).module() for p in heads]

    def _run(self, part: Any, leaves: tuple[Tensor, ...]) -> list[Tensor]:
        if self.backend == "pt2":
            out = part(*leaves)
            return list(out) if isinstance(out, (tuple, list)) else [out]
        feed = {i.name: t.detach().cpu().contiguous().numpy() for i, t in zip(part.get_inputs(), leaves)}
        return [torch.from_numpy(a) for a in part.run(None, feed)]

    def stage(self, k: int, state: Any) -> tuple[Tensor, ...]:
        leaves = (state,) if isinstance(state, Tensor) else tuple(state)
        return tuple(self._run(self._stages[k], leaves))

    def head(self, k: int, state: Any) -> Tensor:
        return self._run(self._heads[k], tuple(state))[0]

    def macs(self, input_shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
        m = self.manifest["macs"]
        return [int(v) for v in m["stages"]], [int(v) for v in m["heads"]]


__all__ = ["BACKENDS", "MANIFEST", "VAL_SCORES", "ExportedParts", "read_manifest"]
