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
