"""Emulated device time: an action lasts at least its cost × cycle_s; longer host compute is
counted as an overrun; messages spend latency × cycle_s in flight; the metrics compare the
cost model's prediction with the measured makespan."""

from __future__ import annotations

import ctypes
import itertools
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aimcpipe.runtime import Pipeline
from aimcpipe.runtime import clock as clock_module
from aimcpipe.runtime.clock import WAKE_EARLY_S, sleep_until, tighten_timers
from aimcpipe.runtime.interpreter import Interpreter
from aimcpipe.runtime.transport import LocalTransport
from aimcpipe.scheduler import CostModel, build_schedule
from aimcpipe.stages import build_model
from aimcpipe.stages.stage import Stage


def _one_stage_run(
    pace: float | None, step: float, reads: list[tuple[str, int, int]] | None = None
) -> Interpreter:
    """A one-stage schedule on a clock that advances ``step`` per reading (no real time).
    ``reads`` collects (kind, micro-batch, position of the interpreter) per data read."""
    ticks = itertools.count()
    stage = Stage(0, 1, [("0", nn.Linear(3, 2))], lr=0.1, loss_fn=F.cross_entropy)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def feed(key):
        if reads is not None:
            reads.append((key[0], key[1], it.position))
        return (x if key[0] == "input" else y)[key[1] * 4 : (key[1] + 1) * 4]

    it = Interpreter(
        stage,
        build_schedule("wop", 1, 2, 1).stages[0],
        LocalTransport(),
        feed=feed,
        clock=lambda: next(ticks) * step,
        origin=0.0,
        pace=None if pace is None else lambda action: pace,
    )
    it.run()
    return it


def test_an_action_lasts_at_least_its_emulated_time():
    it = _one_stage_run(pace=1.0, step=0.25)  # compute "takes" 0.25: the rest is waited out
    assert len(it.records) == 5  # F0 F1 B0 B1 U
    assert all(r.end - r.start >= 1.0 for r in it.records)
    assert it.overruns == 0


def test_the_next_actions_data_is_read_while_this_one_waits_out_its_time():
    def reads_of_microbatch_1(pace: float | None) -> tuple[list[tuple[str, int, int]], int]:
        reads: list[tuple[str, int, int]] = []
        it = _one_stage_run(pace=pace, step=0.25, reads=reads)
        f1 = next(i for i, a in enumerate(it.actions) if a.kind == "F" and a.microbatches == (1,))
        return [r for r in reads if r[1] == 1], f1

    reads, f1 = reads_of_microbatch_1(1.0)  # read while the action before F1 waits
    assert f1 > 0 and reads == [("input", 1, f1 - 1), ("target", 1, f1 - 1)]
    reads, f1 = reads_of_microbatch_1(None)  # no emulated time: nothing to hide it in
    assert reads == [("input", 1, f1), ("target", 1, f1)]
    reads, f1 = reads_of_microbatch_1(0.1)  # overruns: no time left to read ahead
    assert reads == [("input", 1, f1), ("target", 1, f1)]


def test_host_compute_beyond_the_emulated_time_is_an_overrun():
    it = _one_stage_run(pace=0.1, step=0.25)
    assert it.overruns == 5
    assert it.overrun_s == pytest.approx(5 * 0.15)


@pytest.mark.slow
def test_device_time_on_the_torch_backend(torch_pool, digits):
    """Every stage's busy time is at least its busy cycles × cycle_s; a message arrives no
    sooner than latency × cycle_s after its action ended (clocks aligned); metrics.json
    reports the prediction, the measurement and their ratio."""
    cycle = 0.004
    costs = CostModel(forward=1, backward=2, update=1, latency=1)
    with Pipeline(
        build_model("digits-fcn"), stages=3, policy="async", microbatches=3, microbatch_size=8,
        costs=costs, cycle_s=cycle, progress=False, backend=torch_pool(3),
    ) as pipe:  # fmt: skip
        metrics = pipe.fit(digits[0].subset(torch.arange(72)), epochs=1).to_dict()
        records = pipe._trace
    assert records is not None
    for busy_s, busy_cycles in zip(
        metrics["measured"]["busy_s"], metrics["cycles"]["busy"], strict=True
    ):
        assert busy_s >= busy_cycles * cycle
    ends = {
        (r.action.kind, s, r.action.microbatches): r.end for s, rs in enumerate(records) for r in rs
    }
    for s, rs in enumerate(records):
        for r in rs:
            if r.action.kind == "F" and s > 0:
                assert r.start >= ends["F", s - 1, r.action.microbatches] + cycle
    timing = metrics["device_time"]
    assert timing["cycle_s"] == cycle
    assert timing["predicted_s"] == pytest.approx(metrics["cycles"]["makespan"] * cycle)
    assert timing["measured_s"] == pytest.approx(metrics["measured"]["makespan_s"])
    assert timing["efficiency"] == pytest.approx(timing["predicted_s"] / timing["measured_s"])
    assert len(metrics["measured"]["overruns"]) == 3


@pytest.mark.slow
def test_outputs_sent_early_are_not_used_before_the_emulated_end(torch_pool, digits):
    """Without latency, an output leaves as soon as it is computed and the next stage holds
    it until the producing action's emulated end: no F starts before its input's F was due."""
    cycle = 0.004
    with Pipeline(
        build_model("digits-fcn"), stages=3, policy="sync-1f1b", microbatches=3,
        microbatch_size=8, costs=CostModel(forward=1, backward=2, update=1), cycle_s=cycle,
        progress=False, backend=torch_pool(3),
    ) as pipe:  # fmt: skip
        pipe.fit(digits[0].subset(torch.arange(48)), epochs=1)
        records = pipe._trace
    assert records is not None
    starts = {
        (r.action.kind, s, r.action.microbatches): r.start
        for s, rs in enumerate(records)
        for r in rs
    }
    for s, rs in enumerate(records):
        for r in rs:
            if r.action.kind == "F" and s > 0:
                assert r.start >= starts["F", s - 1, r.action.microbatches] + cycle
            if r.action.kind == "B" and s < 2:
                assert r.start >= starts["B", s + 1, r.action.microbatches] + 2 * cycle


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timer slack is Linux's")
def test_tighten_timers_sets_this_threads_timer_slack_only():
    libc = ctypes.CDLL(None, use_errno=True)
    set_slack, get_slack = 29, 30  # PR_SET_TIMERSLACK, PR_GET_TIMERSLACK
    seen: dict[str, int | bool] = {}

    def tighten() -> None:
        libc.prctl(set_slack, 50_000, 0, 0, 0)  # the kernel's default, whatever we inherited
        seen["before"] = libc.prctl(get_slack, 0, 0, 0, 0)
        seen["applied"] = tighten_timers()
        seen["after"] = libc.prctl(get_slack, 0, 0, 0, 0)

    main_before = libc.prctl(get_slack, 0, 0, 0, 0)
    thread = threading.Thread(target=tighten)
    thread.start()
    thread.join(10)
    assert seen["applied"] is True
    assert seen["before"] == 50_000 and seen["after"] == 1
    assert libc.prctl(get_slack, 0, 0, 0, 0) == main_before  # other threads keep theirs


def test_sleep_until_sleeps_short_of_the_due_time_and_spins_the_rest(monkeypatch):
    now = [0.0]
    slept: list[float] = []

    def fake_sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    def ticking() -> float:  # every read of the clock moves it on by 1 µs
        now[0] += 1e-6
        return now[0]

    monkeypatch.setattr(clock_module.time, "sleep", fake_sleep)
    due = 0.01
    end = sleep_until(due, ticking)
    assert due <= end < due + 1e-5
    assert len(slept) == 1 and slept[0] < due - WAKE_EARLY_S  # woke early, then spun
    slept.clear()
    due = now[0] + WAKE_EARLY_S / 2
    assert sleep_until(due, ticking) >= due
    assert slept == []  # too close to sleep: only spins
    before = now[0]
    assert sleep_until(before - 1.0, ticking) < before + 5e-6  # already due: back at once
    assert slept == []


def test_sleep_until_on_the_real_clock_never_returns_early():
    for wait in (0.0, 5e-5, 2e-3):
        due = time.perf_counter() + wait
        assert sleep_until(due) >= due
        assert time.perf_counter() >= due
