"""Name → factory registries (models, rules, optimizers, data sets, schedules).

A registry maps a lower-case name to a callable. Unknown names raise a ``ConfigError`` whose one-line message
lists the known names, so the CLI can print it as is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(ValueError):
    """Bad user input (config value, name, path). The message is one line meant for the user."""


class Registry(Generic[F]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[F], F]:
        key = name.lower()

        def deco(fn: F) -> F:
            if key in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._items[key] = fn
            doc = (fn.__doc__ or "").strip().splitlines()
            self._help[key] = help or (doc[0] if doc else "")
            return fn

        return deco

    def get(self, name: str) -> F:
        key = str(name).lower()
        if key not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}")
        return self._items[key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def describe(self) -> list[tuple[str, str]]:
        return [(k, self._help[k]) for k in sorted(self._items)]
