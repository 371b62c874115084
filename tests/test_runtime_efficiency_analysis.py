"""The critical-path split of lost time that ``benchmarks/runtime_efficiency.py`` reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from runtime_efficiency import where_time_goes


def _run_dir(tmp_path: Path, events: list[tuple[str, int, str, float, float]]) -> Path:
    trace = {"traceEvents": [{"ph": "M", "name": "process_name", "pid": 0, "tid": 0}]}
    for cat, stage, mbs, ts, dur in events:
        args = {"stage": stage, "microbatches": mbs}
        trace["traceEvents"].append({"ph": "X", "cat": cat, "ts": ts, "dur": dur, "args": args})
    (tmp_path / "trace.json").write_text(json.dumps(trace))
    (tmp_path / "partition.json").write_text(json.dumps({"layers": [1, 1]}))
    return tmp_path


def test_lost_time_splits_into_handovers_dispatch_and_overshoot(tmp_path):
    # 2 stages, one micro-batch, 5 ms a cycle: F0, F1 (100 µs after F0's emulated end),
    # B1 (50 µs after F1 on its own stage; overshoots by 20 µs), B0 (150 µs after B1's
    # emulated end: B1's overshoot is not on the path), U0 (its own overshoot 30 µs).
    run = _run_dir(tmp_path, [
        ("forward", 0, "0", 0, 5000),
        ("forward", 1, "0", 5100, 5000),
        ("backward", 1, "0", 10150, 5020),
        ("backward", 0, "0", 15300, 5000),
        ("update", 0, "0", 20300, 5030),
    ])  # fmt: skip
    got = where_time_goes(run, 0.005)
    assert got["path_emulated_s"] == pytest.approx(0.025)
    assert got["handovers"] == 2 and got["handover_s"] == pytest.approx(250e-6)
    assert got["dispatches"] == 2 and got["dispatch_s"] == pytest.approx(50e-6)
    assert got["overshoot_s"] == pytest.approx(30e-6)
    makespan = 20300 + 5030
    lost = makespan * 1e-6 - got["path_emulated_s"]
    assert got["handover_s"] + got["dispatch_s"] + got["overshoot_s"] == pytest.approx(lost)


def test_a_stage_busy_past_the_message_makes_the_wait_its_own(tmp_path):
    # F1's input was usable at 5000 but stage 1 was still busy with an earlier update until
    # 5400: the gap after it is dispatch, and that update's overshoot is on the path.
    run = _run_dir(tmp_path, [
        ("forward", 0, "0", 0, 5000),
        ("update", 1, "0", 0, 5400),
        ("forward", 1, "0", 5460, 5000),
    ])  # fmt: skip
    got = where_time_goes(run, 0.005)
    assert got["handovers"] == 0 and got["dispatches"] == 1
    assert got["dispatch_s"] == pytest.approx(60e-6)
    assert got["overshoot_s"] == pytest.approx(400e-6)
