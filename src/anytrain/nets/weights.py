"""Start from saved weights and train only part of a net: ``load_weights`` (``model.weights``) and ``freeze``
(``train.freeze``).

``load_weights(net, path)`` reads a state dict from ``.pt`` (loaded with ``weights_only=True``; an anytrain
``checkpoint.pt``/``best.pt`` works too: its ``model`` entry is used) or ``.safetensors``. The keys may be the
net's own or, for a net made by ``attach_exits``, the backbone's (``backbone.`` is then prefixed). Exit heads
that the file does not hold keep their fresh initialization (exits attached to a backbone trained without
them); any other difference — a key of another model, a missing trunk weight, a shape — is one ``ValueError``
line listing the keys.

``freeze(net, spec)``: ``none``; ``trunk`` (every stage parameter: only the exit heads train, SDN's "IC-only"
mode); or a glob over ``net.named_parameters()`` names (``backbone.layer1.*``). Frozen parameters get
``requires_grad=False``, so the trainer's optimizers never see them, and a BatchNorm whose parameters are all
frozen (or, without parameters, that sits in a frozen part) stays in eval mode when the net is put in train
mode: its running statistics never change.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from anytrain.nets.staged import StagedNet


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.pt`` (``weights_only=True``) or ``.safetensors`` file; one-line ``ValueError``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"model.weights: no such file {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except ImportError:
        raise ValueError("model.weights: reading .safetensors needs the safetensors package") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is one line
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.weights: cannot read {p} ({first})") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]  # an anytrain checkpoint.pt / best.pt
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise ValueError(f"model.weights: {p} does not hold a state dict (names → tensors)")
    return sd


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def load_weights(net: StagedNet, path: str | Path) -> list[str]:
    """Load ``path`` into ``net``; returns the keys left at their initialization (new exit heads)."""
    sd = read_state_dict(path)
    target = net.state_dict()
    if hasattr(net, "backbone") and not any(k in target for k in sd):
        sd = {f"backbone.{k}": v for k, v in sd.items()}
    unexpected = [k for k in sd if k not in target]
    last = f"exits.{net.num_exits - 1}."
    new = [k for k in target if k not in sd and k.startswith("exits.") and not k.startswith(last)]
    missing = [k for k in target if k not in sd and k not in new]
    shapes = [k for k in sd if k in target and tuple(sd[k].shape) != tuple(target[k].shape)]
    problems = []
    if unexpected:
        problems.append(f"not in this model: {_few(unexpected)}")
    if missing:
        problems.append(f"missing: {_few(missing)}")
    if shapes:
        problems.append(f"other shape: {_few(shapes)}")
    if problems:
        raise ValueError(f"model.weights: {path} was written for another model; " + "; ".join(problems))
    net.load_state_dict(sd, strict=False)
    return new


def freeze(net: StagedNet, spec: str) -> list[str]:
    """Freeze part of ``net`` (see the module docstring); returns the frozen parameter names."""
    named = list(net.named_parameters())
    if spec == "none":
        return []
    if spec == "trunk":
        trunk = {id(p) for p in net.trunk_parameters()}
        chosen = [n for n, p in named if id(p) in trunk]

        def in_frozen_part(name: str) -> bool:
            return not name.startswith("exits.")
    else:
        chosen = [n for n, _ in named if fnmatch.fnmatchcase(n, spec)]

        def in_frozen_part(name: str) -> bool:
            return fnmatch.fnmatchcase(name + ".running_mean", spec)

    if not chosen:
        raise ValueError(f"train.freeze: {spec!r} freezes no parameter (names look like {named[0][0]!r})")
    frozen = set(chosen)
    for n, p in named:
        if n in frozen:
            p.requires_grad_(False)
    keep: list[nn.Module] = []
    for name, m in net.named_modules():
        if isinstance(m, _BatchNorm):
            own = [p for p in m.parameters(recurse=False)]
            if (own and not any(p.requires_grad for p in own)) or (not own and in_frozen_part(name)):
                keep.append(m)
    net.keep_eval(keep)
    return chosen


__all__ = ["freeze", "load_weights", "read_state_dict"]
