"""Staged (multi-exit) networks and their builders. ``build_model(name, **kwargs)``; ``MODELS`` lists them."""

from __future__ import annotations

from typing import Any

from anytrain.nets.attach import AttachedNet, TokenHead, attach_exits
from anytrain.nets.flops import macs_of
from anytrain.nets.staged import StagedNet, check_exits, detach_state, require_staged
from anytrain.registry import Registry

MODELS: Registry = Registry("model")


def build_model(name: str, **kwargs: Any) -> StagedNet:
    """Build a registered model. Builders take ``in_shape`` and ``num_classes`` plus their own options; a bad
    option is a one-line ``ConfigError``."""
    _load_builders()
    return MODELS.build(name, **kwargs)


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
