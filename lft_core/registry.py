"""A registry: the named things of one kind (training methods, baselines), in menu order. Every menu, CLI choice,
figure legend and record reads its registry, so a name is spelt once; an unknown name is one ``LFTError``."""
from __future__ import annotations

from typing import Generic, TypeVar

from lft_core.errors import LFTError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """``name -> item`` (each item has a ``name``), in the order they were registered. ``kind`` names the things
    in messages ("training method"); ``reserved`` are names no item may take."""

    def __init__(self, kind: str, reserved: tuple[str, ...] = ()):
        super().__init__()
        self.kind, self.reserved = kind, reserved

    def register(self, item: T) -> T:
        """Add ``item`` under its name, which must be a new plain word."""
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name.isidentifier() or name in self or name in self.reserved:
            raise LFTError(f"cannot register {self.kind} {name!r}: the name is taken or not a plain word")
        self[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove the item called ``name`` (tests that add a toy one)."""
        self.pop(name, None)

    def lookup(self, name: str) -> T:
        """The item called ``name``; one LFTError naming the known ones otherwise."""
        try:
            return self[name]
        except (KeyError, TypeError):
            raise LFTError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self)}") from None
