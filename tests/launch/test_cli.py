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
