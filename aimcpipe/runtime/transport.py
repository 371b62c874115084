"""Transports: how stages (and the central scheduler) exchange tensors.

Every message is addressed by ``(kind, micro-batch, src, dst)``; the interpreter derives which
message an action needs from the schedule (``aimcpipe.scheduler.received_message``), so the
transports know nothing of policies. Kinds:

* ``activation`` (F output, stage s → s+1) and ``gradient`` (B output, s → s−1);
* ``eval`` (an evaluation chunk's output, stage s → s+1);
* ``input`` and ``target`` (a micro-batch's data for stage 0 and the last stage; read from
  the stage's own feed, or served by a transport's ``feed`` in hand-built set-ups).

Data has the source address :data:`DRIVER` (−1). The multi-process transport is
:class:`aimcpipe.runtime.channels.Channels`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from aimcpipe.errors import StageFailure

__all__ = ["DRIVER", "Key", "LocalTransport", "Transport"]

DRIVER = -1

Key = tuple[str, int, int, int]  # (kind, micro-batch, src, dst)


class Transport(Protocol):
    """What the interpreter needs from a transport."""

    def send(self, key: Key, payload: Any, due: float | None = None) -> None:
        """Send ``payload``; with ``due`` (a ``time.perf_counter`` time, only where
        :meth:`can_hold` says so) the receiver must not use it before then."""
        ...

    def can_hold(self, dst: int) -> bool:
        """Whether messages to ``dst`` can be sent early and held at ``dst`` until their due
        time (emulated device time: the transfer then overlaps the sender's wait)."""
        ...

    def ready(self, key: Key) -> bool:
        """Whether ``recv(key)`` would return without waiting."""
        ...

    def recv(self, key: Key, timeout: float) -> Any:
        """The payload of ``key``; raises :class:`StageFailure` after ``timeout`` seconds."""
        ...

    def begin(self, expect: Mapping[int, int], latency_s: float = 0.0) -> None:
        """A phase (an epoch, an evaluation pass) starts in which ``expect[src]`` messages
        come from each stage ``src``; messages spend ``latency_s`` in flight."""
        ...

    def end(self) -> None:
        """The phase is over: everything sent was delivered, everything expected taken."""
        ...


def _copy(key: Key, payload: Any) -> Any:
    """What crosses a process boundary is a copy; the in-process transport copies too, so a
    stage that modifies its input in place cannot corrupt its neighbour's autograd graph. A
    gradient is handed over as it is: the stage that computed it keeps no reference to it
    (its activation stash entry is gone)."""
    if isinstance(payload, torch.Tensor) and key[0] != "gradient":
        return payload.detach().clone()
    return payload


class LocalTransport:
    """All stages in one process: a mailbox. Messages from the central scheduler are produced
    on demand by ``feed(key)`` so an epoch's data is never materialised twice."""

    def __init__(self, feed: Callable[[Key], Any] | None = None) -> None:
        self._box: dict[Key, Any] = {}
        self._feed = feed
        self.bytes_sent: dict[int, int] = {}

    def send(self, key: Key, payload: Any, due: float | None = None) -> None:
        if key in self._box:
            raise StageFailure(f"stage {key[2]}: message {key} sent twice")
        payload = _copy(key, payload)
        if isinstance(payload, torch.Tensor) and key[2] != DRIVER:
            nbytes = payload.numel() * payload.element_size()
            self.bytes_sent[key[2]] = self.bytes_sent.get(key[2], 0) + nbytes
        self._box[key] = payload

    def can_hold(self, dst: int) -> bool:
        return False  # the stages take turns: there is no timing to keep

    def ready(self, key: Key) -> bool:
        return key in self._box or (key[2] == DRIVER and self._feed is not None)

    def recv(self, key: Key, timeout: float = 0.0) -> Any:
        if key in self._box:
            return self._box.pop(key)
        if key[2] == DRIVER and self._feed is not None:
            return self._feed(key)
        # In one process nothing can arrive while we wait: a missing message is a bug in
        # the schedule or the runner, never something to wait for.
        raise StageFailure(
            f"stage {key[3]}: message {key[0]} of micro-batch {key[1]} from "
            f"stage {key[2]} never arrived"
        )

    def begin(self, expect: Mapping[int, int], latency_s: float = 0.0) -> None:
        """In one process messages arrive as they are sent: nothing to prepare, and no
        latency to emulate (the stages take turns, so there is no timing to show)."""

    def end(self) -> None:
        if self._box:
            raise StageFailure(f"{len(self._box)} message(s) were sent but never received")
