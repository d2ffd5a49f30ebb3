"""Components are looked up by name in small dicts; an unknown name lists the known ones."""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``, or ValueError: "unknown <what> 'x'; known <what>s: a, b, c."."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known {what}s: {', '.join(registry)}.") from None
