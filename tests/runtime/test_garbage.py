"""Stage hosts keep the cyclic garbage collector out of timed epochs (see settle_garbage) and
reuse the memory they free (keep_freed_memory)."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import weakref

import pytest

from aimcpipe.runtime.host import _MALLOC_ENV, keep_freed_memory, settle_garbage


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


_CHURN = """
import resource, sys, torch
from aimcpipe.runtime.host import keep_freed_memory
applied = keep_freed_memory()
def churn():  # what a stage does every mini-batch: buffers of a few MiB, allocated and freed
    for mib in (1, 8, 2, 16, 4):
        torch.empty(mib << 18).fill_(1.0)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt",
)
def test_a_stage_process_reuses_the_memory_it_frees():
    env = {k: v for k, v in os.environ.items() if k not in _MALLOC_ENV}
    out = subprocess.run(
        [sys.executable, "-c", _CHURN], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "True"
    # 20 rounds free and re-touch 31 MiB each (~160,000 pages): none comes back as a fault
    assert int(out[1]) < 100


def test_a_users_own_malloc_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
