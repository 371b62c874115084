"""``aimcpipe lsq``: outputs, the papers' qualitative claims on small sweeps, bad flags."""

import json
import subprocess
import sys

import pytest

from aimcpipe.launch.cli import main

KEYS = {"sweep", "algorithm", "mode", "tau", "lr", "iterations", "asymptotic_error"}


def test_small_run_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "lsq"
    args = [
        "lsq",
        "--tau",
        "1,2",
        "--lrs",
        "0.1,0.03",
        "--lr-budget",
        "5",
        "--tau-iterations",
        "60",
        "--replicas",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "tau sweep" in table and "lr sweep" in table and "tiki-taka" in table
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == (2 + 2) * 2 * 3  # points × modes × algorithms
    assert all(set(r) >= KEYS for r in runs)
    assert {r["iterations"] for r in runs if r["sweep"] == "lr"} == {50, 167}
    assert {r["mode"] for r in runs} == {"expected", "pulsed"}
    curves = json.loads((out / "curves.json").read_text())["curves"]
    assert len(curves) == len(runs) and curves[0]["loss"]
    pytest.importorskip("matplotlib")
    for name in ("lsq_tau.png", "lsq_lr.png", "lsq_summary.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # deterministic: the same command gives the same numbers
    assert main([*args[:-1], str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())["runs"]
    assert [r["asymptotic_error"] for r in again] == [r["asymptotic_error"] for r in runs]


@pytest.mark.slow
def test_asymptotic_error_claims_of_the_paper(tmp_path):
    """lr sweep: digital and Tiki-Taka floors shrink with lr, Analog SGD's does not.
    tau sweep: Analog SGD's error falls as τ grows and stays above digital SGD's."""
    out = tmp_path / "lsq"
    assert (
        main(
            [
                "lsq",
                "--modes",
                "expected",
                "--tau",
                "1,2.5",
                "--tau-iterations",
                "1500",
                "--lrs",
                "0.1,0.01",
                "--lr-budget",
                "40",
                "--replicas",
                "2",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    runs = json.loads((out / "results.json").read_text())["runs"]
    err = {(r["sweep"], r["algorithm"], r["tau"], r["lr"]): r["asymptotic_error"] for r in runs}
    for algorithm in ("digital-sgd", "tiki-taka"):
        assert err[("lr", algorithm, 1.0, 0.01)] < 0.3 * err[("lr", algorithm, 1.0, 0.1)]
    assert err[("lr", "analog-sgd", 1.0, 0.01)] > 0.6 * err[("lr", "analog-sgd", 1.0, 0.1)]
    assert err[("lr", "analog-sgd", 1.0, 0.01)] > 3 * err[("lr", "tiki-taka", 1.0, 0.01)]
    assert err[("tau", "analog-sgd", 2.5, 0.03)] < 0.6 * err[("tau", "analog-sgd", 1.0, 0.03)]
    for tau in (1.0, 2.5):
        assert err[("tau", "analog-sgd", tau, 0.03)] > 2 * err[("tau", "digital-sgd", tau, 0.03)]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--algorithms", "adam", "--algorithms: 'adam' is not allowed"),
        ("--tau", "1,-2", "--tau: every value must be a number > 0"),
        ("--tau", "1e39", "--tau: every value must be a number > 0 and at most 3.4e+38"),
        ("--tt-transfer-ratio", "inf", "--tt-transfer-ratio: must be a number > 0"),
        ("--tt-transfer-ratio", "nan", "--tt-transfer-ratio: must be a number > 0"),
        ("--lr-budget", "inf", "--lr-budget: must be a number > 0"),
        ("--tau-lr", "1e39", "--tau-lr: must be a number > 0 and at most"),
        ("--lrs", "fast", "--lrs: 'fast' is not a comma-separated list"),
        ("--modes", "exact", "--modes: 'exact' is not allowed"),
        ("--replicas", "0", "--replicas: must be >= 1"),
    ],
)
def test_bad_flags_exit_2_with_one_line_and_no_output(tmp_path, flag, value, message):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "aimcpipe", "lsq", flag, value, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert message in proc.stderr
    assert not out.exists()


def test_out_that_is_not_an_lsq_directory_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    assert (
        main(
            [
                "lsq",
                "--sweeps",
                "tau",
                "--tau",
                "1",
                "--tau-iterations",
                "5",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert (tmp_path / "precious.txt").read_text() == "keep me"
