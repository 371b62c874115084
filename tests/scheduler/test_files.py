"""Schedule files: JSON and CSV round trips, hand-written files, helpful errors."""

import json
from pathlib import Path

import pytest

from aimcpipe.errors import ConfigError, ScheduleError
from aimcpipe.scheduler import DeadlockError, build_schedule
from aimcpipe.scheduler.files import (
    load_schedule,
    save_schedule,
    schedule_from_dict,
    schedule_to_csv,
    schedule_to_dict,
)

CASES = [
    ("wop", 3, 4, 2, {}),
    ("sync-1f1b", 4, 2, 3, {}),
    ("async", 4, 5, 2, {"weight_stashing": True}),
    ("async", 3, 3, 3, {"drain_every": 2}),
    ("gpipe", 2, 3, 1, {}),
]


@pytest.mark.parametrize("suffix", ["json", "csv"])
@pytest.mark.parametrize(("policy", "s", "bm", "k", "opts"), CASES)
def test_round_trip(
    tmp_path: Path, suffix: str, policy: str, s: int, bm: int, k: int, opts: dict
) -> None:
    sched = build_schedule(policy, s, bm, k, **opts)
    path = save_schedule(sched, tmp_path / f"sched.{suffix}")
    assert load_schedule(path) == sched


def test_dict_form() -> None:
    sched = build_schedule("sync-1f1b", 2, 2)
    data = schedule_to_dict(sched)
    assert data["stages"][1] == ["1F0", "1B0", "1F1", "1B1", "1U0-1"]
    assert schedule_from_dict(json.loads(json.dumps(data))) == sched


def test_csv_text_is_one_row_per_stage() -> None:
    text = schedule_to_csv(build_schedule("async", 2, 2))
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body == ["0F0,0F1,0B0,0U0,0B1,0U1", "1F0,1B0,1U0,1F1,1B1,1U1"]
    assert "# policy: async" in text


def test_hand_written_csv_without_stage_prefixes(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text("# a schedule of my own\nF0,F1,B0,B1,U0-1\n\nF0,B0,F1,B1,U0+1,\n")
    sched = load_schedule(path)
    assert sched.policy == "custom"
    assert (sched.num_stages, sched.microbatches_per_minibatch, sched.minibatches) == (2, 2, 1)
    assert sched.stages == build_schedule("sync-1f1b", 2, 2).stages


def test_bare_json_list_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([["F0", "B0", "U0"], ["F0", "B0", "U0"]]))
    assert load_schedule(path).num_stages == 2


@pytest.mark.parametrize(
    ("name", "text", "error", "fragment"),
    [
        (
            "a.csv",
            "0F0,1B0,0U0\n",
            ScheduleError,
            "stage 0: action '1B0' is in the list of stage 0",
        ),
        ("a.csv", "F0,X1\n", ScheduleError, "cannot parse action 'X1'"),
        ("a.csv", "# microbatches: 2\nF0,B0,U0\n", ScheduleError, "unknown metadata key"),
        ("a.csv", "# minibatches: two\nF0,B0,U0\n", ScheduleError, "minibatches must be"),
        ("a.csv", "# microbatches_per_minibatch: 2\nF0,B0,U0\n", ScheduleError, "2 x 1 = 2"),
        ("a.csv", "# only comments\n", ScheduleError, "no stage rows"),
        ("a.json", "{", ScheduleError, "not valid JSON"),
        ("a.json", '{"stages": [["F0"]], "colour": 1}', ScheduleError, "unknown key 'colour'"),
        ("a.json", '{"stages": [[1]]}', ScheduleError, "is not a string"),
        ("a.json", '{"stages": []}', ScheduleError, "non-empty list"),
        ("a.json", '{"stages": [["F0","B0","U0"]], "version": 9}', ScheduleError, "version"),
        ("a.txt", "F0", ConfigError, ".json or .csv"),
        ("a.csv", "F0,B0\n", ScheduleError, "0B0 leaves an update that no U"),
        ("a.csv", "F0,B0,F1,B1,U0-1\nF1,B1,F0,B0,U0-1\n", DeadlockError, "stuck at 0B0"),
    ],
)
def test_bad_files_are_rejected(
    tmp_path: Path, name: str, text: str, error: type, fragment: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(error) as info:
        load_schedule(path)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read schedule file"):
        load_schedule(tmp_path / "nope.csv")
