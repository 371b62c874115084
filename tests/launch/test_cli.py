"""The ``aimcpipe`` entry point itself."""

import subprocess
import sys

from aimcpipe import __version__
from aimcpipe.launch.cli import main


def test_version_and_help_list_the_commands(capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "aimcpipe", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and __version__ in proc.stdout
    assert main([]) == 2
    assert "lsq" in capsys.readouterr().out


def test_unknown_command_and_flag_exit_2(capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "aimcpipe", "lsq", "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unrecognized arguments: --bogus" in proc.stderr


def test_a_bad_count_kernel_variable_fails_before_any_work(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AIMCPIPE_COUNT_KERNEL", "popcount")
    out = tmp_path / "run"
    assert main(["simulate", "--stages", "2", "--microbatches", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aimcpipe simulate: error: AIMCPIPE_COUNT_KERNEL='popcount'")
    assert "allowed: auto, float32" in err and len(err.splitlines()) == 1
    assert not out.exists()
