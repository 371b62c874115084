"""The Python API refuses bad arguments at once, in the project's own error type, naming the
parameter and what is allowed (the same words the CLI uses, without speaking of flags)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aimcpipe.analog import AnalogConfig, convert
from aimcpipe.errors import ConfigError
from aimcpipe.runtime import Dataset, LRSchedule, Pipeline, RuntimeOptions


def tiny() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def data(n: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset("toy", torch.randn(n, 4, generator=g), torch.arange(n) % 3, "classification", 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr_schedule": "step"}, "optim.lr_schedule: must be an LRSchedule, got 'step'"),
        ({"costs": "abc"}, "costs: must be a CostModel"),
        ({"eval_batch_size": 0}, "eval_batch_size: must be an integer >= 1, got 0"),
        ({"checkpoint_every": -1}, "checkpoint_every: must be an integer >= 0, got -1"),
        ({"seed": "a"}, "seed: must be an integer >= 0"),
        ({"seed": True}, "seed: must be an integer >= 0"),
        ({"progress": "yes"}, "progress: must be true or false"),
        ({"weight_stashing": "no"}, "weight_stashing: must be true or false"),
        ({"out": 3}, "out: must be a directory path"),
        ({"cycle_s": "a"}, "cycle_s: must be a number > 0"),
        ({"stages": "2"}, "num_stages must be an integer >= 1"),
        ({"loss": "foo"}, "loss: 'foo' is not a loss; allowed:"),
        ({"policy": "gpipe2"}, "pipeline.policy: 'gpipe2' is not a policy"),
        ({"lr": float("inf")}, "optim.lr: must be a number > 0"),
    ],
)
def test_pipeline_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message) as caught:
        Pipeline(tiny(), **{"stages": 1, "progress": False, **kwargs})
    assert "--" not in str(caught.value), "API errors do not speak of CLI flags"


def test_option_sections_check_their_fields():
    with pytest.raises(ConfigError, match="timeout_s: must be a number > 0, got 0"):
        RuntimeOptions(timeout_s=0)
    with pytest.raises(ConfigError, match="unix_sockets: must be true or false"):
        RuntimeOptions(unix_sockets="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"kind: .cosine-ish. is not allowed"):
        LRSchedule(kind="cosine-ish")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pipe():
    with Pipeline(tiny(), stages=1, progress=False) as pipeline:
        yield pipeline


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.fit(None), "train: must be an aimcpipe Dataset"),
        (lambda p: p.fit(data(), "x"), "test: must be an aimcpipe Dataset or None"),
        (lambda p: p.fit(data(), epochs=0), "epochs: must be an integer >= 1, got 0"),
        (lambda p: p.fit(data(), epochs="2"), "epochs: must be an integer >= 1"),
        (lambda p: p.evaluate("foo"), "data: must be an aimcpipe Dataset"),
        (lambda p: p.train_epoch(None, 0), "must be an aimcpipe Dataset"),
        (lambda p: p.train_epoch(data(), -1), "epoch: must be an integer >= 0, got -1"),
        (lambda p: p.plan(data(), "a"), "epoch: must be an integer >= 0"),
        (lambda p: p.load_checkpoint(3), "checkpoint: expected a file or run directory path"),
        (lambda p: p.load_checkpoint("/no/such/run"), "checkpoint: no checkpoint at"),
    ],
)
def test_method_arguments(pipe, call, message):
    with pytest.raises(ConfigError, match=message):
        call(pipe)


def test_the_error_names_how_to_make_a_dataset(pipe):
    """A torch TensorDataset is the likeliest wrong thing to pass; the message says what to
    use instead."""
    wrong = torch.utils.data.TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"Dataset\(name, x, y, task, num_classes\)"):
        pipe.fit(wrong)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: Dataset("d", [[0.0]], torch.zeros(1), "classification", 1),
            r"x must be a torch\.Tensor",
        ),
        (
            lambda: Dataset("d", torch.zeros(3, 2), torch.zeros(2), "classification", 1),
            "3 inputs but 2 targets",
        ),
        (lambda: Dataset("d", torch.zeros(2, 2), torch.zeros(2), "rank", 1), "task must be"),
        (
            lambda: Dataset("d", torch.zeros(2, 2), torch.zeros(2), "classification", 0),
            "num_classes",
        ),
    ],
)
def test_dataset_checks_its_fields(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_convert_checks_its_arguments():
    with pytest.raises(ConfigError, match=r"model: expected a torch\.nn\.Module, got str"):
        convert("x", AnalogConfig())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="config: expected an AnalogConfig or None"):
        convert(tiny(), "x")  # type: ignore[arg-type]
