"""The Ray backend: one actor per stage; the driver is the central scheduler.

The driver makes a handful of actor calls per epoch (one per stage to run it, a few more to
evaluate and checkpoint), never one per action: a plain actor call costs about a millisecond
or two. Activations and gradients go actor to actor over the same torch.distributed channels
as the torch backend (a two-rank gloo group per direction, rendezvous in a store the driver
hosts): measured on loopback they move a message in about a tenth of the time of an
actor-to-actor call (``benchmarks/transport_overhead.py``), and both backends then share one
data path.

Without ``ray.address`` a local Ray starts on 127.0.0.1 with no dashboard and no usage
reporting, sized so that every stage actor fits (logical CPUs may exceed the machine's);
with an address the backend joins that cluster. A Ray that is already running in this
process (``ray.init`` called by the user) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from aimcpipe.errors import ConfigError, StageFailure, describe_exception
from aimcpipe.runtime.backends.remote import Answer, Handle, RemoteBackend, store_progress
from aimcpipe.runtime.host import StageHost, error_info, process_info
from aimcpipe.runtime.options import RayOptions, RuntimeOptions
from aimcpipe.runtime.ray_address import (
    RayAddress,
    call_within,
    check_grpc,
    parse_ray_address,
    wait_for_port,
)
from aimcpipe.runtime.rendezvous import address_towards, connect_store, host_store

__all__ = ["RayBackend", "StageActor", "init_ray", "require_ray"]

log = logging.getLogger(__name__)

INSTALL = "the ray backend needs Ray: pip install 'aimcpipe[ray]' (or pip install ray)"

_LOCAL_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # a local Ray then binds to loopback only
}


def require_ray() -> None:
    """Raise the one-line install hint when Ray cannot be imported."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(f"pipeline.backend: {INSTALL}") from None


def _on_loopback(options: RayOptions) -> bool:
    return options.address is None or parse_ray_address(options.address).loopback


def _import_ray(options: RayOptions) -> Any:
    """Ray, set up to stay on 127.0.0.1 for a local Ray or a cluster joined at a loopback
    address (Ray would otherwise swap that address for this machine's external one)."""
    if options.address is None:
        for key, value in _LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError:
        raise ConfigError(f"pipeline.backend: {INSTALL}") from None
    if _on_loopback(options):
        # read when Ray picks its node address; set here too in case Ray was imported before
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    return ray


def init_ray(options: RayOptions | None = None, num_cpus: float | None = None) -> bool:
    """Start (or join) Ray as the backend would; returns whether this call started it.
    A Ray already initialised in this process is left as it is."""
    options = options or RayOptions()
    local = options.address is None
    ray = _import_ray(options)
    if ray.is_initialized():
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by the actors
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    if local:
        kwargs.update(address="local", _node_ip_address="127.0.0.1")
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
        return True
    join_cluster(ray, options, kwargs)
    return True


def _where(address: RayAddress) -> str:
    """The address, with what ``auto`` found (Ray's record of the last cluster started here)."""
    if not address.auto:
        return str(address)
    try:
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto")
    except Exception:  # nothing recorded, or a record Ray cannot read
        found = None
    return f"auto ({found})" if found else "auto (no cluster recorded on this machine)"


def join_cluster(ray: Any, options: RayOptions, kwargs: dict[str, Any]) -> None:
    """``ray.init`` at ``options.address``, within ``options.connect_timeout_s`` in all: first
    a TCP connection to the address (so an address where nothing listens fails at once with
    what was tried), then Ray's own handshake. A loopback address stays on loopback."""
    address = parse_ray_address(options.address)
    timeout_s = options.connect_timeout_s
    deadline = time.monotonic() + timeout_s
    if not address.auto:
        wait_for_port(address, timeout_s)
        check_grpc(address, max(0.5, deadline - time.monotonic()))
    kwargs["address"] = str(address)
    os.environ.setdefault("RAY_gcs_server_request_timeout_seconds", str(max(1, int(timeout_s))))
    try:
        with _init_off_main_thread():
            call_within(lambda: ray.init(**kwargs), max(0.0, deadline - time.monotonic()), "ray")
    except TimeoutError:
        raise ConfigError(
            f"ray.address: {_where(address)} answers, but Ray could not join the cluster "
            f"there within {timeout_s:g} s (ray.connect_timeout_s); is it running, with Ray "
            f"{ray.__version__} as on this machine?"
        ) from None
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"ray.address: cannot join {address}: {describe_exception(exc)}"
        ) from None


class _NoSigtermWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


@contextlib.contextmanager
def _init_off_main_thread() -> Iterator[None]:
    """``ray.init`` runs in a helper thread (so that it can be given up on); there it cannot
    install its SIGTERM handler (exit, so that Ray shuts down) and warns. Install the same
    handler here instead, if SIGTERM has none, and drop the warning."""
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    quiet = _NoSigtermWarning()
    logger = logging.getLogger("ray._private.worker")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class StageActor:
    """The actor of one stage: a :class:`StageHost` built in the actor's process."""

    def __init__(self, stage: int, store_host: str, store_port: int, timeout_s: float) -> None:
        self.stage = stage
        self.store_host = store_host
        self.store = connect_store(store_host, store_port, timeout_s)
        self.beat = connect_store(store_host, store_port, timeout_s)
        self.host: StageHost | None = None

    def info(self) -> dict[str, Any]:
        return process_info()

    def call(self, method: str, args: tuple[Any, ...]) -> Answer:
        if method == "init":
            try:
                self.host = StageHost(
                    self.store, args[0], address_towards(self.store_host), heartbeat=self.beat
                )
                return ("ok", None)
            except Exception as exc:
                return ("error", error_info(exc, self.stage))
        if self.host is None:
            return ("error", error_info(RuntimeError("not initialised"), self.stage))
        return self.host.handle(method, args)


class _RayCall:
    blocks = True

    def __init__(self, ray: Any, ref: Any, stage: int) -> None:
        self.ray = ray
        self.ref = ref
        self.stage = stage

    def wait(self, timeout_s: float) -> None:
        self.ray.wait([self.ref], timeout=timeout_s)

    def poll(self) -> tuple[bool, Answer | None]:
        ready, _ = self.ray.wait([self.ref], timeout=0)
        if not ready:
            return (False, None)
        try:
            return (True, self.ray.get(self.ref))
        except self.ray.exceptions.RayActorError as exc:
            cause = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            info = {"kind": "died", "peer": None, "stage": self.stage}
            return (True, ("error", {**info, "message": f"died (its Ray actor ended: {cause})"}))
        except self.ray.exceptions.RayError as exc:
            msg = f"stage {self.stage}: Ray failed: {type(exc).__name__}: {exc}"
            info = {"kind": "error", "peer": None, "stage": self.stage}
            return (True, ("error", {**info, "message": msg.splitlines()[0]}))


class ActorHandle(Handle):
    def __init__(self, ray: Any, actor: Any, stage: int, store: Any, prefix: str) -> None:
        self.ray = ray
        self.actor = actor
        self.stage = stage
        self.store = store
        self.prefix = prefix
        self.info: dict[str, Any] = {}

    def submit(self, method: str, *args: Any) -> _RayCall:
        return _RayCall(self.ray, self.actor.call.remote(method, args), self.stage)

    def progress(self) -> dict[str, Any] | None:
        return store_progress(self.store, f"{self.prefix}/hb/{self.stage}")

    def kill(self, deadline: float = 0.0) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(self.actor, no_restart=True)


class RayBackend(RemoteBackend):
    """One Ray actor per stage (see the module docstring)."""

    name = "ray"

    def __init__(self, options: RuntimeOptions | None = None, ray: RayOptions | None = None):
        super().__init__(options)
        self.ray_options = ray or RayOptions()
        self._started_ray = False
        self._server: Any = None

    def _launch(self, num_stages: int) -> None:
        options, ropts = self.options, self.ray_options
        ray = _import_ray(ropts)
        need = num_stages * ropts.num_cpus
        self._started_ray = init_ray(ropts, num_cpus=max(float(os.cpu_count() or 1), need))
        total = ray.cluster_resources()
        if total.get("CPU", 0.0) < need:
            raise ConfigError(
                f"ray.num_cpus: {num_stages} stage actors × {ropts.num_cpus:g} CPU need {need:g} "
                f"CPUs but the Ray cluster has {total.get('CPU', 0.0):g}; lower ray.num_cpus "
                "(fractions are allowed)"
            )
        if total.get("GPU", 0.0) < num_stages * ropts.num_gpus:
            raise ConfigError(
                f"ray.num_gpus: {num_stages} stage actors × {ropts.num_gpus:g} GPU need "
                f"{num_stages * ropts.num_gpus:g} GPUs but the Ray cluster has "
                f"{total.get('GPU', 0.0):g}"
            )
        # a local Ray stays on loopback, and so does a cluster joined at a loopback address
        node = "127.0.0.1" if _on_loopback(ropts) else ray.util.get_node_ip_address()
        self._server, port = host_store(node, options.timeout_s)
        prefix = f"aimcpipe/{uuid.uuid4().hex[:12]}"
        actor_class = ray.remote(StageActor)
        actors = [
            actor_class.options(num_cpus=ropts.num_cpus, num_gpus=ropts.num_gpus).remote(
                s, node, port, options.timeout_s
            )
            for s in range(num_stages)
        ]
        self.handles = [ActorHandle(ray, a, s, self._server, prefix) for s, a in enumerate(actors)]
        refs = [a.info.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=options.start_s)
        if len(ready) < len(refs):
            free = ray.available_resources()
            raise StageFailure(
                f"only {len(ready)} of the {num_stages} stage actors started within "
                f"{options.start_s:g} s; the cluster has {free.get('CPU', 0.0):g} CPUs and "
                f"{free.get('GPU', 0.0):g} GPUs free for actors of {ropts.num_cpus:g} CPU and "
                f"{ropts.num_gpus:g} GPU (see ray.num_cpus / ray.num_gpus)"
            )
        infos = ray.get(refs)
        for h, info in zip(self.handles, infos, strict=True):
            # a stage owns its GPU only with a whole one; Ray shows each actor its own devices
            h.info = {**info, "local_world_size": 1 if ropts.num_gpus >= 1 else 1 << 30}
        self._init_hosts(prefix, [h.info for h in self.handles])

    def _stop(self) -> None:
        self._server = None
        if self._started_ray:
            ray = _import_ray(self.ray_options)
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._started_ray = False
