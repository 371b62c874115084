"""The one interpreter: executes a stage's action list against a transport (docs/design.md §5).

Every backend runs this same code; they differ only in the transport and in who calls
``step``. A multi-process backend calls :meth:`Interpreter.run` (each receive blocks, with a
timeout); the in-process backend interleaves all stages with :func:`run_local`, stepping a
stage only when the messages its next action needs have arrived.

Which messages an action needs and sends is derived from the schedule
(:func:`aimcpipe.scheduler.received_message` / :func:`~aimcpipe.scheduler.sent_message`),
plus the data: stage 0's ``F(n)`` reads ``input`` n and the last stage's ``F(n)`` reads
``target`` n, both from the stage's own ``feed`` (or, without one, from the transport). The
last stage keeps each micro-batch's loss statistics in :attr:`Interpreter.stats`.

Emulated device time: with ``pace`` given, an action lasts at least ``pace(action)`` seconds —
the host waits out the rest after computing, and its output is usable by the next stage when
an accelerator would have produced it. Where the transport can hold a message at the
receiver until a due time (stages on one machine share ``time.perf_counter``), the output is
sent as soon as it is computed, due at the action's emulated end, so the transfer overlaps
the wait instead of following it; otherwise it is sent after the wait. Actions whose compute
alone takes longer are counted in :attr:`Interpreter.overruns`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from aimcpipe.errors import ScheduleError, StageFailure
from aimcpipe.runtime.clock import sleep_until
from aimcpipe.runtime.memo import ByIdentity
from aimcpipe.runtime.transport import DRIVER, Key, Transport
from aimcpipe.scheduler import BACKWARD, FORWARD, UPDATE, Action, received_message, sent_message
from aimcpipe.stages.stage import LossStats, Stage, summarize

__all__ = ["ActionRecord", "Interpreter", "run_local"]

Feed = Callable[[Key], Any]
_SUMMARISE_EVERY = 256  # micro-batches of loss statistics converted at once


class ActionRecord(NamedTuple):
    """One executed action with its wall-clock start/end in seconds: on the interpreter's
    clock minus its ``origin``. (A named tuple: one is made per action.)"""

    action: Action
    start: float
    end: float


def _needs(action: Action, num_stages: int) -> tuple[Key, ...]:
    kind, s, mbs = action
    keys: list[Key] = []
    msg = received_message(action, num_stages)
    if msg is not None:
        keys.append((msg.kind, msg.microbatch, msg.src, msg.dst))
    elif kind == FORWARD:  # stage 0
        keys.append(("input", mbs[0], DRIVER, s))
    if kind == FORWARD and s == num_stages - 1:
        keys.append(("target", mbs[0], DRIVER, s))
    return tuple(keys)


def _sends(action: Action, num_stages: int) -> Key | None:
    msg = sent_message(action, num_stages)
    return None if msg is None else (msg.kind, msg.microbatch, msg.src, msg.dst)


def _groups(actions: tuple[Action, ...]) -> tuple[tuple[int, ...] | None, ...]:
    """Per action: for a backward, the micro-batches of the update that applies it (the
    first later U that lists its micro-batch), else None. The stage sums a group's
    gradients as their backwards come (:meth:`Stage.backward`)."""
    groups: list[tuple[int, ...] | None] = [None] * len(actions)
    waiting: dict[int, int] = {}  # micro-batch -> index of its backward, until its U
    for i, (kind, _, mbs) in enumerate(actions):
        if kind == BACKWARD:
            waiting[mbs[0]] = i
        elif kind == UPDATE:
            for n in mbs:
                b = waiting.pop(n, None)
                if b is not None:
                    groups[b] = mbs
    return tuple(groups)


_Wiring = tuple[
    tuple[tuple[Key, ...], ...], tuple[Key | None, ...], tuple[tuple[int, ...] | None, ...]
]
_wired: ByIdentity[_Wiring] = ByIdentity(64)
_interleavings: ByIdentity[list[int]] = ByIdentity(16)


def _wiring(actions: tuple[Action, ...], num_stages: int) -> _Wiring:
    """Per action, the keys it receives, the key it sends and (backwards) its update group.
    Epochs of the same shape share one (cached) schedule, so this is derived once per action
    list, not once per epoch."""
    return _wired.get(
        (actions,),
        num_stages,
        lambda: (
            tuple(_needs(a, num_stages) for a in actions),
            tuple(_sends(a, num_stages) for a in actions),
            _groups(actions),
        ),
    )


class Interpreter:
    """Runs ``actions`` (one stage's list) on ``stage`` in order."""

    def __init__(
        self,
        stage: Stage,
        actions: Sequence[Action],
        transport: Transport,
        *,
        feed: Feed | None = None,
        timeout: float = 300.0,
        origin: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
        pace: Callable[[Action], float] | None = None,
    ) -> None:
        for a in actions:
            if a.stage != stage.index:
                raise ScheduleError(f"action {a} is in the list of stage {stage.index}")
        self.stage = stage
        self.actions = actions if isinstance(actions, tuple) else tuple(actions)
        self.transport = transport
        self.feed = feed
        self.timeout = timeout
        self.clock = clock
        self.origin = clock() if origin is None else origin
        self.pace = pace
        self.position = 0
        self.records: list[ActionRecord] = []
        self._stats: list[LossStats] = []  # not yet summarised
        self._summary: list[dict[str, float]] = []
        self.overruns = 0
        self.overrun_s = 0.0
        self._needs, self._sends, self._groups = _wiring(self.actions, stage.num_stages)
        self._fed: dict[Key, Any] | None = None  # the next action's data, read ahead

    @property
    def stats(self) -> list[dict[str, float]]:
        """The last stage's loss statistics per micro-batch so far (converted on reading)."""
        return self._summary + summarize(self._stats)

    @property
    def done(self) -> bool:
        return self.position >= len(self.actions)

    @property
    def next_action(self) -> Action | None:
        return None if self.done else self.actions[self.position]

    def _from_feed(self, key: Key) -> bool:
        return key[2] == DRIVER and self.feed is not None

    def ready(self) -> bool:
        """Whether the next action's messages have all arrived."""
        if self.position >= len(self.actions):
            return False
        for k in self._needs[self.position]:
            if not (self._from_feed(k) or self.transport.ready(k)):
                return False
        return True

    def step(self) -> Action:
        """Receive what the next action needs (waiting up to ``timeout``), execute it, send
        what it produces."""
        position = self.position
        action = self.actions[position]
        feed = self.feed
        fed, self._fed = self._fed, None
        inputs = [
            (fed[k] if fed is not None else feed(k))
            if k[2] == DRIVER and feed is not None
            else self.transport.recv(k, self.timeout)
            for k in self._needs[position]
        ]
        start = self.clock()
        kind, s, mbs = action
        stage = self.stage
        try:
            if kind == FORWARD:
                target = inputs[1] if len(inputs) > 1 else None
                out, stats = stage.forward(mbs[0], inputs[0], target)
            elif kind == BACKWARD:
                out = stage.backward(mbs[0], inputs[0] if inputs else None, self._groups[position])
                stats = None
            else:
                stage.update(mbs)
                out = stats = None
        except (ScheduleError, StageFailure):
            raise
        except Exception as exc:
            raise StageFailure(f"stage {s}: {action} failed: {type(exc).__name__}: {exc}") from exc
        end = self.clock()
        key = self._sends[position]
        if self.pace is not None:
            due = start + self.pace(action)
            if (
                key is not None
                and end < due
                and self.clock is time.perf_counter
                and self.transport.can_hold(key[3])
            ):
                self.transport.send(key, out, due)  # held by the receiver until due
                key = None
            if feed is not None and end < due and position + 1 < len(self.actions):
                # the next action's data, read while this one's emulated time runs out
                self._fed = {k: feed(k) for k in self._needs[position + 1] if k[2] == DRIVER}
            end = self._wait_out(action, due, end)
        if key is not None:
            self.transport.send(key, out)
        if stats is not None:
            self._stats.append(stats)
            if len(self._stats) >= _SUMMARISE_EVERY:  # bound the logits held
                self._summary.extend(summarize(self._stats))
                self._stats.clear()
        origin = self.origin
        self.records.append(ActionRecord(action, start - origin, end - origin))
        self.position = position + 1
        return action

    def _wait_out(self, action: Action, due: float, end: float) -> float:
        """Emulated device time: hold the action until ``due``."""
        if end > due:
            self.overruns += 1
            self.overrun_s += end - due
            return end
        return sleep_until(due, self.clock)

    def run(
        self,
        on_action: Callable[[Action], None] | None = None,
        before: Callable[[int], None] | None = None,
    ) -> None:
        """Execute the whole list (multi-process backends: receives block). ``before`` is
        called with each action's index before it runs, ``on_action`` after."""
        while not self.done:
            if before is not None:
                before(self.position)
            action = self.step()
            if on_action is not None:
                on_action(action)


def _sweeps(interpreters: Sequence[Interpreter]) -> list[int]:
    """The order in which :func:`run_local` steps the stages, worked out on message keys
    alone (no tensors): sweep the stages, each as far as its messages allow, alternating
    direction (forwards flow up, backwards down). A sweep in which no stage can move means
    the schedule can never finish: raise naming the stuck actions rather than hang."""
    arrived: set[Key] = set()
    position = [it.position for it in interpreters]
    ends = [len(it.actions) for it in interpreters]
    fed = [it.feed is not None for it in interpreters]
    order = list(range(len(interpreters)))
    steps: list[int] = []
    while True:
        moved = False
        for i in order:
            it = interpreters[i]
            while position[i] < ends[i] and all(
                (fed[i] and k[2] == DRIVER) or k in arrived for k in it._needs[position[i]]
            ):
                for k in it._needs[position[i]]:
                    arrived.discard(k)
                sent = it._sends[position[i]]
                if sent is not None:
                    arrived.add(sent)
                position[i] += 1
                steps.append(i)
                moved = True
        if all(p == e for p, e in zip(position, ends, strict=True)):
            return steps
        if not moved:
            stuck = "; ".join(
                f"stage {it.stage.index} stuck at {it.actions[position[i]]}"
                for i, it in enumerate(interpreters)
                if position[i] < ends[i]
            )
            raise ScheduleError(f"the schedule cannot finish: {stuck}")
        order.reverse()


def run_local(
    interpreters: Sequence[Interpreter], on_action: Callable[[Action], None] | None = None
) -> None:
    """Interleave all stages in this process in the order of :func:`_sweeps`. That order
    depends only on the action lists, which epochs of the same shape share, so it is worked
    out once and replayed (each step still receives exactly the messages it needs, or
    fails). Interpreters that read data from the transport rather than a feed, or that have
    already run part of their lists (messages may be waiting), are swept live."""
    if any(it.feed is None or it.position for it in interpreters):
        _run_live(interpreters, on_action)
        return
    lists = tuple(it.actions for it in interpreters)
    for i in _interleavings.get(lists, None, lambda: _sweeps(interpreters)):
        action = interpreters[i].step()
        if on_action is not None:
            on_action(action)


def _run_live(
    interpreters: Sequence[Interpreter], on_action: Callable[[Action], None] | None
) -> None:
    """:func:`run_local` deciding each step from the messages actually present."""
    order = list(interpreters)
    while True:
        moved = False
        for it in order:
            while it.ready():
                action = it.step()
                moved = True
                if on_action is not None:
                    on_action(action)
        if all(it.done for it in interpreters):
            return
        if not moved:
            stuck = "; ".join(
                f"stage {it.stage.index} stuck at {it.next_action}"
                for it in interpreters
                if not it.done
            )
            raise ScheduleError(f"the schedule cannot finish: {stuck}")
        order.reverse()
