"""Stage hosts keep the cyclic garbage collector out of timed epochs (see settle_garbage)."""

from __future__ import annotations

import gc
import weakref

from aimcpipe.runtime.host import settle_garbage


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_settle_collects_garbage_and_freezes_the_survivors():
    try:
        garbage = Node()
        dead = weakref.ref(garbage)
        alive = Node()
        del garbage
        settle_garbage(full=True)
        assert dead() is None
        assert gc.get_freeze_count() > 0
        # a frozen object that later becomes garbage waits for the next job's full settle
        lingering = weakref.ref(alive)
        del alive
        settle_garbage()
        assert lingering() is not None
        settle_garbage(full=True)
        assert lingering() is None
    finally:
        gc.unfreeze()
