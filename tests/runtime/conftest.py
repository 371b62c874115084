"""Shared fixtures of the runtime tests: data, and started multi-process backends that
several tests reuse (starting S processes or actors costs seconds; running a job on them
does not)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path

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


def listening() -> set[tuple[str, int]]:
    """Every listening TCP socket on this machine as (address, port), read from
    /proc/net/tcp and tcp6 (what ``ss -tln`` shows)."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((str(ipaddress.ip_address(raw)), int(port_hex, 16)))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[set[tuple[str, int]]]:
    """One local Ray for every test that needs it (started as the backend would); yields
    the sockets that listened before it started."""
    pytest.importorskip("ray")
    from aimcpipe.runtime.backends.ray_actors import init_ray

    before = listening()
    started = init_ray(num_cpus=64)  # logical CPUs: room for every pooled and fresh actor
    yield before
    if started:
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def ray_pool(ray_session: None) -> Iterator[Callable[[int], Backend]]:
    """``ray_pool(S)``: a Ray backend of S actors, started on first use."""
    yield from _pool("ray")
