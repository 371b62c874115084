"""Where stage processes find each other: a torch ``TCPStore`` and a few helpers on it.

The central scheduler hosts the store (on 127.0.0.1 unless the user gives an address), or
joins torchrun's. Workers use it to build their point-to-point channels
(:mod:`aimcpipe.runtime.channels`), to receive commands and answer them (the torch backend's
control plane), and to publish their progress. Objects travel pickled and cut into chunks, as
the store refuses values over 8 MiB.

Nothing here listens beyond the address it is given: the store's server socket is bound by us
(to loopback by default) and handed to the store, which would otherwise listen on every
interface.
"""

from __future__ import annotations

import io
import pickle
import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from aimcpipe.errors import StageFailure

__all__ = [
    "CHUNK",
    "Store",
    "Unreadable",
    "address_towards",
    "connect_store",
    "host_store",
    "put_obj",
    "take_obj",
    "try_take_obj",
]

Store = dist.Store
CHUNK = 4 << 20  # bytes per store value (the store's own limit is 8 MiB)


def host_store(
    host: str = "127.0.0.1", timeout_s: float = 60.0, port: int = 0
) -> tuple[dist.TCPStore, int]:
    """A store server listening on ``host`` only, on ``port`` (0: a free one); returns it
    and its port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        host,
        port,
        None,
        True,
        timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=sock.detach(),
    )
    return store, port


def connect_store(host: str, port: int, timeout_s: float = 60.0) -> dist.TCPStore:
    """A client of the store at ``host:port``."""
    return dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s))


def address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (127.0.0.1 for loopback): what our
    own sockets bind to, so they listen where the user pointed and nowhere wider."""
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1" if host != "::1" else "::1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # no packet is sent: this only picks the route
        return str(s.getsockname()[0])


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return buf.getvalue()


class Unreadable(Exception):
    """An object in the store could not be rebuilt here (a class this process cannot import,
    a device it does not have)."""


def _loads(data: bytes) -> Any:
    # Our own processes wrote it (modules, specs, plans, reports), so it is not loaded with
    # weights_only. The store has no authentication: whoever can reach it can run code in
    # every stage process, which is why it listens on loopback unless told otherwise.
    try:
        return torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
    except Exception as exc:
        raise Unreadable(f"{type(exc).__name__}: {exc}") from exc


def put_obj(store: Store, key: str, obj: Any) -> None:
    """Store ``obj`` under ``key`` (pickled; cut into chunks; the count is written last, so
    a reader never sees half an object)."""
    data = _dumps(obj)
    parts = max(1, -(-len(data) // CHUNK))
    for i in range(parts):
        store.set(f"{key}#{i}", data[i * CHUNK : (i + 1) * CHUNK])
    store.set(key, str(parts))


def try_take_obj(store: Store, key: str) -> tuple[bool, Any]:
    """``(True, obj)`` and remove it if ``key`` is there, else ``(False, None)`` at once."""
    if not store.check([key]):
        return False, None
    return True, _take(store, key)


def take_obj(store: Store, key: str, timeout_s: float, what: str = "") -> Any:
    """Wait up to ``timeout_s`` for ``key``, then return and remove the object."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StageFailure(f"{what or key}: nothing arrived within {timeout_s:g} s")
        try:
            store.wait([key], timedelta(seconds=min(left, 1.0)))
            return _take(store, key)
        except dist.DistStoreError as exc:
            if "timeout" not in str(exc).lower():
                raise
        except RuntimeError as exc:  # older stores raise plain RuntimeErrors on timeout
            if "timeout" not in str(exc).lower():
                raise


def _take(store: Store, key: str) -> Any:
    parts = int(store.get(key))
    data = b"".join(store.get(f"{key}#{i}") for i in range(parts))
    for i in range(parts):
        store.delete_key(f"{key}#{i}")
    store.delete_key(key)
    return _loads(data)
