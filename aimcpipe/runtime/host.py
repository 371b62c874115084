"""A stage host: one stage worker with its channels, as a process or actor of a
multi-process backend runs it.

The torch backend runs one per process (rank s hosts stage s; rank 0 hosts stage 0 beside
the central scheduler), the Ray backend one per actor. The scheduler drives it with a few
coarse commands per epoch (:data:`COMMANDS`), which return ``("ok", value)`` or
``("error", info)``; a worker never decides anything that other stages must agree on.

While it runs, a host publishes its progress (epoch, action index, the action it is at) in
the store ten times a second and at the start of each epoch, so the scheduler can show
progress and, when a run fails, name where each stage stopped.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from aimcpipe.errors import AimcpipeError
from aimcpipe.runtime.channels import Channels, PeerLost, PeerTimeout
from aimcpipe.runtime.clock import boot_id, tighten_timers
from aimcpipe.runtime.faults import Fault
from aimcpipe.runtime.plan import EpochPlan, EvalPlan, EvalResult, StageReport, StageSpec
from aimcpipe.runtime.rendezvous import Store
from aimcpipe.runtime.worker import StageWorker, pick_device

__all__ = [
    "COMMANDS",
    "HostSettings",
    "StageHost",
    "error_info",
    "process_info",
    "settle_garbage",
]

BEAT_S = 0.1  # progress is published this often (the store lives beside stage 0 on torch)

log = logging.getLogger(__name__)

COMMANDS = (
    "setup",
    "put_data",
    "drop_data",
    "run_epoch",
    "evaluate",
    "state_dict",
    "load_state_dict",
    "model_state",
    "clock",
)


def process_info(local_rank: int = 0, local_world_size: int = 1) -> dict[str, Any]:
    """What the scheduler needs to know of a stage's process before it decides devices,
    channel backend and clock offsets."""
    return {
        "hostname": socket.gethostname(),
        "boot_id": boot_id(),
        "pid": os.getpid(),
        "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "local_rank": local_rank,
        "local_world_size": local_world_size,
    }


@dataclass(frozen=True)
class HostSettings:
    """Decided by the scheduler and sent to every stage host at start-up."""

    stage: int
    num_stages: int
    prefix: str
    dist_backend: str  # gloo or nccl (decided for all stages alike)
    device: str  # the runtime.device option
    threads: int
    timeout_s: float
    local_rank: int = 0
    fault: Fault | None = None
    unix_sockets: bool = True  # neighbours on one machine talk over unix sockets (gloo only)


def error_info(exc: BaseException, stage: int) -> dict[str, Any]:
    """A failure as plain data for the scheduler: ``kind`` (``lost``: a neighbour's
    connection broke; ``timeout``: a neighbour sent nothing in time; ``error``: this stage
    raised), the ``peer`` it blames, and a one-line ``message``."""
    if isinstance(exc, PeerLost | PeerTimeout):
        kind = "lost" if isinstance(exc, PeerLost) else "timeout"
        return {"kind": kind, "peer": exc.peer, "stage": stage, "message": str(exc)}
    message = str(exc) if isinstance(exc, AimcpipeError) else f"{type(exc).__name__}: {exc}"
    if not message.startswith(f"stage {stage}"):
        message = f"stage {stage}: {message}"
    info = {"kind": "error", "peer": None, "stage": stage, "message": message.replace("\n", " ")}
    if not isinstance(exc, AimcpipeError) or exc.__cause__ is not None:
        info["traceback"] = f"traceback of stage {stage}:\n" + "".join(
            traceback.format_exception(exc)
        )
    return info


def settle_garbage(full: bool = False) -> None:
    """Keep Python's cyclic garbage collector out of the timed schedule.

    A stage process holds a few hundred thousand long-lived objects (torch's modules, the
    stage); a full collection walks all of them, 0.3-0.4 s on a 2-core machine, and one that
    falls inside an epoch stalls every stage behind this one. So between jobs and epochs,
    outside any action, collect what is garbage and freeze the survivors
    (:func:`gc.freeze`): collections during an epoch then walk only what the epoch
    allocated. ``full`` (a new job) unfreezes first, so what the last job left is collected
    too; :meth:`StageHost.close` unfreezes for good."""
    if full:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


KEEP_FREED_BYTES = 256 << 20  # a stage process keeps up to this much freed heap ...
MMAP_FROM_BYTES = 32 << 20  # ... and takes blocks below this from the heap (glibc's maximum)
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the kernel
    (glibc's ``mallopt``: no heap trimming below :data:`KEEP_FREED_BYTES` free, and blocks
    under :data:`MMAP_FROM_BYTES` from the heap rather than from fresh mappings). A stage
    allocates and frees the same gradient, activation and message buffers in every
    mini-batch; handed back each time, they came back as page faults: 100 to 1,600 per
    mini-batch of the 2-stage MLP of benchmarks/vs_torch_pipelining.py on a 2-core VM, and
    none with these settings. The process keeps its peak heap instead. Left alone where the
    user has set glibc's own ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_MMAP_THRESHOLD_``, and
    off Linux. Returns whether it was applied."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    trim, mmap = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
    return bool(mallopt(trim, KEEP_FREED_BYTES)) and bool(mallopt(mmap, MMAP_FROM_BYTES))


class StageHost:
    """Hosts stage ``settings.stage``: builds its channels to the neighbours through
    ``store`` (binding to ``address``), then serves :data:`COMMANDS`."""

    def __init__(
        self,
        store: Store,
        settings: HostSettings,
        address: str,
        heartbeat: Store | None = None,
    ) -> None:
        self.settings = settings
        self.stage = settings.stage
        keep_freed_memory()
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(settings.threads)
        self.device = pick_device(settings.device, settings.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.channels = Channels(
            store,
            settings.stage,
            settings.num_stages,
            prefix=f"{settings.prefix}/ch",
            backend=settings.dist_backend,
            host=address,
            device=self.device,
            timeout_s=settings.timeout_s,
            unix_sockets=settings.unix_sockets,
        )
        log.debug("stage %d: channels over %s", self.stage, self.channels.wire)
        self.worker: StageWorker | None = None
        self._beat_stop = threading.Event()
        self._beat_store = heartbeat
        self._beat_lock = threading.Lock()
        self._beat_last: str | None = None
        if heartbeat is not None:
            threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True).start()

    # -- commands ----------------------------------------------------------------------------
    def handle(self, method: str, args: tuple[Any, ...]) -> tuple[str, Any]:
        """Run one command; ``("ok", value)`` or ``("error", info)``, never an exception."""
        if method not in COMMANDS:
            return ("error", error_info(ValueError(f"unknown command {method!r}"), self.stage))
        try:
            return ("ok", getattr(self, method)(*args))
        except Exception as exc:
            return ("error", error_info(exc, self.stage))

    def setup(self, spec: StageSpec) -> None:
        self.worker = None  # the last job's stage is garbage before the new one is built
        self.worker = StageWorker(spec, self.device)
        settle_garbage(full=True)

    def _worker(self) -> StageWorker:
        if self.worker is None:
            raise RuntimeError("no stage set up")
        return self.worker

    def put_data(self, key: str, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        self._worker().put_data(key, x, y)

    def drop_data(self, key: str) -> None:
        self._worker().drop_data(key)

    def run_epoch(self, plan: EpochPlan) -> StageReport:
        fault = self.settings.fault
        hook = fault.hook(self.stage, plan.epoch) if fault is not None else None

        def before(index: int) -> None:
            if index == 0:
                self._publish()  # the epoch has started: say so before the first action
            if hook is not None:
                hook(index)

        if plan.cycle_s:
            tighten_timers()  # in the thread that runs the epoch (the setting is per thread)
        try:
            return self._worker().run_epoch(plan, self.channels, before=before)
        finally:
            settle_garbage()

    def evaluate(self, plan: EvalPlan) -> EvalResult | None:
        return self._worker().evaluate(plan, self.channels)

    def state_dict(self) -> dict[str, Any]:
        return self._worker().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._worker().load_state_dict(state)

    def model_state(self) -> dict[str, Any]:
        return self._worker().model_state()

    def clock(self) -> float:
        return time.perf_counter()

    def progress(self) -> dict[str, Any]:
        if self.worker is None:
            return {"epoch": None, "done": 0, "total": 0, "at": None}
        return self.worker.progress()

    # -- heartbeat ---------------------------------------------------------------------------
    def _publish(self) -> None:
        """Publish the progress if it changed (from the heartbeat thread every
        :data:`BEAT_S`, and at the start of each epoch)."""
        if self._beat_store is None:
            return
        now = json.dumps(self.progress())
        with self._beat_lock:
            if now == self._beat_last:
                return
            try:
                self._beat_store.set(f"{self.settings.prefix}/hb/{self.stage}", now)
            except Exception:  # the scheduler is gone; this host will be stopped
                self._beat_stop.set()
            self._beat_last = now

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(BEAT_S):
            self._publish()

    def close(self) -> None:
        self._beat_stop.set()
        gc.unfreeze()
        self.channels.close()
        torch.set_num_threads(self._threads_before)
