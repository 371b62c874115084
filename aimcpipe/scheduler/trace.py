"""Chrome trace export of simulated schedules (open in https://ui.perfetto.dev).

Trace Event Format: one complete (``"ph": "X"``) event per action, one process per
simulated schedule and one thread (track) per stage, named by ``process_name`` /
``thread_name`` metadata. F, B and U differ by name (``F3``, ``B3``, ``U0-7``), category
(``forward``/``backward``/``update``) and ``cname`` colour.

**Time unit: cycles written as microseconds** (the format's ``ts``/``dur`` unit): 1 µs in
the viewer is 1 cycle. ``otherData.time_unit`` says so inside the file. Runs of the real
runtime use real microseconds (docs/design.md §5); simulations use cycles.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aimcpipe.scheduler.actions import Action, format_microbatches
from aimcpipe.scheduler.simulate import SimResult

__all__ = ["TIME_UNIT_NOTE", "chrome_trace", "track_events", "write_chrome_trace"]

TIME_UNIT_NOTE = "cycles written as microseconds: 1 us in the viewer = 1 simulated cycle"

_CATEGORY = {"F": "forward", "B": "backward", "U": "update"}
# reserved colour names of the trace viewer (catapult's colour scheme)
_CNAME = {"F": "good", "B": "rail_response", "U": "yellow"}


def default_label(result: SimResult) -> str:
    s = result.schedule
    return f"{s.policy} S={s.num_stages} Bm={s.microbatches_per_minibatch} K={s.minibatches}" + (
        " weight-stashing" if s.weight_stashing else ""
    )


def track_events(
    pid: int,
    label: str,
    stages: Sequence[Sequence[Action]],
    starts: Sequence[Sequence[float]],
    ends: Sequence[Sequence[float]],
) -> list[dict[str, Any]]:
    """Trace events of one run: a process ``pid`` named ``label`` with one track per stage
    and one complete event per action (``starts[s][i]``/``ends[s][i]`` in the trace's µs).
    Shared by simulations (cycles) and real runs (microseconds)."""
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": label}},
        {
            "ph": "M",
            "name": "process_sort_index",
            "pid": pid,
            "tid": 0,
            "args": {"sort_index": pid},
        },
    ]
    for s, acts in enumerate(stages):
        events.append(
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": s, "args": {"name": f"stage {s}"}}
        )
        events.append(
            {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": pid,
                "tid": s,
                "args": {"sort_index": s},
            }
        )
        stage_starts = starts[s]
        stage_ends = ends[s]
        for i, (kind, _, mbs) in enumerate(acts):
            events.append(
                {
                    "name": kind + format_microbatches(mbs),
                    "cat": _CATEGORY[kind],
                    "ph": "X",
                    "ts": stage_starts[i],
                    "dur": stage_ends[i] - stage_starts[i],
                    "pid": pid,
                    "tid": s,
                    "cname": _CNAME[kind],
                    "args": {"stage": s, "microbatches": format_microbatches(mbs)},
                }
            )
    return events


def chrome_trace(
    results: SimResult | Sequence[SimResult], labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """The trace as a JSON-ready dict; several results become several processes."""
    if isinstance(results, SimResult):
        results = [results]
    labels = list(labels) if labels is not None else [default_label(r) for r in results]
    events: list[dict[str, Any]] = []
    for pid, (result, label) in enumerate(zip(results, labels, strict=True)):
        events += track_events(pid, label, result.schedule.stages, result.starts, result.ends)
    return {
        "traceEvents": events,
        "otherData": {
            "generator": "aimcpipe.scheduler",
            "time_unit": TIME_UNIT_NOTE,
            "runs": [
                {
                    "label": label,
                    "makespan_cycles": r.makespan,
                    "costs": r.costs.to_dict(),
                }
                for r, label in zip(results, labels, strict=True)
            ],
        },
    }


def write_chrome_trace(
    path: str | Path,
    results: SimResult | Sequence[SimResult],
    labels: Sequence[str] | None = None,
) -> Path:
    """Write :func:`chrome_trace` to ``path`` (compact JSON; traces can be large)."""
    path = Path(path)
    with path.open("w") as fh:
        json.dump(chrome_trace(results, labels), fh, separators=(",", ":"))
    return path
