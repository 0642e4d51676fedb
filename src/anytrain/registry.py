"""Name → factory registries (models, rules, optimizers, data sets, schedules).

A registry maps a lower-case name to a callable. Unknown names raise a ``ConfigError`` whose one-line message
lists the known names, so the CLI can print it as is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(ValueError):
    """Bad user input (config value, name, path). The message is one line meant for the user."""


@contextmanager
def as_config_error(what: str) -> Iterator[None]:
    """Report a ``TypeError``/``ValueError`` raised while building ``what`` from a config (a bad keyword or value)
    as a one-line ``ConfigError`` that starts with ``what``: the one place this translation is written."""
    try:
        yield
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ConfigError(msg if msg.startswith(what) else f"{what}: {msg}") from None


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

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered as ``name``. A keyword its signature does not take, or any
        ``TypeError``/``ValueError`` it raises, is a one-line ``ConfigError`` starting with ``<kind> '<name>'``."""
        fn, what = self.get(name), f"{self.kind} {name!r}"
        params = list(inspect.signature(fn).parameters.values())
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            allowed = [p.name for p in params[len(args) :] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            unknown = sorted(set(kwargs) - set(allowed))
            if unknown:
                rest = ", ".join(k for k in allowed if k not in kwargs) or "none"
                raise ConfigError(f"{what}: unknown option(s) {', '.join(unknown)}; allowed: {rest}")
        with as_config_error(what):
            return fn(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def describe(self) -> list[tuple[str, str]]:
        return [(k, self._help[k]) for k in sorted(self._items)]
