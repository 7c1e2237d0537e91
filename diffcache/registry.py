"""Name -> implementation tables filled by decorators (search methods, quality objectives, reuse mechanisms), so
adding one is a new module and a registration, never an edit to a dispatch chain."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Registered implementations of one ``kind`` (e.g. ``"search method"``), in registration order.

    ``get`` raises ``error`` (a `DiffcacheError` subclass) for an unknown name, listing the known ones and
    ``hint`` (how to register one, or what else is accepted).
    """

    def __init__(self, kind: str, error: type[Exception], hint: str = "") -> None:
        self.kind, self.error, self.hint = kind, error, hint
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (a duplicate name is a ``ValueError``)."""

        def decorate(item: T) -> T:
            if name in self._items:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            self._items[name] = item
            return item

        return decorate

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> T:
        if name not in self._items:
            raise self.error(f"unknown {self.kind} {name!r}; choose from {self.names()}{self.hint}")
        return self._items[name]
