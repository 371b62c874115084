"""Ray cluster addresses: read before anything starts, reached within a bounded time.

``ray.init`` given an address where nothing answers retries for minutes, printing a warning
every few seconds, and one it cannot parse ends in a traceback; it also turns a loopback
address into this machine's external one before trying it. So the backend reads the address
itself (:func:`parse_ray_address`, called when the config is validated), checks that
something accepts TCP connections there within ``ray.connect_timeout_s``
(:func:`wait_for_port`) and answers as a Ray head's GCS port does, in gRPC
(:func:`check_grpc`), and only then lets Ray join, on a clock of the same length.
No Ray import here: the config check runs without Ray installed.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from aimcpipe.errors import ConfigError

__all__ = ["RayAddress", "call_within", "check_grpc", "parse_ray_address", "wait_for_port"]

T = TypeVar("T")

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")  # fmt: skip
FORMS = "host:port (e.g. 10.0.0.5:6379, [::1]:6379) or auto (the cluster `ray start` began here)"


@dataclass(frozen=True)
class RayAddress:
    """A cluster's GCS address (``host``, ``port``), or ``auto`` (both ``None``)."""

    host: str | None = None
    port: int | None = None

    @property
    def auto(self) -> bool:
        return self.host is None

    @property
    def loopback(self) -> bool:
        """Whether the address names this machine's loopback interface."""
        if self.host is None:
            return False
        if self.host.lower() in ("localhost", "localhost."):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.host is None:
            return "auto"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_ray_address(text: object, key: str = "ray.address") -> RayAddress:
    """The address in ``text`` (``host:port``, ``[v6]:port`` or ``auto``), or a one-line
    :class:`ConfigError` naming ``key`` and the forms allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{key}: must be a cluster address, {FORMS}; got {text!r}")
    value = text.strip()
    if value == "auto":
        return RayAddress()
    if value.startswith("ray://"):
        raise ConfigError(
            f"{key}: {text!r} is a Ray Client address, which this backend cannot use (its "
            "stage actors talk to the driver directly); give the head's GCS address host:port "
            "(port 6379 unless `ray start --head --port` chose another)"
        )
    if "://" in value:
        raise ConfigError(f"{key}: {text!r} has a scheme; write {FORMS}")
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ConfigError(f"{key}: {text!r} has no port; write {FORMS}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{key}: {text!r}: [{host}] is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"{key}: {text!r}: write an IPv6 host in brackets, [{host}]:port")
    elif not _HOSTNAME.match(host):
        raise ConfigError(f"{key}: {text!r}: {host!r} is not a host name or IP address; "
                          f"write {FORMS}")  # fmt: skip
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: {text!r}: the port must be a number from 1 to 65535")
    return RayAddress(host, int(port_text))


def call_within(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """``fn()`` in a daemon thread; ``TimeoutError(what)`` if it has not returned within
    ``timeout_s`` (the thread is left behind: it cannot be stopped, and it does not keep
    the process alive)."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"aimcpipe-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(what)
    if error:
        raise error[0]
    return result[0]


def wait_for_port(address: RayAddress, timeout_s: float, key: str = "ray.address") -> None:
    """Return once ``address`` accepts a TCP connection; retry until ``timeout_s`` has passed,
    then raise a one-line :class:`ConfigError` naming the address and what was tried."""
    assert address.host is not None and address.port is not None
    deadline = time.monotonic() + timeout_s
    try:
        infos = call_within(
            lambda: socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM),
            timeout_s,
            "resolve",
        )
    except TimeoutError:
        raise ConfigError(
            f"{key}: could not look up the host {address.host!r} within {timeout_s:g} s "
            "(ray.connect_timeout_s)"
        ) from None
    except socket.gaierror as exc:
        raise ConfigError(
            f"{key}: cannot find the host {address.host!r} ({exc.strerror or exc})"
        ) from None
    tries, last = 0, "no answer"
    while True:
        for family, kind, proto, _, sockaddr in infos:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            tries += 1
            try:
                with socket.socket(family, kind, proto) as sock:
                    sock.settimeout(min(left, 5.0))
                    sock.connect(sockaddr)
                return
            except OSError as exc:
                last = exc.strerror or type(exc).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise ConfigError(
        f"{key}: nothing answers at {address} ({tries} TCP connection attempts in "
        f"{timeout_s:g} s, ray.connect_timeout_s; last: {last}); start the cluster there "
        f"with `ray start --head --port {address.port}` or correct the address"
    )


# An HTTP/2 client's first bytes: the connection preface and an empty SETTINGS frame. A gRPC
# server (a Ray head's GCS) answers with a SETTINGS frame of its own (frame type 4).
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS = 4


def check_grpc(address: RayAddress, timeout_s: float, key: str = "ray.address") -> None:
    """Raise a one-line :class:`ConfigError` unless ``address`` answers an HTTP/2 greeting
    within ``timeout_s``, as a gRPC server does (Ray's own client would instead retry for
    minutes against, say, a web server or a Redis on that port)."""
    assert address.host is not None and address.port is not None
    header = b""
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout_s) as sock:
            sock.sendall(_HTTP2_HELLO)
            deadline = time.monotonic() + timeout_s
            while len(header) < 9:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
    except OSError:
        pass  # a timeout, or the other side closed: it is not a gRPC server
    if len(header) < 9 or header[3] != _SETTINGS:
        raise ConfigError(
            f"{key}: {address} accepts connections but does not answer as a Ray cluster does "
            f"(no gRPC greeting within {timeout_s:g} s, ray.connect_timeout_s); give the "
            "head's GCS port (6379 unless `ray start --head --port` chose another)"
        )
