"""Stash and staleness: properties of each stage's action *order*, not of timing.

A stage runs its list sequentially, so what it holds and which weights an action sees
depend only on the order of its own actions (timing cannot reorder them). Definitions:

**Stash.** Micro-batch n occupies one stash slot on stage s from its ``F(n)`` (the input
activation x is saved for backward) until the ``U`` that applies n (on AIMC the update is
the pulsed outer product of x and the backpropagated d, so x and d stay held after ``B(n)``
until ``U``). ``peak_stash[s]`` is the maximum number of slots held at once.
``peak_activations[s]`` counts only F(n)..B(n) (activations awaiting their backward).

Closed forms (derived in tests/scheduler/test_metrics.py), N = K*Bm:
async ``min(S-s, N)`` for both; sync-1f1b stash ``Bm`` and activations ``min(S-s, Bm)``;
wop stash ``Bm``, activations 1; gpipe ``Bm`` for both.

**Staleness.** ``update_delay`` of micro-batch n on stage s = number of micro-batches that
U actions on s applied between ``F(n)`` and ``B(n)``: the weight versions the backward is
ahead of the forward (and the delay of n's gradient relative to the weights it was computed
at). Async gives ``min(j, S-1-s)`` for the j-th micro-batch since the last drain (S-1-s once
the pipeline is full); wop, sync-1f1b and gpipe give 0. ``staleness`` is the *effective*
forward/backward weight mismatch the backward sees: equal to ``update_delay`` without weight
stashing, and 0 with it (PipeDream's stash makes B use F's version; the gradient is still
applied ``update_delay`` updates late, which ``update_delay`` keeps reporting).
"""

from __future__ import annotations

from dataclasses import dataclass

from aimcpipe.scheduler.actions import BACKWARD, FORWARD, Schedule

__all__ = ["OrderMetrics", "order_metrics"]


@dataclass(frozen=True)
class OrderMetrics:
    """Per-stage tuples; histograms map a staleness value to its number of micro-batches."""

    peak_stash: tuple[int, ...]
    peak_activations: tuple[int, ...]
    staleness: tuple[int, ...]
    update_delay: tuple[int, ...]
    staleness_histogram: tuple[dict[int, int], ...]
    update_delay_histogram: tuple[dict[int, int], ...]


def order_metrics(schedule: Schedule) -> OrderMetrics:
    """Stash peaks and staleness of every stage (see the module docstring)."""
    peak_stash, peak_act, delay_max, delay_hist = [], [], [], []
    for acts in schedule.stages:
        held = held_act = peak = peak_a = applied = 0
        mark: dict[int, int] = {}
        hist: dict[int, int] = {}
        for kind, _, mbs in acts:
            if kind == FORWARD:
                mark[mbs[0]] = applied
                held += 1
                held_act += 1
                if held > peak:
                    peak = held
                if held_act > peak_a:
                    peak_a = held_act
            elif kind == BACKWARD:
                held_act -= 1
                d = applied - mark[mbs[0]]
                hist[d] = hist.get(d, 0) + 1
            else:
                k = len(mbs)
                held -= k
                applied += k
        peak_stash.append(peak)
        peak_act.append(peak_a)
        delay_max.append(max(hist) if hist else 0)
        delay_hist.append(dict(sorted(hist.items())))
    if schedule.weight_stashing:
        staleness = tuple(0 for _ in delay_max)
        stale_hist = tuple({0: sum(h.values())} if h else {} for h in delay_hist)
    else:
        staleness = tuple(delay_max)
        stale_hist = tuple(dict(h) for h in delay_hist)
    return OrderMetrics(
        peak_stash=tuple(peak_stash),
        peak_activations=tuple(peak_act),
        staleness=staleness,
        update_delay=tuple(delay_max),
        staleness_histogram=stale_hist,
        update_delay_histogram=tuple(delay_hist),
    )
