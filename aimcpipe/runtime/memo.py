"""Values derived from large immutable objects, remembered by the objects' identity.

Every epoch of the same shape shares one schedule (``plan.cached_schedule``), and several
things are derived from it alone: each action's message keys, the in-process interleaving
of the stages, the simulator's prediction. Hashing a schedule's action tuples would cost
about as much as deriving them again, so these are remembered by the identity of the objects
they come from. An entry holds its objects, so their ids cannot be reused while it lives.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["ByIdentity"]

V = TypeVar("V")


class ByIdentity(Generic[V]):
    """At most ``size`` values, each derived from the objects ``owners`` (compared by
    identity) and a hashable ``extra``; the oldest half is forgotten when full."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: dict[tuple[Hashable, ...], tuple[tuple[object, ...], V]] = {}

    def get(self, owners: tuple[object, ...], extra: Hashable, make: Callable[[], V]) -> V:
        key = (*map(id, owners), extra)
        hit = self._entries.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], owners, strict=True)):
            return hit[1]
        value = make()
        if len(self._entries) >= self._size:
            for old in list(self._entries)[: self._size // 2 + 1]:
                del self._entries[old]
        self._entries[key] = (owners, value)
        return value
