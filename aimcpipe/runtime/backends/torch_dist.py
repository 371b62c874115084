"""The torch backend: one process per stage, activations and gradients over torch.distributed.

World layout: world size = number of stages; rank s hosts stage s; rank 0 also hosts the
central scheduler (in its main thread; stage 0 runs beside it in a thread of its own) and
alone writes the run directory. Two ways to get the processes:

* **embedded** (``aimcpipe train CONFIG --backend torch``, or ``Pipeline(backend="torch")``):
  this process is rank 0; it starts a store on 127.0.0.1, spawns ranks 1..S−1 as
  ``python -m aimcpipe.runtime.backends.torch_dist`` and watches them (a rank that dies is
  reported by stage and how it ended; the ranks exit when this process does);
* **torchrun** (one node or several): ``aimcpipe train`` notices torchrun's environment;
  rank 0 runs the job, the other ranks call :func:`serve` and do what rank 0 says.

The control plane is the rendezvous store: rank 0 writes each command under
``cmd/<rank>/<n>`` and the rank answers under ``res/<rank>/<n>`` (see
:mod:`aimcpipe.runtime.rendezvous`). The data plane is :class:`~aimcpipe.runtime.channels.Channels`.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

import aimcpipe
from aimcpipe.errors import ConfigError, StageFailure
from aimcpipe.runtime.backends.remote import Answer, Handle, RemoteBackend, store_progress
from aimcpipe.runtime.host import StageHost, error_info, process_info
from aimcpipe.runtime.rendezvous import (
    Unreadable,
    address_towards,
    connect_store,
    host_store,
    put_obj,
    take_obj,
    try_take_obj,
)

__all__ = [
    "TorchBackend",
    "World",
    "release_world",
    "serve",
    "serve_from_env",
]

log = logging.getLogger(__name__)

SPAWNED = "AIMCPIPE_SPAWNED"  # set in the environment of ranks this module spawned
_launched: set[str] = set()  # store prefixes of torchrun worlds a backend has driven


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun (or spawned) world, read from the environment
    torchrun sets: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    master_addr: str
    master_port: int
    agent_store: bool  # torchrun's agent hosts the store; every rank is a client
    prefix: str

    @classmethod
    def from_env(cls) -> World | None:
        env = os.environ
        if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            return None
        try:
            rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
            port = int(env["MASTER_PORT"])
        except ValueError:
            raise ConfigError(
                "RANK/WORLD_SIZE/MASTER_PORT: torchrun's environment variables are not integers"
            ) from None
        run = env.get("TORCHELASTIC_RUN_ID", "run")
        restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        return cls(
            rank=rank,
            size=size,
            local_rank=int(env.get("LOCAL_RANK", rank)),
            local_size=int(env.get("LOCAL_WORLD_SIZE", size)),
            master_addr=env["MASTER_ADDR"],
            master_port=port,
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
            prefix=env.get("AIMCPIPE_PREFIX", f"aimcpipe/{run}/{restart}"),
        )

    def store(self, timeout_s: float) -> dist.Store:
        """The world's store: torchrun's agent store, or one rank 0 hosts at MASTER_ADDR."""
        if self.rank == 0 and not self.agent_store:
            store, _ = host_store(self.master_addr, timeout_s, port=self.master_port)
            return store
        return connect_store(self.master_addr, self.master_port, timeout_s)


# -- the scheduler's side ------------------------------------------------------------------


class _FutureCall:
    blocks = True

    def __init__(self, future: concurrent.futures.Future[Answer]) -> None:
        self.future = future

    def poll(self) -> tuple[bool, Answer | None]:
        return (True, self.future.result()) if self.future.done() else (False, None)

    def wait(self, timeout_s: float) -> None:
        concurrent.futures.wait([self.future], timeout=timeout_s)


class _DaemonThread:
    """Runs submitted calls one at a time in one daemon thread: a stage that hangs there
    never keeps the process from exiting (a ThreadPoolExecutor's thread would)."""

    def __init__(self, name: str) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Any, *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:
                    future.set_exception(exc)

    def stop(self, wait_s: float = 0.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout=wait_s)


class InlineHandle(Handle):
    """Stage 0 beside the scheduler on rank 0, run in a thread of its own so the scheduler's
    thread stays free to watch every stage."""

    def __init__(self, store: dist.Store, address: str) -> None:
        self.stage = 0
        self.info = process_info()
        self.store = store
        self.address = address
        self.host: StageHost | None = None
        self._pool = _DaemonThread("stage 0")

    def _run(self, method: str, args: tuple[Any, ...]) -> Answer:
        if method == "init":
            try:
                self.host = StageHost(self.store, args[0], self.address)
                return ("ok", None)
            except Exception as exc:
                return ("error", error_info(exc, 0))
        assert self.host is not None
        return self.host.handle(method, args)

    def submit(self, method: str, *args: Any) -> _FutureCall:
        return _FutureCall(self._pool.submit(self._run, method, args))

    def progress(self) -> dict[str, Any] | None:
        return self.host.progress() if self.host is not None else None

    def kill(self, deadline: float = 0.0) -> None:
        # close the host in its own thread once that is free (unless it hangs: then leave it)
        if self.host is not None:
            self._pool.submit(self.host.close)
        self._pool.stop(wait_s=max(0.5, deadline - time.monotonic()))
        self.host = None


class _StoreCall:
    # the store's own wait would do, but each one that times out logs two lines of torch's
    # on stderr: the scheduler polls these instead
    blocks = False

    def __init__(self, store: dist.Store, key: str) -> None:
        self.store = store
        self.key = key

    def poll(self) -> tuple[bool, Answer | None]:
        return try_take_obj(self.store, self.key)

    def wait(self, timeout_s: float) -> None:
        return


class RankHandle(Handle):
    """A stage in another process, driven through the store; ``process`` when we spawned it."""

    def __init__(
        self,
        store: dist.Store,
        prefix: str,
        stage: int,
        info: dict[str, Any],
        process: subprocess.Popen[bytes] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.stage = stage
        self.info = info
        self.process = process
        self.log_path = log_path
        self._seq = 0
        self._stopped = False

    def submit(self, method: str, *args: Any) -> _StoreCall:
        seq = self._seq
        self._seq += 1
        put_obj(self.store, f"{self.prefix}/cmd/{self.stage}/{seq}", (method, args))
        return _StoreCall(self.store, f"{self.prefix}/res/{self.stage}/{seq}")

    def progress(self) -> dict[str, Any] | None:
        return store_progress(self.store, f"{self.prefix}/hb/{self.stage}")

    def death(self) -> str | None:
        if self.process is None or self.process.poll() is None:
            return None
        return _describe_exit(self.process.returncode, self.log_path)

    def request_stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        # a torchrun rank leaves (torchrun does the rest); a spawned one too, or is killed
        if self.process is None or self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.submit("stop")

    def kill(self, deadline: float = 0.0) -> None:
        self.request_stop()
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10.0)


def _describe_exit(code: int, log_path: Path | None) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        text = f"was killed by {name}"
    else:
        text = f"exited with status {code}"
    if log_path is not None and log_path.is_file():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            text += f" ({lines[-1].strip()[:300]})"
    return text


class TorchBackend(RemoteBackend):
    """One process per stage over torch.distributed (see the module docstring)."""

    name = "torch"

    def _launch(self, num_stages: int) -> None:
        options = self.options
        world = World.from_env()
        self._logs: Path | None = None
        self._server: dist.Store | None = None
        processes: list[subprocess.Popen[bytes] | None] = [None] * num_stages
        if world is not None and not os.environ.get(SPAWNED):
            if world.rank != 0:
                raise ConfigError("the torch backend's scheduler runs on rank 0 only")
            if world.size != num_stages:
                raise ConfigError(
                    f"pipeline.stages: torchrun started {world.size} processes "
                    f"(WORLD_SIZE={world.size}) but the model is cut into {num_stages} "
                    f"stage(s); start torchrun with --nproc-per-node/--nnodes making "
                    f"{num_stages} processes in all, or set pipeline.stages: {world.size}"
                )
            store = world.store(options.timeout_s)
            prefix, master, port = world.prefix, world.master_addr, world.master_port
            _launched.add(prefix)
            local = (world.local_rank, world.local_size)
        else:
            store, port = host_store("127.0.0.1", options.timeout_s)
            self._server = store
            prefix, master = f"aimcpipe/{uuid.uuid4().hex[:12]}", "127.0.0.1"
            local = (0, num_stages)
            self._logs = Path(tempfile.mkdtemp(prefix="aimcpipe-ranks-"))
            for s in range(1, num_stages):
                processes[s] = _spawn(s, num_stages, port, prefix, self._logs)
            atexit.register(self.close)
        self._store, self._prefix = store, prefix
        try:
            infos = [process_info(*local)] + [
                self._info(s, processes[s]) for s in range(1, num_stages)
            ]
            address = address_towards(master)
            self.handles = [InlineHandle(connect_store(master, port, options.timeout_s), address)]
            self.handles += [
                RankHandle(
                    store,
                    prefix,
                    s,
                    infos[s],
                    processes[s],
                    self._logs / f"rank{s}.log" if self._logs else None,
                )
                for s in range(1, num_stages)
            ]
        except BaseException:
            for p in processes:
                if p is not None:
                    p.kill()
            self._stop()
            raise
        self._init_hosts(prefix, infos)

    def _info(self, s: int, process: subprocess.Popen[bytes] | None) -> dict[str, Any]:
        """Rank ``s``'s process info, as soon as it has connected."""
        key = f"{self._prefix}/info/{s}"
        deadline = time.monotonic() + self.options.start_s
        while time.monotonic() < deadline:
            found, info = try_take_obj(self._store, key)
            if found:
                return dict(info)
            if process is not None and process.poll() is not None:
                raise StageFailure(
                    f"stage {s} could not start: it "
                    + _describe_exit(
                        process.returncode, self._logs / f"rank{s}.log" if self._logs else None
                    )
                )
            time.sleep(0.01)
        raise StageFailure(f"stage {s} (rank {s}) did not join within {self.options.start_s:g} s")

    def _stop(self) -> None:
        self._server = self._store = None  # our store server closes with its last reference
        if getattr(self, "_logs", None) is not None:
            shutil.rmtree(self._logs, ignore_errors=True)
            self._logs = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)


def child_python(*args: str) -> list[str]:
    """The command line of a stage process: this interpreter with ``-P``, so that the working
    directory does not go first on its path (see :func:`child_pythonpath`)."""
    return [sys.executable, "-P", *args]


def child_pythonpath() -> str:
    """The PYTHONPATH of a stage process: first the folder this process imported aimcpipe
    from, so both run the same code (not another checkout's in the working directory), then
    this process's own path, then the working directory (where a user's model module may
    live)."""
    root = str(Path(aimcpipe.__file__).resolve().parent.parent)
    paths = [p for p in [root, *sys.path, os.getcwd()] if p and os.path.isdir(p)]
    return os.pathsep.join(dict.fromkeys(paths))


def _spawn(rank: int, world: int, port: int, prefix: str, logs: Path) -> subprocess.Popen[bytes]:
    """Start rank ``rank`` as ``python -m aimcpipe.runtime.backends.torch_dist``."""
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        AIMCPIPE_PREFIX=prefix,
        PYTHONPATH=child_pythonpath(),
        TORCH_CPP_LOG_LEVEL=os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    )
    env[SPAWNED] = str(os.getpid())
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    with (logs / f"rank{rank}.log").open("wb") as log_file:
        return subprocess.Popen(
            child_python("-m", "aimcpipe.runtime.backends.torch_dist"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def release_world(world: World) -> None:
    """Let torchrun's other ranks go when rank 0 ends without having driven them (a dry run,
    an error before training, a finished run resumed): they wait for a first command."""
    if world.rank != 0 or world.size < 2 or world.prefix in _launched:
        return
    with contextlib.suppress(Exception):
        store = world.store(10.0)
        for rank in range(1, world.size):
            put_obj(store, f"{world.prefix}/cmd/{rank}/0", ("stop", ()))


# -- the other ranks' side -------------------------------------------------------------------


def _watch_parent(parent: int) -> None:
    """A spawned rank ends when the process that spawned it is gone (even after SIGKILL)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def serve(world: World) -> int:
    """Serve rank ``world.rank``: announce this process, then run rank 0's commands until
    it says stop or goes away. Returns the exit status."""
    timeout = 60.0
    store = world.store(timeout)
    beat = connect_store(world.master_addr, world.master_port, timeout)
    prefix, rank = world.prefix, world.rank
    put_obj(store, f"{prefix}/info/{rank}", process_info(world.local_rank, world.local_size))
    host: StageHost | None = None
    seq = 0
    try:
        while True:
            key = f"{prefix}/cmd/{rank}/{seq}"
            try:
                # idle ranks wait for rank 0 as long as it is there: the store connection
                # breaks when it ends, and a spawned rank also watches its parent
                method, args = take_obj(store, key, float("inf"))
            except Unreadable as exc:  # could not rebuild what was sent (e.g. __main__ classes)
                answer: Answer = ("error", error_info(_unpickling_error(exc, rank), rank))
                method, args = "", ()
            except (StageFailure, dist.DistError, RuntimeError, ConnectionError, OSError):
                return 1  # the scheduler is gone
            else:
                if method == "stop":
                    put_obj(store, f"{prefix}/res/{rank}/{seq}", ("ok", None))
                    return 0
                if method == "init":
                    try:
                        settings = replace(args[0], local_rank=world.local_rank)
                        host = StageHost(
                            store, settings, address_towards(world.master_addr), heartbeat=beat
                        )
                        answer = ("ok", None)
                    except Exception as exc:
                        answer = ("error", error_info(exc, rank))
                elif host is None:
                    answer = ("error", error_info(RuntimeError("not initialised"), rank))
                else:
                    answer = host.handle(method, args)
            put_obj(store, f"{prefix}/res/{rank}/{seq}", answer)
            seq += 1
    except KeyboardInterrupt:
        return 130
    finally:
        if host is not None:
            host.close()


def _unpickling_error(exc: Exception, rank: int) -> Exception:
    text = f"{type(exc).__name__}: {exc}"
    # a stage process runs this module as __main__, so what the user's script defined in its
    # own __main__ is looked up here
    if "__main__" in text or "module 'aimcpipe.runtime.backends.torch_dist'" in text:
        text += (
            "; classes and functions defined in the script being run (__main__) cannot be "
            "rebuilt in stage processes: move the model, loss or partitioner into a module "
            "they can import"
        )
    return RuntimeError(f"stage {rank} cannot rebuild what the scheduler sent: {text}")


def serve_from_env() -> int:
    """Entry of a non-zero rank (spawned, or under torchrun)."""
    world = World.from_env()
    if world is None:
        print("aimcpipe: no torch.distributed world in the environment", file=sys.stderr)
        return 2
    parent = os.environ.get(SPAWNED)
    if parent:
        _watch_parent(int(parent))
    return serve(world)


if __name__ == "__main__":
    sys.exit(serve_from_env())
