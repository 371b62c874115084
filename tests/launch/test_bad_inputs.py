"""Bad input from a new user's hands: every case is one line on stderr, exit status 2, and no
work done (or lost) first."""

from __future__ import annotations

import pytest

from aimcpipe.launch.cli import main

CONFIG = "configs/digits-analog.yaml"


def _one_line(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"aimcpipe {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("command", ["train", "speedup"])
def test_config_that_is_binary_a_directory_or_a_device_is_named_for_what_it_is(
    capsys, tmp_path, command
):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 3)
    out = ["--out", str(tmp_path / "out")]
    _one_line(capsys, [command, str(binary), *out], "not a text file")
    _one_line(capsys, [command, str(tmp_path), *out], "is a directory")
    _one_line(capsys, [command, "/dev/null", *out], "not a regular file")
    _one_line(capsys, [command, str(tmp_path / "missing.yaml"), *out], "does not exist")
    assert not (tmp_path / "out").exists()


def test_schedule_file_that_is_binary_or_a_directory_is_one_line(capsys, tmp_path):
    binary = tmp_path / "s.csv"
    binary.write_bytes(bytes(range(128, 256)))
    _one_line(capsys, ["simulate", "--schedule", str(binary)], "not a text file")
    folder = tmp_path / "d.json"
    folder.mkdir()
    _one_line(capsys, ["simulate", "--schedule", str(folder)], "is a directory")


ROOT_CASES = [
    ["simulate", "--stages", "2", "--microbatches", "2"],
    ["lsq"],
    ["train", CONFIG],
    ["speedup", CONFIG],
]


@pytest.mark.parametrize("argv", ROOT_CASES, ids=lambda a: a[0])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(
    capsys, tmp_path, monkeypatch, argv
):
    """A read-only file system (simulated: making anything there fails with EROFS) is found
    before the command computes anything, not when it writes its results."""
    import errno
    import tempfile

    from aimcpipe.launch import outdir

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outdir.tempfile, "mkdtemp", read_only)
    out = tmp_path / "out"
    _one_line(capsys, [*argv, "--out", str(out)], f"--out: cannot write in {tmp_path}",
              "read-only file system")  # fmt: skip
    assert not out.exists()
    monkeypatch.setattr(outdir.tempfile, "mkdtemp", tempfile.mkdtemp)


def test_an_out_in_a_folder_without_write_permission_is_refused(capsys, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; the read-only case above covers the check")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _one_line(capsys, ["lsq", "--out", str(locked / "run")], "--out: cannot write in")
    finally:
        locked.chmod(0o755)


SIZE_CASES = [
    (["simulate", "--stages", "1000000000", "--microbatches", "4"], ["--stages", "memory"]),
    (["simulate", "--stages", "2", "--microbatches", "1000000000"], ["--microbatches", "memory"]),
    (["lsq", "--replicas", "100000000"], ["--replicas", "memory"]),
    (["lsq", "--tau-iterations", "1000000000000"], ["--tau-iterations", "memory"]),
    (["train", CONFIG, "--epochs", "100000000", "--dry-run"], ["--epochs:", "days", "24 h"]),
    (["train", CONFIG, "--cycle-s", "1000", "--dry-run"], ["--cycle-s/epochs:", "days"]),
    (["speedup", CONFIG, "--epochs", "100000000"], ["--epochs:", "days"]),
]


@pytest.mark.parametrize("argv, needles", SIZE_CASES, ids=lambda a: " ".join(a[:3]))
def test_work_that_would_not_fit_or_finish_is_refused_at_once(capsys, tmp_path, argv, needles):
    """Sizes from the user are estimated before anything is allocated or computed: the
    command returns (the test would run out of memory or time otherwise) with one line."""
    out = [] if "--dry-run" in argv else ["--out", str(tmp_path / "out")]
    _one_line(capsys, [*argv, *out], *needles)
    assert not (tmp_path / "out").exists()


def test_a_size_check_leaves_work_that_fits_alone(capsys):
    """The same estimate lets an ordinary (long but feasible) job through."""
    assert main(["simulate", "--stages", "2,4", "--microbatches", "8", "--json"]) == 0
    assert '"async"' in capsys.readouterr().out


def test_too_few_samples_for_a_minibatch_is_named_as_such(capsys):
    argv = ["train", CONFIG, "--set", "pipeline.microbatches=1000000000", "--dry-run"]
    _one_line(capsys, argv, "fewer than one mini-batch", "pipeline.microbatches")


@pytest.mark.parametrize("command", ["train", "speedup", "lsq"])
def test_an_empty_out_is_not_the_current_directory(capsys, command):
    argv = [command] + ([CONFIG] if command != "lsq" else []) + ["--out", ""]
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit, with our one line
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "empty" in err, err


def test_an_empty_simulate_out_is_refused(capsys):
    _one_line(capsys, ["simulate", "--stages", "2", "--microbatches", "2", "--out", " "],
              "--out", "empty")  # fmt: skip


def test_a_name_too_long_for_the_file_system_is_refused_before_any_work(capsys, tmp_path):
    out = tmp_path / ("a" * 250)
    _one_line(capsys, ["lsq", "--out", str(out)], "--out", "250 bytes long")
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "speedup"])
def test_resume_of_a_missing_or_file_path_says_which(capsys, tmp_path, command):
    _one_line(capsys, [command, "--resume", str(tmp_path / "gone")], "--resume", "does not exist")
    afile = tmp_path / "f"
    afile.write_text("x")
    _one_line(capsys, [command, "--resume", str(afile)], "--resume", "is a file")


def test_a_learning_rate_beyond_float32_is_refused(capsys):
    _one_line(capsys, ["train", CONFIG, "--set", "optim.lr=1e39", "--dry-run"], "optim.lr",
              "float32")  # fmt: skip


def test_a_shortcut_flag_is_named_as_typed(capsys):
    _one_line(capsys, ["train", CONFIG, "--stages", "9", "--dry-run"], "--stages: 9 stages")
    _one_line(capsys, ["train", CONFIG, "--epochs", "1.5", "--dry-run"], "--epochs")
