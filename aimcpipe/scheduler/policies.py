"""Schedule policies as action-list generators (docs/design.md §4).

Every policy is a function ``(num_stages, Bm, K, **options) -> Schedule``; the three
pipeline policies of the project differ *only* in the per-stage lists they produce, so one
simulator times them and one runtime interpreter executes them.

Micro-batches are numbered across the run: mini-batch ``k`` holds ``k*Bm .. k*Bm + Bm - 1``.

* ``wop``        one micro-batch in flight: F(n), B(n) on every stage, next n; one U per stage
                 and mini-batch applying all Bm micro-batches.
* ``sync-1f1b``  per mini-batch: min(S-1-s, Bm) warm-up forwards, 1F1B steady state, backward
                 drain, then U of the whole mini-batch (a flush: the next mini-batch's forwards
                 come after it in the list).
* ``async``      PipeDream-style 1F1B without flush: W_s = S-1-s warm-up forwards (fewer if
                 the run has fewer micro-batches), then F(n), B(n-W_s), U(n-W_s), ...; drains
                 only at the end of the run (or every ``drain_every`` mini-batches). Each U
                 applies one micro-batch, so the backward of n runs after S-1-s updates that its
                 forward did not see (staleness S-1-s).
* ``gpipe``      per mini-batch: all forwards, all backwards, U (flush); for comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aimcpipe.errors import ConfigError
from aimcpipe.scheduler.actions import BACKWARD, FORWARD, UPDATE, Action, Schedule

__all__ = ["POLICIES", "build_schedule"]

_new = Action._fast


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _wop_stage(s: int, bm: int, k: int) -> list[Action]:
    acts: list[Action] = []
    for mb in range(k):
        base = mb * bm
        for n in range(base, base + bm):
            one = (n,)
            acts.append(_new(FORWARD, s, one))
            acts.append(_new(BACKWARD, s, one))
        acts.append(_new(UPDATE, s, tuple(range(base, base + bm))))
    return acts


def _sync_1f1b_stage(s: int, num_stages: int, bm: int, k: int) -> list[Action]:
    acts: list[Action] = []
    warmup = min(num_stages - 1 - s, bm)
    for mb in range(k):
        base = mb * bm
        for i in range(warmup):
            acts.append(_new(FORWARD, s, (base + i,)))
        for i in range(bm - warmup):
            acts.append(_new(FORWARD, s, (base + warmup + i,)))
            acts.append(_new(BACKWARD, s, (base + i,)))
        for i in range(bm - warmup, bm):
            acts.append(_new(BACKWARD, s, (base + i,)))
        acts.append(_new(UPDATE, s, tuple(range(base, base + bm))))
    return acts


def _gpipe_stage(s: int, bm: int, k: int) -> list[Action]:
    acts: list[Action] = []
    for mb in range(k):
        base = mb * bm
        acts.extend(_new(FORWARD, s, (n,)) for n in range(base, base + bm))
        acts.extend(_new(BACKWARD, s, (n,)) for n in range(base, base + bm))
        acts.append(_new(UPDATE, s, tuple(range(base, base + bm))))
    return acts


def _async_stage(s: int, num_stages: int, total: int, segment: int) -> list[Action]:
    """1F1B without flush over ``total`` micro-batches, drained every ``segment`` of them."""
    acts: list[Action] = []
    append = acts.append
    for base in range(0, total, segment):
        end = min(base + segment, total)
        warmup = min(num_stages - 1 - s, end - base)
        for n in range(base, base + warmup):
            append(_new(FORWARD, s, (n,)))
        for n in range(base + warmup, end):
            append(_new(FORWARD, s, (n,)))
            old = (n - warmup,)
            append(_new(BACKWARD, s, old))
            append(_new(UPDATE, s, old))
        for n in range(end - warmup, end):
            one = (n,)
            append(_new(BACKWARD, s, one))
            append(_new(UPDATE, s, one))
    return acts


def _build_wop(num_stages: int, bm: int, k: int) -> Schedule:
    stages = tuple(tuple(_wop_stage(s, bm, k)) for s in range(num_stages))
    return Schedule("wop", stages, bm, k)


def _build_sync_1f1b(num_stages: int, bm: int, k: int) -> Schedule:
    stages = tuple(tuple(_sync_1f1b_stage(s, num_stages, bm, k)) for s in range(num_stages))
    return Schedule("sync-1f1b", stages, bm, k)


def _build_gpipe(num_stages: int, bm: int, k: int) -> Schedule:
    stages = tuple(tuple(_gpipe_stage(s, bm, k)) for s in range(num_stages))
    return Schedule("gpipe", stages, bm, k)


def _build_async(
    num_stages: int,
    bm: int,
    k: int,
    weight_stashing: bool = False,
    drain_every: int | None = None,
) -> Schedule:
    """``drain_every``: drain the pipeline after every that many mini-batches (e.g. one
    epoch, where the runtime needs a consistent model to evaluate or checkpoint); None
    drains only at the end of the run, as the closed form of docs/design.md §4.5 assumes."""
    if not isinstance(weight_stashing, bool):
        raise ConfigError(f"weight_stashing must be true or false, got {weight_stashing!r}")
    total = bm * k
    segment = total if drain_every is None else _check_int("drain_every", drain_every, 1) * bm
    stages = tuple(tuple(_async_stage(s, num_stages, total, segment)) for s in range(num_stages))
    return Schedule("async", stages, bm, k, weight_stashing=weight_stashing)


POLICIES: dict[str, Callable[..., Schedule]] = {
    "wop": _build_wop,
    "sync-1f1b": _build_sync_1f1b,
    "async": _build_async,
    "gpipe": _build_gpipe,
}
"""Built-in policies by name; values take ``(num_stages, Bm, K, **options)``."""

_OPTIONS = {"async": ("weight_stashing", "drain_every")}


def build_schedule(
    policy: str, num_stages: int, microbatches: int, minibatches: int = 1, **options: Any
) -> Schedule:
    """Build the schedule of a built-in ``policy`` for ``num_stages`` stages and
    ``minibatches`` mini-batches of ``microbatches`` micro-batches each.

    Options: async takes ``weight_stashing`` (bool) and ``drain_every`` (mini-batches);
    the other policies take none. Raises :class:`ConfigError` naming a bad argument.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; allowed: {', '.join(POLICIES)}")
    _check_int("num_stages", num_stages, 1)
    _check_int("microbatches", microbatches, 1)
    _check_int("minibatches", minibatches, 1)
    allowed = _OPTIONS.get(policy, ())
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"policy {policy!r} takes no option {key!r}; "
                f"allowed: {', '.join(allowed) if allowed else 'none'}"
            )
    return POLICIES[policy](num_stages, microbatches, minibatches, **options)
