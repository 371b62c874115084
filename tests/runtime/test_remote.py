"""The scheduler's decisions for stages in other processes: the channel backend, and which
stage a failure is blamed on."""

from __future__ import annotations

import pytest

from aimcpipe.errors import ConfigError
from aimcpipe.runtime.backends.remote import decide_dist_backend, diagnose


def _info(cuda: int, local_world_size: int = 1) -> dict:
    return {"cuda": cuda, "local_world_size": local_world_size}


@pytest.mark.parametrize(
    ("option", "device", "infos", "want"),
    [
        ("auto", "auto", [_info(0), _info(0)], "gloo"),
        ("auto", "auto", [_info(2, 2), _info(2, 2)], "nccl"),  # a GPU each
        ("auto", "auto", [_info(1, 2), _info(1, 2)], "gloo"),  # two stages share one GPU
        ("auto", "cpu", [_info(2, 2), _info(2, 2)], "gloo"),
        ("gloo", "auto", [_info(2, 2), _info(2, 2)], "gloo"),
        ("nccl", "auto", [_info(1), _info(1)], "nccl"),
    ],
)
def test_nccl_only_when_every_stage_has_a_gpu_of_its_own(option, device, infos, want):
    assert decide_dist_backend(option, device, infos) == want


def test_nccl_without_a_gpu_per_stage_is_one_line():
    with pytest.raises(ConfigError, match=r"^runtime\.dist_backend: nccl needs a GPU"):
        decide_dist_backend("nccl", "auto", [_info(1), _info(0)])


SEEN = {2: {"epoch": 1, "done": 5, "total": 24, "at": "2B1"}}


def _f(kind: str, peer: int | None = None, at: float = 0.0, message: str = "") -> dict:
    return {"kind": kind, "peer": peer, "at": at, "message": message}


@pytest.mark.parametrize(
    ("failures", "want"),
    [
        # a dead stage beats everything it caused
        ({1: _f("lost", 2), 2: _f("died", message="was killed by SIGKILL"), 3: _f("lost", 2)},
         "stage 2 was killed by SIGKILL; it was last seen at its action 2B1 (6 of 24 in epoch 2)"),
        # a stage that raised beats the timeouts of its neighbours
        ({0: _f("timeout", 1, at=1.0), 1: _f("error", message="stage 1: 1F3 failed: boom")},
         "stage 1: 1F3 failed: boom"),
        # a stage others waited for, silent itself, made no progress
        ({1: _f("timeout", 2, at=1.0), 3: _f("timeout", 2, at=0.5)},
         "stage 2 made no progress for 60 s; it was last seen at its action 2B1 (6 of 24 in "
         "epoch 2)"),
        # under torchrun nobody sees the process end: its neighbours lose it
        ({1: _f("lost", 2), 3: _f("lost", 2)},
         "stage 2 was lost (its process died or its connection broke); it was last seen at its "
         "action 2B1 (6 of 24 in epoch 2)"),
        # a timeout blaming a stage that itself timed out points further along
        ({0: _f("timeout", 1), 1: _f("timeout", 2)}, "stage 2 made no progress for 60 s; it was "
         "last seen at its action 2B1 (6 of 24 in epoch 2)"),
        ({3: _f("stalled")}, "stage 3 made no progress for 60 s"),
    ],
)  # fmt: skip
def test_a_failure_is_blamed_on_where_it_started(failures, want):
    assert diagnose(failures, SEEN, 60.0) == want


def test_a_wait_longer_than_the_timeout_on_a_working_stage_says_to_raise_the_timeout():
    failures = {0: _f("timeout", 1)}
    got = diagnose(failures, SEEN | {1: {"epoch": 0, "done": 3, "total": 9, "at": "1F2"}}, 60.0,
                   working={1})  # fmt: skip
    assert got == (
        "stage 0 waited 60 s for stage 1, which was still working; it was last seen at its "
        "action 1F2 (4 of 9 in epoch 1); raise runtime.timeout_s if one wait can last that long"
    )


class _Call:
    """A command that finishes after ``waits`` waits (blocking) or ``polls`` polls."""

    def __init__(self, value, blocks: bool, waits: int = 0, polls: int = 0) -> None:
        self.value, self.blocks, self.waits, self.polls = value, blocks, waits, polls
        self.waited: list[float] = []

    def poll(self):
        if self.blocks:
            return (len(self.waited) >= self.waits, ("ok", self.value))
        self.polls -= 1
        return (self.polls < 0, ("ok", self.value))

    def wait(self, timeout_s: float) -> None:
        self.waited.append(timeout_s)


class _Handle:
    def __init__(self, stage: int, call: _Call) -> None:
        self.stage, self.call = stage, call

    def submit(self, method, *args):
        return self.call

    def death(self):
        return None

    def progress(self):
        return {"epoch": 0, "done": 0, "total": 1, "at": None}


def test_the_scheduler_sleeps_in_a_blocking_wait_not_in_naps(monkeypatch):
    """Stage 0's call can block (a thread beside the scheduler; Ray's calls too): the
    scheduler waits in it, so an epoch's end is seen when it happens, not a nap later;
    calls that cannot block are polled, with naps only once no blocking call is left."""
    from types import SimpleNamespace

    from aimcpipe.runtime.backends import remote

    naps: list[float] = []
    monkeypatch.setattr(remote.time, "sleep", naps.append)
    inline, other = _Call("a", blocks=True, waits=3), _Call("b", blocks=False, polls=5)
    fake = type("Fake", (remote.RemoteBackend,), {"_launch": lambda self, n: None})
    backend = fake.__new__(fake)
    backend.handles = [_Handle(0, inline), _Handle(1, other)]
    backend.options = SimpleNamespace(timeout_s=60.0)
    assert backend._gather("run_epoch", [(), ()], epoch=True, watch=None) == ["a", "b"]
    assert len(inline.waited) == 3 and all(0 < t <= 0.05 for t in inline.waited)
    assert len(naps) == 5 - 3 and naps[0] == 0.0005  # after the blocking call, short naps


def test_a_stage_process_imports_the_same_aimcpipe_as_its_parent(tmp_path, monkeypatch):
    """A decoy ``aimcpipe`` in the working directory (say, another checkout) must not be what
    the spawned stage processes import."""
    import os
    import subprocess
    from pathlib import Path

    import aimcpipe
    from aimcpipe.runtime.backends.torch_dist import child_python, child_pythonpath

    decoy = tmp_path / "aimcpipe"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, PYTHONPATH=child_pythonpath())
    out = subprocess.run(
        child_python("-c", "import aimcpipe; print(aimcpipe.__file__)"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert Path(out).resolve() == Path(aimcpipe.__file__).resolve()
    assert str(tmp_path) in child_pythonpath().split(os.pathsep)  # a user's modules still import
