"""One registry per kind of thing (prompt methods, heads, initialisers, data sources), filled by decorators.

Adding a method, head, initialiser or data source is one file in its package: the file registers
itself with its name and its config model, the package's modules are imported when the registry is
first asked (so nothing else lists them), and `promptcil.config.schema` builds the params schema
from what registered: the valid names and each one's settings come from here, never from a list.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    config: type[BaseModel] | None
    """Its settings: a section of its own (method.<name>, head.<name>, init.<name>), or, for a data source,
    fields added to `data` itself."""


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str) -> None:
        """
        Args:
            kind: what is registered, for messages ("prompt method").
            package: the package whose modules register themselves (imported on first use).
        """
        self.kind, self.package = kind, package
        self._entries: dict[str, Entry[T]] = {}
        self._discovered = False

    def register(self, name: str, config: type[BaseModel] | None = None) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries and self._entries[name].obj is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = Entry(name, obj, config)
            return obj

        return add

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")

    def entries(self) -> list[Entry[T]]:
        self._discover()
        return list(self._entries.values())

    def names(self) -> list[str]:
        return [entry.name for entry in self.entries()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __getitem__(self, name: str) -> Entry[T]:
        self._discover()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} '{name}' (known: {', '.join(sorted(self._entries))})")
        return self._entries[name]

    def settings(self, name: str, section: Any) -> Any:
        """The registered thing's own settings inside an assembled section (None when it has none)."""
        return getattr(section, name, None) if self[name].config is not None else None
