"""What travels between the scheduler and its stages: a stage's epoch report."""

from __future__ import annotations

import pickle

import pytest

from aimcpipe.runtime.interpreter import ActionRecord
from aimcpipe.runtime.plan import StageReport, cached_schedule
from aimcpipe.runtime.rendezvous import _dumps, _loads
from aimcpipe.scheduler import Action
from aimcpipe.stages.stage import StageCounters


def _report(stage: int, stats: list[dict[str, float]]) -> StageReport:
    actions = cached_schedule("sync-1f1b", 3, 4, 2, False).stages[stage]
    records = [
        ActionRecord(a, 0.25 * i + 1e-9 * i, 0.25 * i + 0.125) for i, a in enumerate(actions)
    ]
    return StageReport(
        stage=stage,
        records=records,
        stats=stats,
        counters=StageCounters(
            {0: 3, 2: 5}, peak_stash=3, peak_stash_bytes=4096, updates_applied=8
        ),
        bytes_sent=12345,
        overruns=2,
        overrun_s=0.5,
    )


@pytest.mark.parametrize("through", ["store", "pickle"])
@pytest.mark.parametrize(
    "stats",
    [
        [],
        [
            {"loss": 2.5, "samples": 32.0, "correct": 7.0},
            {"loss": 0.1, "samples": 8.0, "correct": 1.0},
        ],
        [
            {"loss": 2.5, "samples": 32.0},
            {"loss": 0.1, "samples": 8.0, "correct": 1.0},
        ],  # mixed keys
    ],
)
def test_a_report_arrives_as_it_was_sent(through: str, stats: list[dict[str, float]]) -> None:
    sent = _report(1, stats)
    data = _dumps(sent) if through == "store" else pickle.dumps(sent)
    got = _loads(data) if through == "store" else pickle.loads(data)
    assert got == sent  # dataclass equality: every field, each record's action and times
    assert all(type(r) is ActionRecord and type(r.action) is Action for r in got.records)
    assert any(len(r.action.microbatches) > 1 for r in got.records)  # an update of several
    assert got.stats == stats and all(type(v) is float for d in got.stats for v in d.values())
