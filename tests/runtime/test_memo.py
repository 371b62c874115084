"""Values remembered by the identity of the objects they derive from."""

from __future__ import annotations

from aimcpipe.runtime.memo import ByIdentity


def test_values_are_remembered_per_object_identity_and_extra_key():
    cache: ByIdentity[int] = ByIdentity(4)
    made: list[str] = []

    def make(tag: str, value: int):
        def build() -> int:
            made.append(tag)
            return value

        return build

    owner = (1, 2, 3)
    twin = tuple([1, 2, 3])  # equal, but another object
    assert twin == owner and twin is not owner
    assert cache.get((owner,), "a", make("first", 1)) == 1
    assert cache.get((owner,), "a", make("again", 2)) == 1  # remembered
    assert cache.get((twin,), "a", make("twin", 3)) == 3  # identity, not equality
    assert cache.get((owner,), "b", make("other extra", 4)) == 4
    assert made == ["first", "twin", "other extra"]


def test_a_full_cache_forgets_its_oldest_entries():
    cache: ByIdentity[int] = ByIdentity(4)
    owners = [object() for _ in range(6)]
    for i, o in enumerate(owners):
        cache.get((o,), None, lambda i=i: i)
    assert len(cache._entries) <= 4
    calls = []
    assert cache.get((owners[-1],), None, lambda: calls.append(1) or -1) == 5  # newest kept
    assert calls == []
