"""``aimcpipe simulate``: table, --json contract, --out directory, one-line errors."""

import json
from pathlib import Path

import pytest

from aimcpipe.launch.cli import main

ROW_KEYS = {
    "policy",
    "stages",
    "microbatches",
    "makespan",
    "utilization",
    "utilization_per_stage",
    "bubble_fraction",
    "speedup_vs_wop",
    "staleness",
    "peak_stash",
}


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["simulate", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON object, nothing else on stdout


def test_json_rows_have_the_contract_keys(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(
        capsys,
        "--stages",
        "1,2,4",
        "--microbatches",
        "4",
        "--minibatches",
        "2",
        "--cost",
        "F=1,B=2,U=0",
    )
    rows = doc["results"]
    assert [(r["policy"], r["stages"]) for r in rows] == [
        (p, s) for s in (1, 2, 4) for p in ("wop", "sync-1f1b", "async")
    ]
    for r in rows:
        assert set(r) >= ROW_KEYS
        s, t = r["stages"], 3
        assert len(r["utilization_per_stage"]) == len(r["staleness"]) == len(r["peak_stash"]) == s
        closed = {
            "wop": 2 * 4 * s * t,
            "sync-1f1b": 2 * (4 + s - 1) * t,
            "async": (2 * 4 + s - 1) * t,
        }[r["policy"]]
        assert r["makespan"] == closed
        assert r["speedup_vs_wop"] == pytest.approx(2 * 4 * s * t / closed)
        if r["policy"] == "async":
            assert r["staleness"] == list(range(s - 1, -1, -1))


def test_fixed_model_speedups(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(
        capsys,
        "--stages",
        "1,2,4,8",
        "--microbatches",
        "8",
        "--cost",
        "F=1,B=1,U=0",
        "--fixed-model",
        "--policies",
        "wop,sync-1f1b",
    )
    for r in doc["results"]:
        s = r["stages"]
        expected = 1 if r["policy"] == "wop" else s * 8 / (8 + s - 1)
        assert r["speedup_vs_wop"] == pytest.approx(expected)


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "simulate",
                "--stages",
                "2,4",
                "--microbatches",
                "4",
                "--policies",
                "wop,async,gpipe",
                "--timeline",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["policy", "S", "Bm", "K"]
    table = [line.split() for line in lines[2:8]]
    assert [(c[0], c[1]) for c in table] == [
        ("wop", "2"),
        ("async", "2"),
        ("gpipe", "2"),
        ("wop", "4"),
        ("async", "4"),
        ("gpipe", "4"),
    ]
    assert "stage 3 |" in out  # timelines follow the table


def test_hardware_model_columns(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(
        capsys,
        "--stages",
        "2",
        "--microbatches",
        "2",
        "--policies",
        "wop",
        "--cost",
        "U=0",
        "--cycle-ns",
        "2.5",
        "--energy",
        "F=10,B=20",
    )
    (row,) = doc["results"]
    assert row["makespan"] == 8 and row["time_ns"] == 20.0
    assert row["energy_pj"] == 2 * (2 * 10 + 2 * 20)


def test_out_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    doc = run_json(capsys, "--stages", "1,2", "--microbatches", "3", "--out", str(out))
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "trace.json", "timeline.txt", "schedules"} <= names
    assert json.loads((out / "results.json").read_text()) == doc
    trace = json.loads((out / "trace.json").read_text())
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == sum(
        r["actions"] for r in doc["results"]
    )
    assert (out / "timeline.txt").read_text().count("makespan=") == 6
    assert len(list((out / "schedules").glob("*.csv"))) == 6
    pytest.importorskip("matplotlib")
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_out_directory_must_be_new_or_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    argv = ["simulate", "--stages", "2", "--microbatches", "2", "--out", str(out)]
    assert main(argv) == 2
    assert "--out" in capsys.readouterr().err
    assert (out / "old.txt").exists()
    # --force replaces earlier aimcpipe output only, never a folder with other files in it
    assert main([*argv, "--force"]) == 2
    assert "'old.txt', which aimcpipe did not write" in capsys.readouterr().err
    assert (out / "old.txt").exists()
    (out / "old.txt").unlink()
    (out / "results.json").write_text("{}")
    (out / "speedup.png").write_text("old")
    assert main([*argv, "--force"]) == 0
    assert (out / "results.json").read_text() != "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary leftovers


def test_custom_schedule_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mine.csv"
    path.write_text("# policy: mine\nF0,F1,B0,B1,U0-1\nF0,B0,F1,B1,U0-1\n")
    doc = run_json(
        capsys, "--schedule", str(path), "--cost", "F=1,B=1,U=0", "--policies", "sync-1f1b"
    )
    mine, sync = doc["results"]
    assert (mine["policy"], mine["stages"], mine["microbatches"]) == ("mine", 2, 2)
    assert mine["makespan"] == sync["makespan"] == (2 + 2 - 1) * 2  # it is sync-1f1b
    assert mine["speedup_vs_wop"] == pytest.approx(2 * 2 * 2 / 6)


BAD = [
    (
        ["--stages", "1,2", "--microbatches", "2", "--policies", "wop,fancy"],
        "--policies: unknown policy 'fancy'; allowed: wop, sync-1f1b, async, gpipe",
    ),
    (["--stages", "0,2", "--microbatches", "2"], "--stages: '0' is not allowed"),
    (["--stages", "two", "--microbatches", "2"], "--stages: 'two' is not allowed"),
    (["--stages", "2", "--microbatches", "0"], "--microbatches: 0 is not allowed"),
    (["--stages", "2"], "--microbatches is required"),
    (["--microbatches", "2"], "--stages is required"),
    (
        ["--stages", "2", "--microbatches", "2", "--cost", "F=1;B=2"],
        "--cost: F='1;B=2' is not a number",
    ),
    (["--stages", "2", "--microbatches", "2", "--cost", "F=fast"], "--cost: F='fast'"),
    (["--stages", "2", "--microbatches", "2", "--latency", "-1"], "--latency: -1 is not allowed"),
    (
        ["--stages", "2,4", "--microbatches", "2", "--cost", "F=1:2"],
        "--cost: forward: 2 per-stage values but the schedule has 4 stages",
    ),
    (["--stages", "2", "--microbatches", "2", "--minibatches", "x"], "--minibatches: 'x'"),
    (["--stages", "2", "--microbatches", "2", "--cycle-ns", "0"], "--cycle-ns: 0 is not allowed"),
    (["--stages", "2", "--microbatches", "2", "--json", "--timeline"], "--timeline"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD)
def test_bad_flags_one_line_exit_2_no_output_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("aimcpipe simulate: error:")
    assert fragment in err
    assert list(tmp_path.iterdir()) == []


def test_deadlocking_schedule_file_names_stuck_actions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("F0,B0,F1,B1,U0-1\nF1,B1,F0,B0,U0-1\n")
    assert main(["simulate", "--schedule", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "stage 0 stuck at 0B0" in err and "stage 1 stuck at 1F1" in err
    assert not (tmp_path / "run").exists()


def test_unknown_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--stages", "2", "--bogus"])
    assert info.value.code == 2
    assert "--bogus" in capsys.readouterr().err
