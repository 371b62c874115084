"""Chrome trace export: Perfetto-loadable structure, one track per stage, cycles as µs."""

import json
from pathlib import Path

from aimcpipe.scheduler import CostModel, build_schedule, simulate
from aimcpipe.scheduler.trace import chrome_trace, write_chrome_trace


def test_trace_structure(tmp_path: Path) -> None:
    r = simulate(build_schedule("sync-1f1b", 3, 4), CostModel(forward=1, backward=2, update=1))
    a = simulate(build_schedule("async", 2, 2))
    path = write_chrome_trace(tmp_path / "trace.json", [r, a], ["sync", "async"])
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    assert "cycles written as microseconds" in trace["otherData"]["time_unit"]

    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == r.schedule.num_actions + a.schedule.num_actions
    meta = [e for e in events if e["ph"] == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert procs == {0: "sync", 1: "async"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert threads == {
        (0, 0): "stage 0",
        (0, 1): "stage 1",
        (0, 2): "stage 2",
        (1, 0): "stage 0",
        (1, 1): "stage 1",
    }

    sync_events = [e for e in complete if e["pid"] == 0]
    by_kind = {e["name"][0]: (e["cat"], e["cname"]) for e in sync_events}
    assert len(set(by_kind.values())) == 3  # F, B, U have their own category and colour
    assert by_kind["F"][0] == "forward" and by_kind["B"][0] == "backward"
    # every event carries the simulated start and duration (cost) of its action
    durations = {"F": 1, "B": 2, "U": 4}  # U applies Bm = 4 micro-batches at 1 cycle each
    for e in sync_events:
        assert e["dur"] == durations[e["name"][0]]
    s1 = sorted((e["ts"], e["name"]) for e in sync_events if e["tid"] == 1)
    assert [n for _, n in s1] == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3", "U0-3"]
    assert max(e["ts"] + e["dur"] for e in sync_events) == r.makespan


def test_single_result_default_label() -> None:
    r = simulate(build_schedule("async", 2, 2, weight_stashing=True))
    trace = chrome_trace(r)
    name = next(e for e in trace["traceEvents"] if e["name"] == "process_name")["args"]["name"]
    assert name == "async S=2 Bm=2 K=1 weight-stashing"
    json.dumps(trace)  # serialisable
