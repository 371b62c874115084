"""Settings of the runtime itself: where stages run and how long anything may wait.

These are the ``runtime``, ``device_time`` and ``ray`` sections of a train config and the
``runtime=``/``device_time=``/``ray=`` arguments of :class:`~aimcpipe.runtime.Pipeline`. They
never change the numbers a run computes (``threads`` and ``device`` aside: they change float
rounding and random streams, which is why ``threads`` is one setting applied by every
backend), so a resumed run may change any of them but those two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from aimcpipe.errors import ConfigError
from aimcpipe.runtime.ray_address import parse_ray_address

__all__ = ["BACKENDS", "DeviceTime", "RayOptions", "RuntimeOptions"]

BACKENDS = ("local", "torch", "ray")
START_S = 120.0  # at least this long for stage processes or actors to start (imports, placement)


def _positive(name: str, value: object, *, integer: bool = False, allow_zero: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    bound = ">= 0" if allow_zero else "> 0"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if (
        isinstance(value, bool)
        or not ok_type
        or not math.isfinite(value)  # type: ignore[arg-type]
        or value < 0  # type: ignore[operator]
        or (value == 0 and not allow_zero)
    ):
        raise ConfigError(f"{name}: must be {kind} {bound}, got {value!r}")


@dataclass(frozen=True)
class RuntimeOptions:
    """How every backend runs its stages."""

    threads: int = 1
    """Torch intra-op threads per stage, set by every backend (the local one too), so float
    reductions run in the same order everywhere (torchrun would otherwise force 1 and a Ray
    actor would take its CPU count)."""
    timeout_s: float = 60.0
    """How long (seconds) a stage may wait for a message or go without progress before the
    run stops naming it."""
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """The torch.distributed backend of the activation/gradient channels (``auto``: nccl
    when every stage has a GPU of its own, else gloo)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where stages live (``auto``: stage s on ``cuda:(local rank % GPUs)`` when CUDA is
    available, else the CPU)."""
    unix_sockets: bool = True
    """Where the channels would use gloo and every stage runs on one machine, neighbours
    talk over unix-domain sockets instead (several times less latency per message; false:
    gloo)."""

    def __post_init__(self) -> None:
        if not isinstance(self.unix_sockets, bool):
            raise ConfigError(f"unix_sockets: must be true or false, got {self.unix_sockets!r}")
        _positive("threads", self.threads, integer=True)
        _positive("timeout_s", self.timeout_s)
        if self.dist_backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(
                f"dist_backend: {self.dist_backend!r} is not allowed; use one of 'auto', "
                "'gloo', 'nccl'"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(
                f"device: {self.device!r} is not allowed; use one of 'auto', 'cpu', 'cuda'"
            )

    @property
    def start_s(self) -> float:
        """How long stage processes or actors may take to start: a process importing torch
        on a busy machine, or an actor waiting for a place, is not a hang."""
        return max(self.timeout_s, START_S)


@dataclass(frozen=True)
class DeviceTime:
    """Emulated accelerator time. A small machine then shows the timing of real
    accelerators; actions whose host compute takes longer than their emulated time are
    counted as overruns."""

    cycle_s: float | None = None
    """Seconds per cost-model cycle: every action lasts at least its cost in cycles ×
    ``cycle_s`` of wall-clock time (the host waits out the rest), and a message in flight
    takes the cost model's latency × ``cycle_s``; null runs as fast as the host can."""

    def __post_init__(self) -> None:
        if self.cycle_s is not None:
            _positive("cycle_s", self.cycle_s)


@dataclass(frozen=True)
class RayOptions:
    """The Ray backend: the cluster to join and the resources of each stage actor."""

    address: str | None = None
    """The address of a running Ray cluster to join (``HEAD:6379``); null starts a local
    Ray on 127.0.0.1 with no dashboard and no usage reporting."""
    num_cpus: float = 1.0
    """Logical CPUs per stage actor (fractions allowed)."""
    num_gpus: float = 0.0
    """GPUs per stage actor (fractions allowed)."""
    connect_timeout_s: float = 30.0
    """How long (seconds) joining the cluster at ``address`` may take before the run
    stops, naming the address."""

    def __post_init__(self) -> None:
        if self.address is not None:
            parse_ray_address(self.address, "address")  # refused here, before anything starts
        _positive("num_cpus", self.num_cpus, allow_zero=True)
        _positive("num_gpus", self.num_gpus, allow_zero=True)
        _positive("connect_timeout_s", self.connect_timeout_s)
