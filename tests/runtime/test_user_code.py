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


def test_api_out_test_data_and_blocks_are_checked_before_any_training(tmp_path):
    import pytest
    import torch
    from torch import nn

    from aimcpipe.errors import ConfigError
    from aimcpipe.runtime import Dataset, Pipeline
    from aimcpipe.stages import partition

    def model():
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    train = Dataset("toy", x, y, "classification", 3)
    with pytest.raises(ConfigError, match=r"^out: give a directory name"):
        Pipeline(model(), out="")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ConfigError, match=r"^out: .* exists and is not a directory"):
        Pipeline(model(), out=afile)
    empty = Dataset("empty", x[:0], y[:0], "classification", 3)
    narrow = Dataset("narrow", torch.randn(16, 5), y[:16], "classification", 3)
    with Pipeline(model(), stages=2, progress=False) as pipe:
        with pytest.raises(ConfigError, match=r"^test: the dataset 'empty' holds no samples"):
            pipe.fit(train, empty)
        with pytest.raises(ConfigError, match=r"^model: stage 0 .* cannot take the data"):
            pipe.fit(train, narrow)
        assert pipe.epoch == 0  # refused before an epoch was trained
        with pytest.raises(ConfigError, match=r"^data: the dataset 'empty' holds no samples"):
            pipe.evaluate(empty)
    with pytest.raises(ConfigError, match=r"^partition: blocks must be a model .* NoneType"):
        partition(None, 2)


def test_a_loss_that_returns_no_scalar_tensor_is_named_before_training():
    import pytest
    import torch
    from torch import nn

    from aimcpipe.errors import ConfigError
    from aimcpipe.runtime import Dataset, Pipeline

    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    train = Dataset("toy", x, y, "classification", 3)

    def per_sample(out, target):
        return nn.functional.cross_entropy(out, target, reduction="none")

    def a_float(out, target):
        return 1.0

    for loss, what in ((a_float, "a float"), (per_sample, r"a tensor of shape \(16,\)")):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        pipe = Pipeline(model, stages=2, loss=loss, progress=False)
        with pipe, pytest.raises(ConfigError, match=rf"^loss: returned {what}; a loss returns"):
            pipe.fit(train)
