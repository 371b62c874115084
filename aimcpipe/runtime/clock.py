"""Mapping the stages' clocks onto the scheduler's, for one merged trace.

Every process times its actions with ``time.perf_counter``. On Linux that is the system-wide
monotonic clock, so processes on one machine (the same boot: equal
``/proc/sys/kernel/random/boot_id``) share it exactly and need no correction. For a stage on
another machine the offset is estimated as NTP does: ask its clock between two readings of
ours, take the round trip with the smallest delay, and assume the reply was read half-way;
the error is at most half that round trip, which is recorded with the trace.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["boot_id", "estimate_offset", "same_clock", "sleep_until", "tighten_timers"]


def boot_id() -> str:
    """This boot's id: processes that report the same one read the same monotonic clock."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def same_clock(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two processes (``process_info`` dicts) read the same monotonic clock."""
    return bool(a.get("boot_id")) and a.get("boot_id") == b.get("boot_id")


def estimate_offset(read_remote: Callable[[], float], rounds: int = 7) -> tuple[float, float]:
    """``(offset, error)``: remote clock − local clock, and its bound (half the best round
    trip), from ``rounds`` calls of ``read_remote``."""
    best: tuple[float, float] | None = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        remote = read_remote()
        t1 = time.perf_counter()
        candidate = (remote - (t0 + t1) / 2, (t1 - t0) / 2)
        if best is None or candidate[1] < best[1]:
            best = candidate
    assert best is not None
    return best


_PR_SET_TIMERSLACK = 29  # prctl(2) option


def tighten_timers() -> bool:
    """Let this thread's sleeps and timed waits end as close to their due time as the kernel
    can (Linux: a timer slack of 1 ns instead of the default 50 µs, by which the kernel may
    defer a wake-up to batch it with others). Emulated device time waits out most actions and
    holds messages until a due time, so the slack would add to every action. Returns whether
    it was applied (not on other systems, or where ``prctl`` is refused)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


WAKE_EARLY_S = 0.0005  # sleep_until wakes this long before its due time and spins the rest
_yield_core = getattr(os, "sched_yield", lambda: None)  # (Unix only)


def sleep_until(due: float, clock: Callable[[], float] = time.perf_counter) -> float:
    """Wait until ``clock()`` reaches ``due``; returns the clock then. Sleeps until
    :data:`WAKE_EARLY_S` before ``due``, then spins, yielding the core on every turn. Emulated
    device time waits like this before most actions and messages: a thread woken from a
    sleep on a VM is often 100 µs or more late (its virtual CPU was idle and has to be
    scheduled again), even with :func:`tighten_timers`, and a spin that yields keeps the
    virtual CPU awake without taking it from a stage that has work."""
    while (left := due - clock()) > WAKE_EARLY_S:
        time.sleep(left - WAKE_EARLY_S)
    while (now := clock()) < due:
        _yield_core()
    return now
