"""The validator rejects malformed schedules and names the action where they go wrong."""

import pytest

from aimcpipe.errors import ScheduleError
from aimcpipe.scheduler import DeadlockError, Schedule, parse_action, validate
from aimcpipe.scheduler.timeline import format_grid


def sched(*rows: str, bm: int | None = None) -> Schedule:
    stages = tuple(tuple(parse_action(t, s) for t in row.split()) for s, row in enumerate(rows))
    n = len({a.n for a in stages[0] if a.kind == "F"})
    return Schedule("custom", stages, bm or max(n, 1))


def test_hand_written_good_schedule_passes() -> None:
    validate(sched("F0 F1 B0 B1 U0-1", "F0 B0 F1 B1 U0-1"))


def test_deadlock_names_the_first_stuck_action_of_each_stage() -> None:
    # stage 1 wants micro-batch 1 first, stage 0 waits for the gradient of micro-batch 0
    bad = sched("F0 B0 F1 B1 U0-1", "F1 B1 F0 B0 U0-1")
    with pytest.raises(DeadlockError) as info:
        validate(bad)
    msg = str(info.value)
    assert "stage 0 stuck at 0B0 (waits for 1B0)" in msg
    assert "stage 1 stuck at 1F1 (waits for 0F1)" in msg
    assert "\n" not in msg
    assert {s: str(a) for s, a in info.value.stuck.items()} == {0: "0B0", 1: "1F1"}
    grid = format_grid(bad, info.value.stuck)
    assert ">0B0<" in grid and ">1F1<" in grid


def test_deadlock_after_progress_reports_only_unfinished_stages() -> None:
    # three stages; stage 2 runs micro-batch 1 before 0 while stage 1 forwards 0 first and
    # then waits for the gradient of 0 before forwarding 1
    bad = sched(
        "F0 F1 B0 B1 U0-1",
        "F0 B0 F1 B1 U0-1",
        "F1 B1 F0 B0 U0-1",
    )
    with pytest.raises(DeadlockError) as info:
        validate(bad)
    assert {s: str(a) for s, a in info.value.stuck.items()} == {0: "0B0", 1: "1B0", 2: "2F1"}


@pytest.mark.parametrize(
    ("rows", "fragment"),
    [
        (("F0 B0 B1 U0-1",), "0B1 has no forward 0F1"),
        (("B0 F0 U0",), "0B0 comes before its forward 0F0"),
        (("F0 U0 B0",), "0U0 applies micro-batch 0 before 0B0 ran"),
        (("F0 B0 U0 U0",), "0U0 applies micro-batch 0 a second time"),
        (("F0 F0 B0 U0",), "0F0 runs twice"),
        (("F0 B0 B0 U0",), "0B0 runs twice"),
        (("F0 F1 B0 U0",), "0F1 has no backward 0B1"),
        (("F0 B0",), "0B0 leaves an update that no U on stage 0 applies"),
        (("F0 B0 U0", "F0 F1 B0 B1 U0-1"), "1F1 waits for 0F1, which stage 0 never runs"),
        (("F0 F1 B0 B1 U0-1", "F0 B0 U0"), "0B1 waits for 1B1, which stage 1 never runs"),
    ],
)
def test_malformed_schedules_are_rejected_naming_the_action(
    rows: tuple[str, ...], fragment: str
) -> None:
    with pytest.raises(ScheduleError) as info:
        validate(sched(*rows))
    assert fragment in str(info.value)


def test_action_in_the_wrong_stage_list() -> None:
    a = parse_action
    bad = Schedule("custom", ((a("0F0"), a("1B0"), a("0U0")),), 1)
    with pytest.raises(ScheduleError, match="1B0 is in the action list of stage 0"):
        validate(bad)


def test_incomplete_schedules_can_be_allowed() -> None:
    forward_only = sched("F0 F1", "F0 F1")
    with pytest.raises(ScheduleError):
        validate(forward_only)
    validate(forward_only, complete=False)
    with pytest.raises(DeadlockError):
        validate(sched("F0 B0 F1", "F1 F0 B0"), complete=False)
