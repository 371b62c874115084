"""Shared fixtures of the runtime tests: data, and started multi-process backends that
several tests reuse (starting S processes or actors costs seconds; running a job on them
does not)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from aimcpipe.runtime import Dataset, load_dataset
from aimcpipe.runtime.backends import Backend, make_backend
from aimcpipe.runtime.options import RuntimeOptions


@pytest.fixture(scope="session")
def digits() -> tuple[Dataset, Dataset]:
    return load_dataset("digits", seed=0)


def _pool(name: str) -> Iterator[Callable[[int], Backend]]:
    backends: dict[int, Backend] = {}

    def get(stages: int) -> Backend:
        backend = backends.get(stages)
        if backend is None or getattr(backend, "_broken", None):
            backend = backends[stages] = make_backend(name, RuntimeOptions(timeout_s=60))
        return backend

    yield get
    for backend in backends.values():
        backend.close()


@pytest.fixture(scope="session")
def torch_pool() -> Iterator[Callable[[int], Backend]]:
    """``torch_pool(S)``: a torch backend of S processes, started on first use."""
    yield from _pool("torch")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for every test that needs it (started as the backend would)."""
    pytest.importorskip("ray")
    from aimcpipe.runtime.backends.ray_actors import init_ray

    started = init_ray(num_cpus=8)
    yield
    if started:
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def ray_pool(ray_session: None) -> Iterator[Callable[[int], Backend]]:
    """``ray_pool(S)``: a Ray backend of S actors, started on first use."""
    yield from _pool("ray")
