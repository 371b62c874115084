"""The scheduler package is torch-free and exposes a clean public API."""

import os
import subprocess
import sys
from pathlib import Path

import aimcpipe
import aimcpipe.scheduler as scheduler


def test_importing_the_scheduler_does_not_load_torch() -> None:
    code = (
        "import sys\n"
        "import aimcpipe.scheduler, aimcpipe.scheduler.files, aimcpipe.scheduler.trace\n"
        "import aimcpipe.scheduler.timeline, aimcpipe.scheduler.plot\n"
        "import aimcpipe.launch.simulate_cmd\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported eagerly'\n"
    )
    root = str(Path(aimcpipe.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def test_public_api() -> None:
    for name in scheduler.__all__:
        assert hasattr(scheduler, name), name
    for name in ["Action", "Schedule", "build_schedule", "validate", "simulate", "CostModel"]:
        assert name in scheduler.__all__
