"""``aimcpipe speedup``: a sweep over stage counts and policies, its records, plots, resume
and one-line errors. Small sweeps on scikit-learn's digits, in-process through the CLI."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from aimcpipe.launch.speedup import BASELINE, default_stages, plan_sweep
from aimcpipe.scheduler import build_schedule, closed_form_speedup, simulate
from aimcpipe.scheduler.costs import CostModel
from tests.launch.test_train_cmd import DIGITS, flat, load_model, run_cli

SMALL = ["--set", "data.limit_train=96", "--set", "data.limit_test=60", "--no-progress"]
RECORD_KEYS = {
    "policy", "stages", "test_accuracy", "cycles", "measured_makespan_s",
    "predicted_makespan_s", "measured_speedup", "predicted_speedup", "closed_form_speedup",
    "efficiency", "measured_utilization", "predicted_utilization",
    "measured_utilization_per_stage", "predicted_utilization_per_stage", "samples_per_s",
    "history", "run_dir",
}  # fmt: skip


def sweep_cli(argv):
    """``run_cli(argv)`` with the sweep's progress lines as the third value."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("aimcpipe.launch.speedup")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        rc, stdout, err = run_cli(argv)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return rc, stdout, err + "\n".join(lines)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    rc, stdout, err = sweep_cli(
        ["speedup", DIGITS, "--stages", "1,2", "--epochs", "2", "--backend", "local",
         "--out", str(out), *SMALL]
    )  # fmt: skip
    assert rc == 0, err
    return out, stdout, err


def test_a_sweep_writes_a_record_per_run_against_the_baseline(sweep_dir):
    out, stdout, err = sweep_dir
    data = json.loads((out / "speedup.json").read_text())
    assert data["complete"] is True
    runs = data["runs"]
    assert [(r["policy"], r["stages"]) for r in runs] == [
        ("wop", 1), ("sync-1f1b", 1), ("async", 1), ("wop", 2), ("sync-1f1b", 2), ("async", 2),
    ]  # fmt: skip
    base = runs[0]
    assert base["baseline"] and base["measured_speedup"] == 1.0
    for r in runs:
        assert set(r) >= RECORD_KEYS
        assert (out / r["run_dir"] / "metrics.json").is_file()
        assert r["measured_speedup"] == pytest.approx(
            base["measured_makespan_s"] / r["measured_makespan_s"]
        )
        assert r["efficiency"] == pytest.approx(
            r["predicted_makespan_s"] / r["measured_makespan_s"]
        )
        assert r["closed_form_speedup"] == pytest.approx(
            closed_form_speedup(r["policy"], r["stages"], 4, r["minibatches_per_epoch"])
        )
        assert len(r["measured_utilization_per_stage"]) == r["stages"]
        assert len(r["history"]) == 2
        assert r["history"][-1]["cycles"] == r["cycles"]
    # predicted speedup: the simulator's cycles with per-layer costs (4 layers in all)
    k = runs[0]["minibatches_per_epoch"]
    wop1 = simulate(build_schedule("wop", 1, 4, k), CostModel(per="layer").for_layers([4]))
    async2 = simulate(build_schedule("async", 2, 4, k), CostModel(per="layer").for_layers([2, 2]))
    assert runs[5]["predicted_speedup"] == pytest.approx(wop1.makespan / async2.makespan)
    # no emulated time: the prediction is calibrated on the baseline
    assert base["efficiency"] == pytest.approx(1.0)
    for name in ("speedup.png", "utilization.png", "accuracy.png"):
        assert (out / name).stat().st_size > 0
    assert "[6/6] async, 2 stages: test accuracy" in err
    assert "measured" not in stdout.splitlines()[0] and "speedup" in stdout.splitlines()[0]


def test_a_sweep_run_trains_what_aimcpipe_train_trains(sweep_dir, tmp_path):
    out, _, _ = sweep_dir
    rc, _, err = run_cli(
        ["train", DIGITS, "--policy", "async", "--stages", "2", "--epochs", "2",
         "--out", str(tmp_path / "t"), *SMALL]
    )  # fmt: skip
    assert rc == 0, err
    ours = flat(load_model(out / "runs" / "async-s2" / "model.pt"))
    theirs = flat(load_model(tmp_path / "t" / "model.pt"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_resume_keeps_finished_runs_and_reruns_the_unfinished(sweep_dir, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(sweep_dir[0], out)
    kept = out / "runs" / "wop-s2" / "metrics.json"
    stamp = kept.stat().st_mtime_ns
    (out / "runs" / "async-s2" / "metrics.json").unlink()  # as if interrupted in that run
    (out / "speedup.json").unlink()
    rc, _, err = sweep_cli(["speedup", "--resume", str(out), "--no-progress"])
    assert rc == 0, err
    assert "5 of 6 runs already finished" in err
    assert kept.stat().st_mtime_ns == stamp
    data = json.loads((out / "speedup.json").read_text())
    assert data["complete"] and len(data["runs"]) == 6
    again = flat(load_model(out / "runs" / "async-s2" / "model.pt"))
    first = flat(load_model(sweep_dir[0] / "runs" / "async-s2" / "model.pt"))
    assert all(torch.equal(again[k], first[k]) for k in first)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stages", "1,8"], "--stages: 8 stages but the model has only 4 blocks"),
        (["--stages", "0"], "--stages: '0' is not allowed"),
        (["--policies", "wop,1f1b"], "--policies: unknown policy '1f1b'"),
        (["--cycle-s", "0"], "--cycle-s: 0 is not allowed"),
        (["--epochs", "1.5"], "--epochs: '1.5' is not an integer"),
        (["--set", "pipeline.partition=[2,2]"], "pipeline.partition: [2, 2] fixes one split"),
        (["--set", "pipeline.microbatchez=2"], "pipeline.microbatchez: unknown key"),
    ],
)
def test_bad_sweeps_are_refused_in_one_line_before_any_run(tmp_path, argv, message):
    out = tmp_path / "s"
    rc, _, err = run_cli(["speedup", DIGITS, "--out", str(out), *SMALL, *argv])
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_resume_refuses_changed_settings_and_foreign_directories(sweep_dir, tmp_path):
    rc, _, err = run_cli(["speedup", "--resume", str(sweep_dir[0]), "--stages", "1"])
    assert rc == 2 and "a resumed sweep keeps its settings" in err
    rc, _, err = run_cli(["speedup", "--resume", str(tmp_path)])
    assert rc == 2 and "has no sweep.json" in err
    rc, _, err = run_cli(["speedup", DIGITS, "--out", str(sweep_dir[0]), *SMALL])
    assert rc == 2 and "is not empty" in err and "--resume" in err


def test_default_stage_counts_are_powers_of_two_up_to_the_blocks():
    assert default_stages(1) == [1]
    assert default_stages(4) == [1, 2, 4]
    assert default_stages(7) == [1, 2, 4]
    sweep = plan_sweep(DIGITS, epochs=1)
    assert sweep.stages == (1, 2, 4)
    assert sweep.runs()[0] == BASELINE
    only_async = plan_sweep(DIGITS, stages=[2], policies=["async"], epochs=1)
    assert only_async.runs() == [BASELINE, ("async", 2)]  # the baseline always runs


@pytest.mark.slow
def test_a_sweep_on_the_torch_backend_with_emulated_time(tmp_path):
    out = tmp_path / "s"
    rc, _, err = run_cli(
        ["speedup", DIGITS, "--stages", "2", "--policies", "async", "--epochs", "1",
         "--backend", "torch", "--cycle-s", "0.002", "--out", str(out),
         "--set", "data.limit_train=64", "--set", "data.limit_test=32", "--no-progress"]
    )  # fmt: skip
    assert rc == 0, err
    runs = json.loads((out / "speedup.json").read_text())["runs"]
    assert [r["backend"] for r in runs] == ["torch", "torch"]
    for r in runs:  # emulated time: the prediction is cycles × cycle_s, at most the measured
        assert r["predicted_makespan_s"] == pytest.approx(r["cycles"] * 0.002)
        assert 0 < r["efficiency"] <= 1.0
    assert sorted(os.listdir(out / "runs")) == ["async-s2", "wop-s1"]
    assert Path(out / "runs" / "async-s2" / "trace.json").is_file()
