"""Components are looked up by name in small registries; an unknown name lists the known ones.

A registry is the one home of its names: config validation, command-line choices and the tuning space
read ``registry.names`` instead of repeating them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import TypeVar

from .errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, ValueError, KeyError):
    """A name no registry entry has. A ValueError for callers, a KeyError so ``name in registry`` works."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Mapping[str, T]):
    """Entries by name, in the order given; ``registry[name]`` of an unknown name raises UnknownNameError."""

    def __init__(self, kind: str, entries: Mapping[str, T], plural: str | None = None):
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._entries = dict(entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None

    def register(self, name: str, entry: T) -> None:
        """Add ``entry`` under a new ``name`` (plug-ins registering themselves); a taken name is a bug."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered already.")
        self._entries[name] = entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def unknown_message(self, name: object) -> str:
        close = difflib.get_close_matches(str(name), self.names, n=2)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names)}.{hint}"

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self.names)})"
