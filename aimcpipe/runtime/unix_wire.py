"""The unix-socket wire of :class:`~aimcpipe.runtime.channels.Channels`.

The channels' messages over the :class:`~aimcpipe.runtime.unix_links.UnixLink` of each
neighbour (one machine): a message is its header and payload posted on the link; while the
stage waits, :func:`~aimcpipe.runtime.unix_links.pump` moves bytes on every link, and the
messages read whole are filed in the channels' mailbox. A wait that sees no progress for
the timeout blames the peer it waits on. Failures are recorded through the channels'
:class:`ChannelErrors`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from aimcpipe.runtime.message_format import KINDS, make_header
from aimcpipe.runtime.transport import Key
from aimcpipe.runtime.unix_links import UnixLink, header_array, pump

if TYPE_CHECKING:
    from aimcpipe.runtime.channels import ChannelErrors

__all__ = ["UnixWire"]

# A stage waiting on a unix link first polls it without sleeping for this long, when every
# stage has a core of its own: waking a sleeping receiver cost ~75 µs of a ~100 µs message
# on a 2-core VM (spinning: ~27 µs); beyond this it sleeps in poll()
SPIN_S = 0.0005


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class UnixWire:
    """Stage ``stage``'s ``links`` to its neighbours (by peer), filing what arrives in
    ``box`` (``key -> (payload, due)``) and recording failures in ``errors``."""

    def __init__(
        self,
        links: dict[int, UnixLink],
        stage: int,
        num_stages: int,
        *,
        timeout_s: float,
        box: dict[Key, tuple[Any, float]],
        errors: ChannelErrors,
    ) -> None:
        self.stage = stage
        self._links = links
        self._timeout_s = timeout_s
        self._box = box
        self._errors = errors
        self._spin_s = SPIN_S if links and _cores() >= num_stages else 0.0

    def reaches(self, dst: int) -> bool:
        return dst in self._links

    def expect(self, src: int, count: int) -> None:
        """The phase expects ``count`` (> 0) messages from ``src``."""
        self._links[src].remaining = count

    def post(
        self, dst: int, kind: str, n: int, tensor: torch.Tensor | None, due: float = 0.0
    ) -> None:
        """Post one message (header, then payload) on ``dst``'s link. ``due``: the
        ``time.perf_counter`` time before which the receiver must not use it (0: none)."""
        header = make_header(kind, n, tensor, separate=False, due_ns=round(due * 1e9))
        try:
            self._links[dst].post(header_array(header), tensor)
        except OSError as exc:
            raise self._errors.failed(exc, dst, "take a message", 0.0) from None

    def push(self, dst: int) -> None:
        """See what was posted to ``dst`` out (a latency thread: the stage may be busy)."""
        self._links[dst].drain(time.monotonic() + self._timeout_s)

    def receive(self, key: Key, deadline: float, timeout: float) -> None:
        """Move bytes on the links, filing whole messages in the mailbox, until ``key`` is
        there."""
        kind, n, src, _ = key
        link = self._links.get(src)
        what = f"send its {kind} of micro-batch {n}"
        while key not in self._box:
            self._errors.check()
            if link is None or not (link.arrived or link.remaining):
                raise self._errors.not_coming(key)
            if not link.arrived:
                self._pump(lambda: bool(link.arrived), deadline, what, src, timeout)
            self._unpack_arrived()

    def finish(self) -> None:
        """A phase's end: every link's outbox sent (no progress for the timeout: failure)."""
        self._pump(lambda: not any(link.sending for link in self._links.values()),
                   None, "take a message")  # fmt: skip

    def late(self) -> dict[int, int]:
        """Messages the phase still expects, by source."""
        return {p: link.remaining for p, link in self._links.items() if link.remaining}

    def close(self, idle: bool) -> None:
        """Close the sockets (``idle``: whether no other thread may still use them, which
        does not matter here)."""
        for link in self._links.values():
            link.close()

    def _unpack_arrived(self) -> None:
        """Move the messages read whole on every link into the mailbox."""
        for src, link in self._links.items():
            while link.arrived:
                h, payload = link.arrived.popleft()
                self._box[(KINDS[h[0]], h[1], src, self.stage)] = (payload, h[5] / 1e9)

    def _pump(
        self,
        until: Callable[[], bool],
        deadline: float | None,
        what: str,
        blame: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Move bytes on the unix links until ``until()``; ``deadline`` None: up to the
        timeout after the last progress. A timeout blames ``blame`` (None: a link still
        sending, whose peer takes nothing)."""
        links = self._links.values()
        while True:
            limit = deadline if deadline is not None else time.monotonic() + self._timeout_s
            before = sum(link.progress for link in links)
            try:
                if pump(links, until, limit, self._spin_s):
                    return
            except ConnectionError as exc:
                raise self._errors.failed(exc, exc.peer, what, 0.0) from None  # type: ignore[attr-defined]
            if deadline is None and sum(link.progress for link in links) != before:
                continue  # still moving: not stuck
            peer = blame
            if peer is None:
                peer = next(p for p, link in self._links.items() if link.sending)
            waited = self._timeout_s if timeout is None else timeout
            raise self._errors.failed(TimeoutError("timed out"), peer, what, waited)
