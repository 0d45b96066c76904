"""One registry helper for everything looked up by a config value: strategies, quantizers,
INT-N code quantizers, lr schedules and memory accounting.

Hand-written (a dict with one-line errors) because a misspelled choice must name the config
key and the valid choices, and a name defined twice must say where both definitions live.
"""

from __future__ import annotations

import inspect
from typing import Callable, Generic, Hashable, Iterator, TypeVar

from lorabench.errors import ConfigError

T = TypeVar("T")


def _origin(obj: object) -> str:
    """Where `obj` is defined (module or file), for duplicate-name errors."""
    module = getattr(obj, "__module__", None)
    try:
        return inspect.getsourcefile(obj) or module or repr(obj)  # type: ignore[arg-type]
    except TypeError:
        return module or repr(obj)


class Registry(Generic[T]):
    """Name → object, filled by a decorator; `key` is the config key a lookup error names."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind  # what is registered, for messages ("strategy", "quantizer", ...)
        self.key = key  # the config key that selects an entry ("strategy.name", ...)
        self._entries: dict[Hashable, T] = {}

    def add(self, name: Hashable, obj: T) -> T:
        """Register `obj` under `name`; a second, different object under one name is refused."""
        old = self._entries.get(name)
        if old is not None and old is not obj and _origin(old) != _origin(obj):
            raise ConfigError(
                f"{self.key}: {self.kind} '{name}' is defined twice: in {_origin(old)} and in {_origin(obj)}"
            )
        self._entries[name] = obj
        return obj

    def register(self, name: Hashable) -> Callable[[T], T]:
        """Decorator form of `add`."""
        return lambda obj: self.add(name, obj)

    def get(self, name: Hashable) -> T:
        """The entry for `name`, or a one-line error naming the key and the choices."""
        if name not in self._entries:
            raise ConfigError(f"{self.key}: unknown {self.kind} '{name}', expected one of {self.names()}")
        return self._entries[name]

    def for_type(self, cls: type) -> T | None:
        """Type-keyed registries: the entry of the nearest registered class in `cls`'s MRO."""
        for base in cls.__mro__:
            if base in self._entries:
                return self._entries[base]
        return None

    def names(self) -> list[str]:
        """Sorted names of every entry."""
        return sorted(str(n) for n in self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._entries)
