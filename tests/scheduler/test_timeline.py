"""ASCII timelines: the papers' schedule figures as text."""

from aimcpipe.scheduler import CostModel, build_schedule, simulate
from aimcpipe.scheduler.timeline import format_grid, render_timeline, time_unit


def test_small_sync_timeline_by_hand() -> None:
    # S=2, Bm=2, F=B=1, U=0: stage 1 runs F0 B0 F1 B1 at cycles 1-4; stage 0 F0 F1 at 0-1,
    # B0 at 3 (after 1B0 ends at 3), B1 at 5
    r = simulate(build_schedule("sync-1f1b", 2, 2), CostModel(update=0))
    lines = render_timeline(r).splitlines()
    assert lines[1].split() == ["cycle", "0", "1", "2", "3", "4", "5"]
    assert lines[2] == "stage 0 | F0 F1 .  B0 .  B1"
    assert lines[3] == "stage 1 | .  F0 B0 F1 B1 ."
    assert "makespan=6" in lines[0]


def test_long_actions_and_updates() -> None:
    # wop, S=1, Bm=2, F=1, B=2, U=1: F0 B0 B0 F1 B1 B1 U U
    r = simulate(build_schedule("wop", 1, 2), CostModel(forward=1, backward=2, update=1))
    row = render_timeline(r).splitlines()[2]
    assert row == "stage 0 | F0 B0=== F1 B1=== U0-1="


def test_wide_timelines_keep_head_and_tail() -> None:
    r = simulate(build_schedule("async", 4, 500), CostModel(update=0))
    text = render_timeline(r, width=80)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines[1:-1])
    assert "//" in lines[2] and "columns hidden" in lines[0]
    assert "F0" in lines[2] and "B499" in lines[2]  # fill and drain both visible


def test_fractional_costs_get_a_rational_unit() -> None:
    assert time_unit([1 / 3, 2 / 3, 1]) == time_unit([1 / 3])
    assert str(time_unit([2, 4, 6])) == "2"
    r = simulate(build_schedule("async", 3, 2), CostModel(update=0).split(3))
    assert "1 column = 1/3" in render_timeline(r)


def test_grid_lists_actions_by_step() -> None:
    grid = format_grid(build_schedule("async", 2, 2)).splitlines()
    assert grid[1].split() == ["stage", "0", "0F0", "0F1", "0B0", "0U0", "0B1", "0U1"]
