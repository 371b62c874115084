"""Reject schedules that cannot run, naming the action where they go wrong.

Two passes, both linear in the number of actions:

1. **static** (per stage, in list order): every action sits in its own stage's list; F and B
   run each micro-batch at most once; a B comes after its own F (a stage cannot
   back-propagate a micro-batch whose activation it never computed); a U applies only
   micro-batches already back-propagated on that stage and not yet applied; every
   cross-stage dependency exists somewhere (F(n) at s needs F(n) at s-1, B(n) at s needs
   B(n) at s+1). With ``complete=True`` (the default, what training needs) every stage also
   runs F, B and exactly one U for every micro-batch of the run.
2. **dynamic**: stages advance their cursors while the cross-stage dependency of the next
   action is done; if no stage can advance before all are finished the schedule deadlocks
   and the error lists the first stuck action of every unfinished stage and what it waits for.
"""

from __future__ import annotations

from collections.abc import Mapping

from aimcpipe.errors import ScheduleError
from aimcpipe.scheduler.actions import BACKWARD, FORWARD, Action, Schedule, dependency

__all__ = ["DeadlockError", "validate"]


class DeadlockError(ScheduleError):
    """The schedule can never finish; ``stuck`` maps stage -> its first stuck action."""

    def __init__(self, message: str, stuck: Mapping[int, Action]) -> None:
        super().__init__(message)
        self.stuck = dict(stuck)


def validate(schedule: Schedule, *, complete: bool = True) -> None:
    """Raise :class:`ScheduleError` if ``schedule`` is malformed or deadlocks."""
    max_n = check_structure(schedule, complete=complete)
    _dependency_pass(schedule, max_n)


def check_structure(schedule: Schedule, *, complete: bool = True) -> int:
    """The static pass; returns the largest micro-batch number (for array sizing)."""
    num_stages = schedule.num_stages
    fsets: list[set[int]] = []
    bsets: list[set[int]] = []
    max_n = -1
    for s, acts in enumerate(schedule.stages):
        seen_f: set[int] = set()
        seen_b: set[int] = set()
        applied: set[int] = set()
        add_f = seen_f.add
        add_b = seen_b.add
        for a in acts:
            kind, stage, mbs = a
            if stage != s:
                raise ScheduleError(f"{a} is in the action list of stage {s}")
            if kind == FORWARD:
                n = mbs[0]
                if n in seen_f:
                    raise ScheduleError(f"{a} runs twice on stage {s}")
                add_f(n)
            elif kind == BACKWARD:
                n = mbs[0]
                if n not in seen_f:
                    later = any(x[0] == FORWARD and x[2][0] == n for x in acts)
                    where = "comes before its forward" if later else "has no forward"
                    raise ScheduleError(f"{a} {where} {s}F{n} on stage {s}")
                if n in seen_b:
                    raise ScheduleError(f"{a} runs twice on stage {s}")
                add_b(n)
            else:
                for n in mbs:
                    if n not in seen_b:
                        raise ScheduleError(
                            f"{a} applies micro-batch {n} before {s}B{n} ran on stage {s}"
                        )
                    if n in applied:
                        raise ScheduleError(f"{a} applies micro-batch {n} a second time")
                    applied.add(n)
        if seen_f:
            max_n = max(max_n, max(seen_f))
        if complete:
            if seen_b != seen_f:
                n = min(seen_f - seen_b)
                raise ScheduleError(f"{s}F{n} has no backward {s}B{n} (incomplete schedule)")
            if applied != seen_b:
                n = min(seen_b - applied)
                raise ScheduleError(f"{s}B{n} leaves an update that no U on stage {s} applies")
        fsets.append(seen_f)
        bsets.append(seen_b)

    for s in range(num_stages):
        # F(n) at s needs F(n) at s-1; B(n) at s needs B(n) at s+1 (set algebra, then a scan
        # of the list only to name the first offending action)
        bad_f = fsets[s] - fsets[s - 1] if s > 0 else set()
        bad_b = bsets[s] - bsets[s + 1] if s < num_stages - 1 else set()
        if bad_f or bad_b:
            for a in schedule.stages[s]:
                if (a[0] == FORWARD and a[2][0] in bad_f) or (
                    a[0] == BACKWARD and a[2][0] in bad_b
                ):
                    dep = dependency(a, num_stages)
                    raise ScheduleError(
                        f"{a} waits for {dep}, which stage {dep[1]} never runs "
                        "(dependency can never be met)"
                    )
    if not any(schedule.stages):
        raise ScheduleError("the schedule has no actions")
    return max_n


def deadlock_error(schedule: Schedule, positions: list[int]) -> DeadlockError:
    """Build the error for stages stuck at ``positions`` (cursor per stage)."""
    stuck: dict[int, Action] = {}
    parts: list[str] = []
    for s, acts in enumerate(schedule.stages):
        i = positions[s]
        if i < len(acts):
            a = acts[i]
            stuck[s] = a
            parts.append(f"stage {s} stuck at {a} (waits for {dependency(a, len(positions))})")
    return DeadlockError("schedule deadlocks: " + "; ".join(parts), stuck)


def _dependency_pass(schedule: Schedule, max_n: int) -> None:
    """Advance per-stage cursors in dependency order; raise DeadlockError if stuck.

    Sweeps alternate direction (stage 0 up for forwards, S-1 down for backwards), so a
    well-formed schedule needs few sweeps; each sweep that moves no cursor proves a deadlock.
    """
    stages = schedule.stages
    num_stages = len(stages)
    size = max_n + 1
    done_f = [bytearray(size) for _ in range(num_stages)]
    done_b = [bytearray(size) for _ in range(num_stages)]
    pos = [0] * num_stages
    remaining = sum(len(a) for a in stages)
    up = list(range(num_stages))
    down = up[::-1]
    sweep = 0
    while remaining:
        progress = 0
        for s in up if sweep % 2 == 0 else down:
            acts = stages[s]
            i = start = pos[s]
            end = len(acts)
            if i == end:
                continue
            prev_f = done_f[s - 1] if s > 0 else None
            next_b = done_b[s + 1] if s < num_stages - 1 else None
            my_f = done_f[s]
            my_b = done_b[s]
            while i < end:
                kind, _, mbs = acts[i]
                if kind == FORWARD:
                    n = mbs[0]
                    if prev_f is not None and not prev_f[n]:
                        break
                    my_f[n] = 1
                elif kind == BACKWARD:
                    n = mbs[0]
                    if next_b is not None and not next_b[n]:
                        break
                    my_b[n] = 1
                i += 1
            if i != start:
                pos[s] = i
                progress += i - start
        if not progress:
            raise deadlock_error(schedule, pos)
        remaining -= progress
        sweep += 1
