"""From a run directory to a predictor, an export folder and a predictions file (``anytrain export``/``predict``).

A run is loaded as it finished: its ``config.yaml`` rebuilds data, net and optimizer, ``checkpoint.pt`` (or the
multi-process runner's ``model.pt``) gives the final weights. A run trained with SLBI is exported *pruned*: the
sparse model ``W*`` (``SLBI.projected_model``) is physically shrunk by :func:`anytrain.sparsity.export_pruned`
(exact in eval mode) before its stages and heads are written. Budget thresholds are always fitted on the
validation split, on the very network that is exported (the pruned one for an SLBI run).

Inputs for ``predict``: a ``.npy`` array ``(N, *input_shape)`` of raw values (``uint8`` pixels are divided by 255;
float arrays are taken in the units the data set stores before normalisation, images in ``[0, 1]``), or a folder
of images (read in sorted path order, converted to the run's channel count and resized to its size). Both are
normalised with the run's per-channel mean and std unless ``normalized`` says they already are.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anytrain.config import load_config
from anytrain.eval.anytime import deadline_exit, exit_scores
from anytrain.inference import AnytimePredictor, Deadline, Policy, Prediction, export_parts, make_policy
from anytrain.inference.parts import MANIFEST
from anytrain.nets import StagedNet
from anytrain.optim import SLBI
from anytrain.registry import ConfigError
from anytrain.train.checkpoint import atomic_write_text, is_run_dir, load_checkpoint
from anytrain.train.trainer import build_components, data_from_config


@dataclass
class LoadedRun:
    net: StagedNet  # eval mode, on the CPU; pruned for an SLBI run (when asked)
    input_shape: tuple[int, ...]
    num_classes: int
    val: tuple[Tensor, Tensor] | None  # validation scores (conf, correct) of ``net``, or None without a split
    preprocess: dict[str, list[float]] = field(default_factory=dict)
    classes: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)


def _slbi_optimizers(opt: Any) -> list[SLBI]:
    subs = [opt] if isinstance(opt, SLBI) else [o for o in getattr(opt, "optimizers", []) or [] if o is not None]
    return [o for o in subs if isinstance(o, SLBI)]


def load_run(run: str | Path, *, prune: bool = True, eval_batch_size: int = 1000) -> LoadedRun:
    """The final network of a run directory (pruned to ``W*`` for an SLBI run when ``prune``), with what the
    predictor and the export need. Bad input (not a run, no checkpoint, another architecture) is a one-line
    ``ConfigError``."""
    from anytrain.sparsity import export_pruned

    run = Path(run)
    if not is_run_dir(run):
        raise ConfigError(f"{run} is not an anytrain run directory (no config.yaml written by anytrain)")
    cfg = load_config(run / "config.yaml")
    ck_path = run / "checkpoint.pt" if (run / "checkpoint.pt").is_file() else run / "model.pt"
    if not ck_path.is_file():
        raise ConfigError(f"{run} holds no checkpoint.pt or model.pt: nothing to export (has it trained an epoch?)")
    ck = load_checkpoint(ck_path)
    data = data_from_config(cfg, augment=False)
    comps = build_components(cfg, torch.device("cpu"), data=data)
    net: StagedNet = comps["net"]
    try:
        net.load_state_dict(ck["model"])
    except (KeyError, RuntimeError) as e:
        raise ConfigError(
            f"{ck_path} does not match the run's config.yaml: {str(e).strip().splitlines()[0][:200]}"
        ) from None
    net.eval()
    shape = tuple(int(s) for s in data.input_shape)
    slbis = _slbi_optimizers(comps["optimizer"]) if "optimizer" in ck else []
    pruned = False
    if prune and slbis:
        try:
            comps["optimizer"].load_state_dict(ck["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ConfigError(
                f"{ck_path}: cannot restore the SLBI state: {str(e).strip().splitlines()[0][:200]}"
            ) from None
        with contextlib.ExitStack() as stack:
            for o in slbis:
                stack.enter_context(o.projected())
            star = copy.deepcopy(net).eval()
        probe = next(iter(data.batches("train", 64)))[0] if data.split_len("train") else None
        try:
            small, _ = export_pruned(star, torch.zeros(1, *shape), probe_inputs=probe)
        except ValueError as e:
            raise ConfigError(f"cannot prune {run}: {e}") from None
        assert isinstance(small, StagedNet)  # a pruned deep copy keeps its class
        net = small.eval()
        pruned = True
    val = None
    if data.split_len("val") > 0:
        val = exit_scores(net, data.batches("val", eval_batch_size))
    mean = getattr(data, "mean", None) or data.info.get("mean")
    std = getattr(data, "std", None) or data.info.get("std")
    pre = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]} if mean and std else {}
    classes = getattr(data, "classes", None) or data.info.get("classes")
    source = {"run": str(run), "model": cfg.model.name, "dataset": cfg.data.name, "pruned": pruned}
    return LoadedRun(net, shape, int(data.num_classes), val, pre, list(classes) if classes else None, source)


def choose_policy(
    num_exits: int,
    costs: list[float],
    flops: list[int],
    val: tuple[Tensor, Tensor] | None,
    *,
    budget: float | None = None,
    deadline: float | None = None,
    patience: int | None = None,
    policy: str | None = None,
    thresholds: list[float] | None = None,
) -> Policy | None:
    """The policy the command-line options ask for (at most one of budget, deadline, patience, thresholds);
    ``None`` when none is given. A one-line ``ValueError`` on a bad value."""
    from anytrain.inference import Budget

    given = [n for n, v in (("--budget", budget), ("--deadline", deadline), ("--patience", patience)) if v is not None]
    if thresholds is not None or policy is not None:
        given.append("--thresholds")
    if len(given) > 1:
        raise ValueError(f"give one of --budget, --deadline, --patience, --thresholds; got {', '.join(given)}")
    if budget is not None:
        if val is None:
            raise ValueError("--budget needs validation scores: the run has no validation split (data.val_size: 0)")
        return Budget.fit(val[0], val[1], costs, budget)
    if deadline is not None:
        if not math.isfinite(deadline):
            raise ValueError(f"--deadline must be a finite number of MACs, got {deadline}")
        return Deadline(deadline_exit(flops, deadline))
    if patience is not None:
        return make_policy("patience", patience=patience)
    if thresholds is not None or policy is not None:
        name = policy or "max-prob"
        if name not in ("max-prob", "entropy"):
            raise ValueError(f"--policy must be max-prob or entropy with --thresholds, got {name!r}")
        if thresholds is None:
            raise ValueError(f"--policy {name} needs --thresholds (one per exit but the last, {num_exits - 1})")
        return make_policy(name, thresholds=thresholds)
    return None


def export_run(run: str | Path, out: str | Path, *, format: str = "pt2", prune: bool = True, **options: Any) -> Path:
    """``anytrain export``: the run's stages and heads into ``out`` with the chosen policy (default: the full
    network). ``out`` must not exist or be empty; it is written under a temporary name and renamed."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty directory")
    if format not in ("pt2", "onnx"):
        raise ValueError(f"--format must be pt2 or onnx, got {format!r}")
    r = load_run(run, prune=prune)
    from anytrain.eval.anytime import exit_costs

    stage, head = r.net.flops_breakdown(r.input_shape)
    pol = choose_policy(r.net.num_exits, exit_costs(stage, head), r.net.flops_per_exit(r.input_shape), r.val, **options)
    extra: dict[str, Any] = {"source": r.source}
    if r.preprocess:
        extra["preprocess"] = r.preprocess
    if r.classes:
        extra["classes"] = r.classes
    return export_parts(r.net, out, input_shape=r.input_shape, format=format, policy=pol, val_scores=r.val, extra=extra)


# ---- predict ----------------------------------------------------------------------------------------------------
def read_inputs(
    path: str | Path, input_shape: tuple[int, ...], preprocess: dict[str, Any] | None, normalized: bool = False
) -> tuple[Tensor, list[str]]:
    """Model inputs from a ``.npy`` file or an image folder (see the module docstring), and a name per sample."""
    from anytrain.data._imagefolder import IMAGE_SUFFIXES, _load

    path = Path(path)
    want = f"(N, {', '.join(map(str, input_shape))})"
    if path.is_dir():
        if len(input_shape) != 3 or input_shape[0] not in (1, 3):
            raise ValueError(f"an image folder needs a model of 1 or 3 input channels (C, H, W), this one takes {want}")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        mode = "L" if input_shape[0] == 1 else "RGB"
        arrays = [_load(f, mode, (input_shape[1], input_shape[2])) for f in files]
        x = torch.from_numpy(np.stack(arrays)).float().div_(255.0)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
        names = [str(f.relative_to(path)) for f in files]
    elif path.suffix.lower() == ".npy":
        if not path.is_file():
            raise ValueError(f"input file {path} does not exist")
        try:
            a = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"cannot read {path} as a .npy array: {str(e).strip().splitlines()[0][:160]}") from None
        if a.dtype == np.uint8:
            x = torch.from_numpy(a.astype(np.float32) / 255.0)
        elif a.dtype in (np.float16, np.float32, np.float64):
            x = torch.from_numpy(a.astype(np.float32))
        else:
            raise ValueError(f"{path} holds {a.dtype} values, expected float (raw values) or uint8 (pixels)")
        if tuple(x.shape[1:]) != tuple(input_shape) or x.dim() != len(input_shape) + 1:
            raise ValueError(f"{path} has shape {tuple(a.shape)}, expected {want}")
        if x.shape[0] == 0:
            raise ValueError(f"{path} holds no samples")
        if not torch.isfinite(x).all():
            raise ValueError(f"{path} holds non-finite values")
        names = [str(i) for i in range(x.shape[0])]
    else:
        raise ValueError(f"--input {path} is neither a .npy file nor a folder of images")
    if preprocess and not normalized:
        c = x.shape[1]
        mean, std = preprocess.get("mean", []), preprocess.get("std", [])
        if len(mean) in (1, c) and len(std) in (1, c):
            view = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - torch.tensor(mean).view(view)) / torch.tensor(std).view(view)
    return x, names


def predictor_for(path: str | Path, **options: Any) -> tuple[AnytimePredictor, dict[str, Any]]:
    """A predictor for a run directory or an export folder, with the policy the options ask for, and the
    preprocessing and class names that go with it."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        from anytrain.inference.parts import read_manifest

        m = read_manifest(path)
        if options.get("budget") is not None:
            if any(options.get(k) is not None for k in ("deadline", "patience", "thresholds", "policy")):
                raise ValueError("give one of --budget, --deadline, --patience, --thresholds")
            return AnytimePredictor.load(path, budget=options["budget"]), m
        from anytrain.eval.anytime import exit_costs

        stages, heads = m["macs"]["stages"], m["macs"]["heads"]
        flops = [int(sum(stages[: k + 1]) + heads[k]) for k in range(len(stages))]
        pol = choose_policy(len(stages), exit_costs(stages, heads), flops, None, **options)
        return (AnytimePredictor.load(path, policy=pol) if pol else AnytimePredictor.load(path)), m
    r = load_run(path)
    from anytrain.eval.anytime import exit_costs

    stage, head = r.net.flops_breakdown(r.input_shape)
    pol = choose_policy(r.net.num_exits, exit_costs(stage, head), r.net.flops_per_exit(r.input_shape), r.val, **options)
    pred = AnytimePredictor(r.net, pol or Deadline(r.net.num_exits - 1), input_shape=r.input_shape)
    return pred, {"input_shape": list(r.input_shape), "preprocess": r.preprocess, "classes": r.classes}


def write_predictions(out: str | Path, names: list[str], p: Prediction, classes: list[str] | None) -> None:
    """``sample,label[,class],exit,macs`` per sample, written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["sample", "label", *(["class"] if classes else []), "exit", "macs"])
    for name, label, e, m in zip(names, p.labels.tolist(), p.exits.tolist(), p.macs.tolist()):
        w.writerow([name, label, *([classes[label]] if classes else []), e, m])
    atomic_write_text(out, buf.getvalue())


__all__ = ["LoadedRun", "choose_policy", "export_run", "load_run", "predictor_for", "read_inputs", "write_predictions"]
