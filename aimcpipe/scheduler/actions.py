"""The schedule IR: per-stage lists of F, B and U actions (docs/design.md §4).

A schedule is plain data. Stage ``s`` of ``S`` executes its own action list strictly in
order; the cross-stage dependencies are implied by the actions themselves, so they are
*derived* here rather than stored:

* ``F(n)`` at stage ``s > 0`` needs the activation of ``F(n)`` at ``s - 1``;
* ``B(n)`` at stage ``s < S - 1`` needs the gradient of ``B(n)`` at ``s + 1``;
  the last stage computes the loss, so its ``B(n)`` only needs its own ``F(n)``;
* ``U(ns)`` applies the pending (x, d) updates of micro-batches ``ns``, already
  back-propagated on the same stage.

Every action has a compact string form borrowed from torch.distributed.pipelining:
``2F0`` (stage 2, forward of micro-batch 0), ``1B3``, ``0U4-7`` (update applying
micro-batches 4..7) and ``0U1+3+8-9`` for a non-contiguous set. ``+`` rather than ``,``
joins ranges so the form can sit in a CSV cell unquoted.

``Action`` is a ``NamedTuple``: immutable, hashable, cheap to pickle (the Ray and
torch.distributed runtimes ship schedules to workers) and about three times cheaper to
construct than a frozen dataclass, which matters for 10^5-action schedules.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from aimcpipe.errors import ScheduleError

__all__ = [
    "BACKWARD",
    "FORWARD",
    "KINDS",
    "UPDATE",
    "Action",
    "ActionKind",
    "Message",
    "Schedule",
    "backward",
    "dependency",
    "format_microbatches",
    "forward",
    "parse_action",
    "parse_microbatches",
    "received_message",
    "sent_message",
    "update",
]

ActionKind = Literal["F", "B", "U"]
FORWARD: ActionKind = "F"
BACKWARD: ActionKind = "B"
UPDATE: ActionKind = "U"
KINDS: tuple[ActionKind, ...] = (FORWARD, BACKWARD, UPDATE)


class _ActionFields(NamedTuple):
    kind: ActionKind
    stage: int
    microbatches: tuple[int, ...]


class Action(_ActionFields):
    """One action of one stage: ``kind`` in F/B/U, ``stage`` index, ``microbatches``.

    F and B carry exactly one micro-batch (``.n``); U carries the non-empty, strictly
    increasing tuple of micro-batches whose pending updates it applies. Constructing an
    ``Action`` directly validates its fields; the policy builders use the unchecked
    :meth:`_fast` path because they produce valid actions by construction.
    """

    __slots__ = ()

    def __new__(cls, kind: str, stage: int, microbatches: int | Iterable[int]) -> Action:
        if kind not in KINDS:
            raise ScheduleError(f"action kind {kind!r} is not allowed; use one of F, B, U")
        if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
            raise ScheduleError(f"action stage {stage!r} must be an integer >= 0")
        mbs = (microbatches,) if isinstance(microbatches, int) else tuple(microbatches)
        if not mbs:
            raise ScheduleError(f"{kind} action on stage {stage} needs at least one micro-batch")
        for n in mbs:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ScheduleError(f"micro-batch {n!r} must be an integer >= 0")
        if kind != UPDATE and len(mbs) != 1:
            raise ScheduleError(f"{kind} action takes exactly one micro-batch, got {mbs}")
        if any(b <= a for a, b in itertools.pairwise(mbs)):
            raise ScheduleError(f"U micro-batches must be strictly increasing, got {mbs}")
        return tuple.__new__(cls, (kind, stage, mbs))

    @classmethod
    def _fast(cls, kind: ActionKind, stage: int, microbatches: tuple[int, ...]) -> Action:
        """Unchecked constructor for trusted builders (hot path)."""
        return tuple.__new__(cls, (kind, stage, microbatches))

    @property
    def n(self) -> int:
        """The micro-batch of an F or B action (a U has ``microbatches`` instead)."""
        if self[0] == UPDATE:
            raise AttributeError(f"{self} is an update; use .microbatches")
        return self[2][0]

    def __str__(self) -> str:
        return f"{self[1]}{self[0]}{format_microbatches(self[2])}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @classmethod
    def parse(cls, text: str, stage: int | None = None) -> Action:
        """Inverse of ``str(action)``; see :func:`parse_action`."""
        return parse_action(text, stage)


def forward(stage: int, n: int) -> Action:
    """``F(n)`` on ``stage``."""
    return Action(FORWARD, stage, (n,))


def backward(stage: int, n: int) -> Action:
    """``B(n)`` on ``stage``."""
    return Action(BACKWARD, stage, (n,))


def update(stage: int, microbatches: Iterable[int]) -> Action:
    """``U(ns)`` on ``stage``: apply the pending updates of ``microbatches`` (sorted)."""
    return Action(UPDATE, stage, tuple(sorted(microbatches)))


def format_microbatches(mbs: Sequence[int]) -> str:
    """``(4, 5, 6, 7)`` -> ``"4-7"``; ``(1, 3, 8, 9)`` -> ``"1+3+8-9"``."""
    if len(mbs) == 1:
        return str(mbs[0])
    if mbs[-1] - mbs[0] == len(mbs) - 1:  # contiguous (mbs is strictly increasing)
        return f"{mbs[0]}-{mbs[-1]}"
    parts: list[str] = []
    start = prev = mbs[0]
    for n in mbs[1:]:
        if n != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = n
        prev = n
    parts.append(str(start) if start == prev else f"{start}-{prev}")
    return "+".join(parts)


_RANGE = r"\d+(?:-\d+)?"
_ACTION_RE = re.compile(rf"^\s*(\d+)?\s*([FBU])\s*({_RANGE}(?:\+{_RANGE})*)\s*$")


def parse_microbatches(text: str) -> tuple[int, ...]:
    """``"4-7"`` -> ``(4, 5, 6, 7)``; ``"1+3+8-9"`` -> ``(1, 3, 8, 9)``."""
    out: list[int] = []
    for part in text.split("+"):
        lo, _, hi = part.partition("-")
        a = int(lo)
        b = int(hi) if hi else a
        if b < a:
            raise ScheduleError(f"micro-batch range {part!r} is empty (write low-high)")
        out.extend(range(a, b + 1))
    return tuple(out)


def parse_action(text: str, stage: int | None = None) -> Action:
    """Parse ``"2F0"``, ``"1B3"``, ``"0U4-7"``; the stage prefix may be omitted when
    ``stage`` is given (a row of a schedule file), and must equal it when both are present.
    """
    m = _ACTION_RE.match(text)
    if not m:
        raise ScheduleError(
            f"cannot parse action {text!r}; write <stage><F|B|U><micro-batches>, "
            "e.g. 2F0, 1B3, 0U4-7 or 0U1+3"
        )
    prefix, kind, mbs = m.groups()
    if prefix is None:
        if stage is None:
            raise ScheduleError(f"action {text!r} has no stage prefix (e.g. 0{text.strip()})")
        act_stage = stage
    else:
        act_stage = int(prefix)
        if stage is not None and act_stage != stage:
            raise ScheduleError(f"action {text.strip()!r} is in the list of stage {stage}")
    return Action(kind, act_stage, parse_microbatches(mbs))


class Message(NamedTuple):
    """A point-to-point transfer derived from the schedule.

    ``kind`` is ``"activation"`` (after F(n) at ``src``, to ``src + 1``) or
    ``"gradient"`` (after B(n) at ``src``, to ``src - 1``).
    """

    kind: Literal["activation", "gradient"]
    microbatch: int
    src: int
    dst: int


def dependency(action: Action, num_stages: int) -> Action | None:
    """The action on another stage that ``action`` waits for, or None.

    F(n) at s>0 waits for F(n) at s-1; B(n) at s<S-1 waits for B(n) at s+1. Same-stage
    order (B after its own F, U after its Bs) is implied by the list order and is checked
    by :func:`aimcpipe.scheduler.validate.validate`.
    """
    kind, s, mbs = action
    if kind == FORWARD and s > 0:
        return Action._fast(FORWARD, s - 1, mbs)
    if kind == BACKWARD and s < num_stages - 1:
        return Action._fast(BACKWARD, s + 1, mbs)
    return None


def received_message(action: Action, num_stages: int) -> Message | None:
    """The message a stage must receive before running ``action`` (recv op), or None."""
    kind, s, mbs = action
    if kind == FORWARD and s > 0:
        return Message("activation", mbs[0], s - 1, s)
    if kind == BACKWARD and s < num_stages - 1:
        return Message("gradient", mbs[0], s + 1, s)
    return None


def sent_message(action: Action, num_stages: int) -> Message | None:
    """The message a stage sends after running ``action`` (send op), or None."""
    kind, s, mbs = action
    if kind == FORWARD and s < num_stages - 1:
        return Message("activation", mbs[0], s, s + 1)
    if kind == BACKWARD and s > 0:
        return Message("gradient", mbs[0], s, s - 1)
    return None


@dataclass(frozen=True)
class Schedule:
    """Per-stage action lists plus the shape they were built for.

    ``stages[s]`` is the ordered action list of stage ``s``. ``microbatches_per_minibatch``
    (Bm) and ``minibatches`` (K) describe the run (micro-batches are numbered
    ``0 .. K*Bm - 1`` across it); the simulator uses them to build the WOP baseline of the
    same shape. ``weight_stashing`` changes no action order: it tells the runtime to run each
    backward with the weights its forward saw (PipeDream), and the metrics to report an
    effective staleness of 0.
    """

    policy: str
    stages: tuple[tuple[Action, ...], ...]
    microbatches_per_minibatch: int
    minibatches: int = 1
    weight_stashing: bool = False

    def __post_init__(self) -> None:
        # accept lists from hand-built schedules; tuple() of a tuple is free
        object.__setattr__(self, "stages", tuple(tuple(acts) for acts in self.stages))
        for name in ("microbatches_per_minibatch", "minibatches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ScheduleError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.stages:
            raise ScheduleError("a schedule needs at least one stage")

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_microbatches(self) -> int:
        """K * Bm: micro-batches in the whole run."""
        return self.microbatches_per_minibatch * self.minibatches

    @property
    def num_actions(self) -> int:
        return sum(len(acts) for acts in self.stages)

    def to_strings(self) -> list[list[str]]:
        """Compact string form, one list per stage (what schedule files hold)."""
        return [[str(a) for a in acts] for acts in self.stages]

    def __str__(self) -> str:
        lines = [
            f"{self.policy}: S={self.num_stages} Bm={self.microbatches_per_minibatch} "
            f"K={self.minibatches}" + (" weight_stashing" if self.weight_stashing else "")
        ]
        lines += [" ".join(row) for row in self.to_strings()]
        return "\n".join(lines)
