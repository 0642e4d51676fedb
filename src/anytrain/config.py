"""Run configuration: defaults, YAML loading (``yaml.safe_load``), ``--set key=value`` overrides, validation.

A config is a nested dict with these sections (anything under ``model``, ``rule``, ``optimizer``,
``schedule`` other than ``name`` is passed as a keyword argument to the builder)::

    seed: 0
    data:      {name: mnist1d, data_dir: null, num_samples: null, batch_size: 128, augment: true, val_size: auto,
                options: {}}
    model:     {name: cnn1d-exits, ...builder kwargs}
    rule:      {name: joint, ...rule kwargs}
    optimizer: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 5.0e-4, ...}
    schedule:  {name: cosine, ...}          # none | step (milestones, gamma) | cosine; warmup_epochs
    train:     {epochs: 30, device: auto, ...}
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from anytrain.registry import ConfigError

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "data": {
        "name": "mnist1d",
        "data_dir": None,
        "num_samples": None,
        "batch_size": 128,
        "eval_batch_size": 1000,
        "augment": True,
        "val_size": "auto",  # validation carved from the training set: auto (min(10 %, 5000)), count, fraction
        "options": {},  # data-set-specific keyword arguments (e.g. label_mode: coarse for cifar100)
    },
    "model": {"name": "nested-width"},  # 4 stages, width 8 doubling per stage (the builder's defaults)
    "rule": {"name": "osgd"},
    "optimizer": {"name": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 5.0e-4},
    "schedule": {"name": "cosine"},
    "train": {
        "epochs": 30,
        "device": "auto",
        "log_every": 20,
        "checkpoint_every": 1,
        "threads": 0,
        "progress": True,
        "tensorboard": True,
        "plots": True,
        "label_smoothing": 0.0,
    },
}

# Sections whose keys are free-form builder kwargs (only ``name`` is required).
_OPEN_SECTIONS = {"model", "rule", "optimizer", "schedule", "data.options"}


def _merge(base: dict[str, Any], new: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in new.items():
        where = f"{path}{k}"
        if k not in out and path.rstrip(".") not in _OPEN_SECTIONS:  # data.options is open too
            known = ", ".join(sorted(out))
            raise ConfigError(f"unknown config key {where!r}; known here: {known}")
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            if "name" in v and out[k].get("name") != v["name"] and k in _OPEN_SECTIONS:
                out[k] = {}  # a different builder: drop the old builder's kwargs
            out[k] = _merge(out[k], v, f"{where}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` / ``5E+4`` as floats.

    PyYAML follows YAML 1.1, where an exponent needs a dot (``1.0e-3``), so a plain ``lr: 1e-3`` would
    otherwise arrive as the *string* ``"1e-3"``. Only the float resolver is widened; nothing unsafe is added.
    """


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 style floats (``1e-3`` is a number)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader


def builder_kwargs(section: dict[str, Any]) -> dict[str, Any]:
    """A config section's keyword arguments for its builder: everything but ``name``."""
    return {k: v for k, v in section.items() if k != "name"}


def parse_value(text: str) -> Any:
    """Parse the value of ``--set key=value`` as YAML (numbers, bools, lists, null), safely."""
    try:
        return safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Defaults, then the YAML file, then ``key.sub=value`` overrides; validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = safe_load(p.read_text())
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "parse error"
            raise ConfigError(f"config {p} is not valid YAML: {first}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config {p} must be a mapping at the top level")
        cfg = _merge(cfg, data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        nested: dict[str, Any] = {}
        cur = nested
        for part in parts[:-1]:
            cur[part] = {}
            cur = cur[part]
        cur[parts[-1]] = parse_value(raw)
        cfg = _merge(cfg, nested)
    validate(cfg)
    return cfg


def _positive(cfg: dict[str, Any], section: str, key: str, kind: type = float, allow_zero: bool = False) -> None:
    v = cfg[section].get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{section}.{key} must be a number, got {v!r}")
    if kind is int and int(v) != v:
        raise ConfigError(f"{section}.{key} must be an integer, got {v!r}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{section}.{key} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def validate(cfg: dict[str, Any]) -> None:
    for sec in ("data", "model", "rule", "optimizer", "schedule", "train"):
        if not isinstance(cfg.get(sec), dict):
            raise ConfigError(f"config section {sec!r} must be a mapping")
    if not isinstance(cfg["data"].get("options"), dict):
        raise ConfigError("data.options must be a mapping of data-set keyword arguments")
    for sec in ("model", "rule", "optimizer", "schedule"):
        if not isinstance(cfg[sec].get("name"), str):
            raise ConfigError(f"{sec}.name must be a string")
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
        raise ConfigError(f"seed must be an integer, got {cfg['seed']!r}")
    _positive(cfg, "data", "batch_size", int)
    _positive(cfg, "data", "eval_batch_size", int)
    _positive(cfg, "data", "num_samples", int)
    _positive(cfg, "train", "epochs", int)
    _positive(cfg, "train", "log_every", int)
    _positive(cfg, "train", "checkpoint_every", int)
    _positive(cfg, "optimizer", "lr")
    _positive(cfg, "optimizer", "weight_decay", allow_zero=True)
    _positive(cfg, "optimizer", "momentum", allow_zero=True)


def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
