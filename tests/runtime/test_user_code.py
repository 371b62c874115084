"""User code in the Python API: what a stage process cannot rebuild, or what raises, is named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
from torch import nn
from aimcpipe.errors import StageFailure
from aimcpipe.runtime import Pipeline
from aimcpipe.runtime.datasets import load_dataset


def my_loss(out, target):
    return nn.functional.cross_entropy(out, target)


train, test = load_dataset("digits", limit_train=64, limit_test=32)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
try:
    with Pipeline(model, stages=2, loss=my_loss, backend="torch", progress=False) as pipe:
        pipe.fit(train, test, epochs=1)
except StageFailure as exc:
    print("StageFailure:", exc)
"""


def test_a_loss_defined_in_the_users_script_is_named_on_the_torch_backend(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("StageFailure: stage 1"), done.stdout
    assert "'my_loss'" in line and "defined in the script being run (__main__)" in line, line
    assert "move the model, loss or partitioner into a module" in line, line
