"""A stage that dies, hangs or raises ends the run with one line naming it, leaves no process
behind and keeps the last checkpoint, from which ``--resume`` finishes with exactly the
weights of an uninterrupted run (on the same backend or another one).

Faults are injected with ``AIMCPIPE_FAULT`` (see :mod:`aimcpipe.runtime.faults`): the
stage process sends itself SIGKILL, blocks forever, or raises at a chosen action."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aimcpipe.errors import StageFailure
from aimcpipe.launch.train import train
from aimcpipe.runtime import Pipeline
from aimcpipe.runtime.backends.ray_actors import RayBackend
from aimcpipe.runtime.options import RuntimeOptions
from aimcpipe.stages import build_model
from tests.runtime.test_backends import largest_difference

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "digits-analog.yaml")
SMALL = [
    "data.limit_train=160",
    "data.limit_test=50",
    "epochs=3",
    "checkpoint_every=1",
    "pipeline.microbatches=4",
    "pipeline.microbatch_size=8",
]  # async, 4 stages: 5 mini-batches, 60 actions per stage per epoch


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")


def _wait_gone(pids: list[int], within: float = 30.0) -> list[int]:
    deadline = time.monotonic() + within
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _spawned_by(parent: int) -> list[int]:
    """Processes whose environment says the torch backend of ``parent`` spawned them."""
    tag = f"AIMCPIPE_SPAWNED={parent}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "aimcpipe", "train", *args, "--no-progress"],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _model_file(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


@pytest.mark.slow
def test_a_killed_stage_process_is_named_and_resume_finishes_exactly(tmp_path):
    reference = tmp_path / "whole"
    train(CONFIG, out=reference, overrides=SMALL, progress=False)
    run = tmp_path / "run"
    fault = {"AIMCPIPE_FAULT": "kill:stage=2:epoch=1:action=10"}
    proc = _cli(
        CONFIG,
        "--backend",
        "torch",
        "--out",
        str(run),
        *[arg for o in SMALL for arg in ("--set", o)],
        env=fault,
    )
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert "stage 2 was killed by SIGKILL" in last and "in epoch 2" in last, err
    assert not _wait_gone(_spawned_by(proc.pid)), "a stage process outlived the run"
    assert not (run / "metrics.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    proc = _cli("--resume", str(run), "--backend", "torch")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert largest_difference(_model_file(run), _model_file(reference)) == 0.0


@pytest.mark.slow
def test_a_killed_ray_actor_is_named_and_another_backend_resumes_exactly(
    tmp_path, digits, ray_session, monkeypatch
):
    train_set, test_set = digits[0].subset(torch.arange(160)), digits[1].subset(torch.arange(50))

    def make(backend, out):
        from aimcpipe.analog import AnalogConfig, convert

        model = convert(build_model("digits-fcn", seed=2), AnalogConfig(), seed=2)
        return Pipeline(
            model, stages=4, policy="sync-1f1b", microbatches=4, microbatch_size=8,
            checkpoint_every=1, out=out, progress=False, backend=backend,
            runtime=RuntimeOptions(timeout_s=30),
        )  # fmt: skip

    with make("local", tmp_path / "whole") as whole:
        whole.fit(train_set, test_set, epochs=3)
        want = whole.state_dict()
    monkeypatch.setenv("AIMCPIPE_FAULT", "kill:stage=1:epoch=1:action=7")
    backend = RayBackend(RuntimeOptions(timeout_s=30))
    pipe = make(backend, tmp_path / "run")
    with pytest.raises(StageFailure, match=r"^stage 1 died \(its Ray actor ended") as info:
        pipe.fit(train_set, test_set, epochs=3)
    assert "\n" not in str(info.value)
    assert len(backend.pids) == 4 and not _wait_gone(backend.pids), "an actor outlived the run"
    monkeypatch.delenv("AIMCPIPE_FAULT")
    with make("torch", tmp_path / "run") as resumed:
        resumed.load_checkpoint(tmp_path / "run")
        assert resumed.epoch == 1
        resumed.fit(train_set, test_set, epochs=3)
        assert largest_difference(resumed.state_dict(), want) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "ray"])
def test_a_hung_stage_is_named_within_the_timeout(digits, monkeypatch, request, backend):
    if backend == "ray":
        request.getfixturevalue("ray_session")
    monkeypatch.setenv("AIMCPIPE_FAULT", "hang:stage=2:epoch=0:action=4")
    pipe = Pipeline(
        build_model("digits-fcn"), stages=3, policy="async", microbatches=2, microbatch_size=8,
        progress=False, backend=backend, runtime=RuntimeOptions(timeout_s=3),
    )  # fmt: skip
    with pytest.raises(StageFailure) as info:
        pipe.fit(digits[0].subset(torch.arange(64)), epochs=1)
    assert str(info.value) == (
        "stage 2 made no progress for 3 s; it was last seen at its action 2B1 (5 of 24 in epoch 1)"
    )
    assert not _wait_gone(pipe.backend.pids)
    pipe.close()


def test_an_exception_in_a_stage_process_is_reported_by_stage(digits, monkeypatch):
    monkeypatch.setenv("AIMCPIPE_FAULT", "raise:stage=1:epoch=0:action=2")
    with (
        Pipeline(
            build_model("digits-fcn"),
            stages=2,
            microbatches=2,
            microbatch_size=8,
            progress=False,
            backend="torch",
        ) as pipe,  # fmt: skip
        pytest.raises(StageFailure, match=r"^stage 1: RuntimeError: injected fault at action 2$"),
    ):
        pipe.fit(digits[0].subset(torch.arange(32)), epochs=1)
    with pytest.raises(StageFailure, match=r"stopped after a failure \(stage 1"):
        pipe.evaluate(digits[1])  # stages left mid-schedule are not used again by accident


@pytest.mark.slow
def test_ctrl_c_stops_every_stage_process_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    sets = [arg for o in [*SMALL[:2], "epochs=200", "checkpoint_every=1"] for arg in ("--set", o)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "aimcpipe", "train", CONFIG, "--backend", "torch", "--out",
         str(run), "--no-progress", *sets],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.05)
    spawned = _spawned_by(proc.pid)
    assert len(spawned) == 3
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == (
        f"aimcpipe train: interrupted; continue with: aimcpipe train --resume {run}"
    )
    assert not _wait_gone(spawned)
    assert not (run / "metrics.json").exists()
