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
import math
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


def _config_path(path: str | Path) -> Path:
    """The config file ``path`` names: the file itself, or else one of the configs shipped in the package
    (so ``configs/default.yaml`` works from an installed wheel too)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config {p} is a directory, not a YAML file")
    if not p.exists() and (len(p.parts) == 1 or p.parts[-2:-1] == ("configs",)):
        shipped = Path(__file__).parent / "configs" / p.name
        if shipped.is_file():
            return shipped
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    return p


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (safe loader); every problem is a one-line ``ConfigError``."""
    p = _config_path(path)
    try:
        text = p.read_bytes().decode()
        data = safe_load(text)
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {p} is not a text file (not UTF-8): is it really a YAML config?") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "parse error"
        raise ConfigError(f"config {p} is not valid YAML: {first}") from None
    except RecursionError:
        raise ConfigError(f"config {p} is nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must be a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Defaults, then the YAML file, then ``key.sub=value`` overrides; validated."""
    cfg = copy.deepcopy(DEFAULTS)
    try:
        if path is not None:
            cfg = _merge(cfg, read_config_file(path))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            key, _, raw = item.partition("=")
            parts = key.strip().split(".")
            if not all(parts):
                raise ConfigError(f"--set expects a dotted key such as optimizer.lr, got {key!r}")
            nested: dict[str, Any] = {}
            cur = nested
            for part in parts[:-1]:
                cur[part] = {}
                cur = cur[part]
            cur[parts[-1]] = parse_value(raw)
            cfg = _merge(cfg, nested)
        validate(cfg)
    except RecursionError:  # a YAML alias that refers to itself
        raise ConfigError("the config refers to itself (a recursive YAML alias) or is nested too deeply") from None
    return cfg


# Settings that may change on ``--resume`` because they do not change what is computed (where it runs, how it is
# reported, how often it is saved). Any other change would silently alter a run half-way, so it is refused.
RESUME_SETTINGS = (
    "train.device",
    "train.threads",
    "train.progress",
    "train.tensorboard",
    "train.plots",
    "train.log_every",
    "train.checkpoint_every",
    "data.eval_batch_size",
)


def resume_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys that differ between a run's config and ``new`` and may not change on resume."""
    return [k for k in changed_keys(old, new) if k not in RESUME_SETTINGS]


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (a key present in only one of them counts)."""
    out: list[str] = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif k not in old or k not in new or a != b or type(a) is not type(b):
            out.append(f"{prefix}{k}")
    return out


# ---- validation ------------------------------------------------------------------------------------------------
_PLAIN = (str, int, float, bool, type(None))
SEED_LIMIT = 2**32  # seeds feed numpy/torch generators (and derived per-rank streams): keep them 32-bit
_INT64 = 2**63


def _check_tree(obj: Any, where: str, seen: set[int]) -> None:
    """Keys are strings, values plain YAML scalars, lists or mappings; floats finite; integers 64-bit.
    A container shared through YAML aliases is checked once (so an alias bomb costs nothing)."""
    if isinstance(obj, (dict, list)):
        if id(obj) in seen:
            return
        seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ConfigError(f"config keys must be strings, got {k!r} in {where or 'the top level'}")
            _check_tree(v, f"{where}.{k}" if where else k, seen)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_tree(v, f"{where}[{i}]", seen)
    elif not isinstance(obj, _PLAIN):
        raise ConfigError(f"{where} must be a number, string, boolean, list or mapping, got {type(obj).__name__}")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{where} must be finite, got {obj!r}")
    elif isinstance(obj, int) and not isinstance(obj, bool) and not -_INT64 <= obj < _INT64:
        raise ConfigError(f"{where} is out of range ({obj}); integers must fit in 64 bits")


# Typed keys: (kind, lower, upper, lower included, upper included); kind is int, float (any number), bool or str.
# Keys of the open sections are checked only when present (the builders check the rest of their keywords).
_INF = math.inf
_SPEC: dict[str, tuple[type, float, float, bool, bool]] = {
    "seed": (int, 0, SEED_LIMIT, True, False),
    "data.name": (str, 0, 0, True, True),
    "data.data_dir": (str, 0, 0, True, True),
    "data.batch_size": (int, 0, _INF, False, False),
    "data.eval_batch_size": (int, 0, _INF, False, False),
    "data.num_samples": (int, 0, _INF, False, False),
    "data.augment": (bool, 0, 0, True, True),
    "train.epochs": (int, 0, _INF, False, False),
    "train.device": (str, 0, 0, True, True),
    "train.log_every": (int, 0, _INF, False, False),
    "train.checkpoint_every": (int, 0, _INF, False, False),
    "train.threads": (int, 0, _INF, True, False),  # 0: torch's default
    "train.progress": (bool, 0, 0, True, True),
    "train.tensorboard": (bool, 0, 0, True, True),
    "train.plots": (bool, 0, 0, True, True),
    "train.label_smoothing": (float, 0, 1, True, False),
    "model.width": (int, 0, _INF, False, False),
    "model.exits": (int, 0, _INF, False, False),
    "optimizer.lr": (float, 0, _INF, False, False),
    "optimizer.momentum": (float, 0, 1, True, False),
    "optimizer.weight_decay": (float, 0, _INF, True, False),
    "schedule.warmup_epochs": (float, 0, _INF, True, False),
    "schedule.final_factor": (float, 0, 1, True, True),
    "schedule.gamma": (float, 0, _INF, False, False),
}
_NULLABLE = {"data.data_dir", "data.num_samples"}


def _range_text(lo: float, hi: float, lo_in: bool, hi_in: bool) -> str:
    if hi == _INF:
        return f"{'>=' if lo_in else '>'} {lo}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def _check_value(key: str, v: Any, kind: type, lo: float, hi: float, lo_in: bool, hi_in: bool) -> None:
    if kind is bool or kind is str:
        if not isinstance(v, kind):
            what = "true or false" if kind is bool else "a string"
            raise ConfigError(f"{key} must be {what}, got {v!r}")
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if kind is int and not isinstance(v, int):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    if v < lo or (v == lo and not lo_in) or v > hi or (v == hi and not hi_in):
        raise ConfigError(f"{key} must be {_range_text(lo, hi, lo_in, hi_in)}, got {v!r}")


def validate(cfg: dict[str, Any]) -> None:
    """Check a merged config; raises a one-line ``ConfigError`` naming the first bad key."""
    _check_tree(cfg, "", set())
    for sec in ("data", "model", "rule", "optimizer", "schedule", "train"):
        if not isinstance(cfg.get(sec), dict):
            raise ConfigError(f"config section {sec!r} must be a mapping")
    if not isinstance(cfg["data"].get("options"), dict):
        raise ConfigError("data.options must be a mapping of data-set keyword arguments")
    for sec in ("model", "rule", "optimizer", "schedule"):
        if not isinstance(cfg[sec].get("name"), str):
            raise ConfigError(f"{sec}.name must be a string")
    for key, spec in _SPEC.items():
        sec, _, name = key.rpartition(".")
        where = cfg[sec] if sec else cfg
        if name not in where or (where[name] is None and key in _NULLABLE):
            continue
        _check_value(key, where[name], *spec)
    ms = cfg["schedule"].get("milestones")
    if ms is not None and (
        not isinstance(ms, list) or not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in ms)
    ):
        raise ConfigError(f"schedule.milestones must be a list of epochs (numbers), got {ms!r}")
    if ms and min(ms) < 0:
        raise ConfigError(f"schedule.milestones must be >= 0, got {ms!r}")


# The first line of every config.yaml anytrain writes into a run directory: how a run directory is recognized
# (``--resume``, ``--overwrite``), so that a user's own folder with a config.yaml in it is never taken for one.
RUN_HEADER = "# anytrain run: the fully resolved config of this run directory"


def dump_config(cfg: dict[str, Any]) -> str:
    return f"{RUN_HEADER}\n{yaml.safe_dump(cfg, sort_keys=False)}"
