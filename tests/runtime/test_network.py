"""Nothing a run starts listens beyond loopback by default: the torch backend's store and
gloo sockets (stages on one machine talk over unix sockets unless told not to), and the local
Ray's services and actors (checked like ``ss -tln``)."""

from __future__ import annotations

import pytest
import torch

from aimcpipe.runtime import Pipeline
from aimcpipe.runtime.options import RuntimeOptions
from aimcpipe.stages import build_model
from tests.runtime.conftest import is_loopback, listening


def _run_and_look(digits, backend, unix_sockets: bool = True) -> set[tuple[str, int]]:
    pipe = Pipeline(
        build_model("digits-fcn"), stages=4, microbatches=2, microbatch_size=8,
        progress=False, backend=backend, runtime=RuntimeOptions(unix_sockets=unix_sockets),
    )  # fmt: skip
    with pipe:
        pipe.fit(digits[0].subset(torch.arange(32)), digits[1].subset(torch.arange(8)))
        return listening()  # while every stage process is up


@pytest.mark.parametrize("unix_sockets", [True, False])
def test_the_torch_backend_listens_on_loopback_only(digits, unix_sockets):
    before = listening()
    new = _run_and_look(digits, "torch", unix_sockets) - before
    if unix_sockets:
        assert len(new) >= 1  # the store; the stages talk over unix sockets
    else:
        assert len(new) >= 1 + 3  # the store, and the gloo socket of each spawned stage process
    assert all(is_loopback(addr) for addr, _ in new), sorted(new)


@pytest.mark.slow
def test_a_local_ray_listens_on_loopback_only(digits, ray_session):
    new = _run_and_look(digits, "ray") - ray_session
    assert len(new) >= 5  # Ray's services, its actors, our store and channels
    assert all(is_loopback(addr) for addr, _ in new), sorted(new)
