"""Staged (multi-exit) networks and their builders. ``build_model(name, **kwargs)``; ``MODELS`` lists them."""

from __future__ import annotations

import re
from typing import Any

from anytrain.nets.attach import AttachedNet, TokenHead, attach_exits
from anytrain.nets.flops import macs_of
from anytrain.nets.staged import StagedNet, check_exits, detach_state, require_staged
from anytrain.registry import ConfigError, Registry, as_config_error

MODELS: Registry = Registry("model")


def build_model(name: str, **kwargs: Any) -> StagedNet:
    """Build a registered model, or with ``name`` = ``package.module:function`` call the user's function. Builders
    take ``in_shape`` and ``num_classes`` plus their own options; a bad option is a one-line ``ConfigError``."""
    if _USER_MODEL.fullmatch(name):
        return _user_model(name, **kwargs)
    _load_builders()
    return MODELS.build(name, **kwargs)


_USER_MODEL = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # package.module:function; anything else: the registry


def _user_model(name: str, **kwargs: Any) -> StagedNet:
    # ``package.module:function`` from the user's code (importable, or a module in the working directory)
    import importlib
    import sys

    mod_name, _, fn_name = name.partition(":")
    try:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name.split(".")[0] or "" in sys.path:
                raise
            sys.path.insert(0, "")
            mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"model {name!r}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"model {name!r}: {mod_name!r} has no function {fn_name!r}")
    with as_config_error(f"model {name!r}"):
        net = fn(**kwargs)
    if not isinstance(net, StagedNet):
        raise ConfigError(
            f"model {name!r} returned a {type(net).__name__}, not a StagedNet: wrap it with StagedNet(stages, exits) "
            "or anytrain.nets.attach_exits(model, at=[...], ...)"
        )
    return net


def _load_builders() -> None:
    # Import the builder modules for their registration side effect (kept lazy to avoid import cycles).
    import importlib

    for mod in _BUILDER_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


_BUILDER_MODULES = [
    "anytrain.nets.branched",
    "anytrain.nets.nested",
    "anytrain.nets.msdnet",
    "anytrain.nets.backbones",
]

__all__ = [
    "MODELS",
    "AttachedNet",
    "StagedNet",
    "TokenHead",
    "attach_exits",
    "build_model",
    "check_exits",
    "detach_state",
    "macs_of",
    "require_staged",
]
