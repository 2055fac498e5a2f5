"""Name -> implementation registries (timm style): the names are the strings a job spec uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """A dict of named entries filled by a decorator; ``kind`` names the entries in errors."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(entry: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self[name] = entry
            return entry

        return decorate
