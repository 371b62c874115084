"""Point-to-point channels between neighbouring stages: unix sockets or torch.distributed.

Two wires carry the same messages. When every stage runs on one machine and the channels would
use gloo (``runtime.unix_sockets``, on by default), each pair of neighbours talks over a
unix-domain stream socket (:mod:`aimcpipe.runtime.unix_links`): the kernel copies the bytes
and nothing else is woken. Otherwise (stages on several machines, nccl, or the option off)
the process groups below carry them; every stage decides alike. What follows describes the
process groups; the rules that keep neighbours from blocking each other hold for both.

Each direction between two neighbours is a process group of its own (two ranks: the sender
and the receiver), so every group carries one ordered stream of messages and nothing can
cross: stage s sends activations to s+1 on one group and receives gradients from s+1 on
another. Every message is a fixed-size header (kind, micro-batch, dtype, shape, flags) and
the tensor, so stages need no shape configuration. Header and tensor travel as *one* gloo
message into a receive buffer posted ahead of time (gloo accepts a message smaller than the
buffer), so a message costs one transfer, not a header, a hand-shake and a second transfer
(measured: about half the latency between stages on a busy machine). A payload that does
not fit the buffer goes as a header and a message of its own, and both ends then grow the
buffer by the same rule (up to 1 MiB; larger payloads always go on their own, unpacked).

Nothing waits on a neighbour while it could be sending to us. In 1F1B both neighbours send
at once and a gloo send completes only when its receive is posted, so:

* **sends are asynchronous**: :meth:`Channels.send` posts the header and the tensor and
  returns; gloo moves them in its own threads, and the sends are waited for only at the end
  of the phase (an epoch, an evaluation pass);
* **receives are posted ahead**: for each incoming channel the header receive of the next
  message the schedule says will come is always posted, so a neighbour's send never waits
  for us to be ready. :meth:`Channels.recv` takes messages in the order they come and keeps
  the ones not needed yet in a mailbox.

No Python thread carries messages (a hand-over between threads cost about as much as the
message itself on a busy 2-core machine): the stage's own thread posts and waits. Only
emulated latency (``cost.latency`` × ``device_time.cycle_s``) uses a sender thread per
outgoing channel, which holds each message for its time in flight.

gloo's batched ``isend/irecv`` (``batch_isend_irecv``), which is known to hang, is not used.
Every wait has a timeout; a neighbour that dies closes its sockets and the waiting side
fails at once, naming it.

With ``nccl`` (every stage on a GPU of its own) payloads stay on the GPU; with ``gloo`` a GPU
stage's tensors are staged through the CPU.

Where things are: the header in :mod:`~aimcpipe.runtime.message_format`; the two wires in
:mod:`~aimcpipe.runtime.unix_wire` and :mod:`~aimcpipe.runtime.group_wire`; here the
protocol and the mailbox (:class:`Channels`), the failures (:class:`ChannelErrors`) and the
threads of emulated latency.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from aimcpipe.errors import StageFailure
from aimcpipe.runtime.clock import boot_id, sleep_until, tighten_timers
from aimcpipe.runtime.group_wire import GroupWire
from aimcpipe.runtime.message_format import HEADER_BYTES, decode
from aimcpipe.runtime.transport import Key
from aimcpipe.runtime.unix_links import connect_links
from aimcpipe.runtime.unix_wire import UnixWire

__all__ = ["Channels", "PeerLost", "PeerTimeout"]

log = logging.getLogger(__name__)


class PeerLost(StageFailure):
    """A neighbour's connection broke (its process died or closed its channels)."""

    def __init__(self, message: str, peer: int) -> None:
        super().__init__(message)
        self.peer = peer


class PeerTimeout(StageFailure):
    """A neighbour sent nothing (or took nothing) within the timeout."""

    def __init__(self, message: str, peer: int) -> None:
        super().__init__(message)
        self.peer = peer


def _is_broken(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        word in text for word in ("closed", "reset by peer", "broken pipe", "connection", "eof")
    )


def _is_timeout(exc: BaseException) -> bool:
    return "timed out" in str(exc).lower() or "timeout" in str(exc).lower()


class ChannelErrors:
    """The failures of stage ``stage``'s channels: the first one is recorded (a latency
    thread may fail too) and raised by every later call; a wire's error becomes a
    :class:`PeerTimeout` or :class:`PeerLost` naming the neighbour where it says so."""

    def __init__(self, stage: int) -> None:
        self.stage = stage
        self.error: BaseException | None = None
        self._lock = threading.Lock()  # guards error

    def failed(self, exc: BaseException, peer: int, what: str, waited: float) -> StageFailure:
        """Record the channel's first failure (so every later call raises it) and return it."""
        error = self._wrap(exc, peer, what, waited)
        with self._lock:
            if self.error is None:
                self.error = error
        return error

    def check(self) -> None:
        """Raise the recorded failure, if any."""
        if self.error is not None:
            raise self.error

    def not_coming(self, key: Key) -> StageFailure:
        """``key`` is needed, but its source sends nothing more in this phase."""
        kind, n, src, _ = key
        return StageFailure(
            f"stage {self.stage}: needs {kind} of micro-batch {n} from stage {src}, "
            "which sends it nothing more in this phase"
        )

    def _wrap(self, exc: BaseException, peer: int, what: str, waited: float) -> StageFailure:
        if isinstance(exc, StageFailure):
            return exc
        if _is_timeout(exc):
            return PeerTimeout(
                f"stage {self.stage}: stage {peer} did not {what} within {max(waited, 0):.3g} s",
                peer,
            )
        if _is_broken(exc):
            return PeerLost(f"stage {self.stage}: lost stage {peer} while it had to {what}", peer)
        return StageFailure(f"stage {self.stage}: channel to stage {peer} failed: {exc}")


class _InFlight:
    """Emulated latency: one thread per outgoing channel holds each message for its time in
    flight, then posts it on the wire."""

    def __init__(self, stage: int, wire: UnixWire | GroupWire, errors: ChannelErrors) -> None:
        self._stage = stage
        self._wire = wire
        self._errors = errors
        self._queues: dict[int, queue.Queue[Any]] = {}
        self._threads: list[threading.Thread] = []

    def put(
        self, dst: int, kind: str, n: int, tensor: torch.Tensor | None, latency_s: float
    ) -> None:
        """Post the message to ``dst`` once ``latency_s`` has passed (from now)."""
        if dst not in self._queues:
            self._queues[dst] = self._thread(dst)
        self._queues[dst].put((kind, n, tensor, time.monotonic() + latency_s))

    def join(self) -> None:
        """Wait until every message handed over has been posted (or dropped on a failure)."""
        for q in self._queues.values():
            q.join()

    def stop(self) -> bool:
        """Stop the threads (messages not yet sent are dropped); whether they all stopped."""
        for q in self._queues.values():
            q.put(None)
        for thread in self._threads:
            thread.join(timeout=2.0)
        return not any(t.is_alive() for t in self._threads)

    def _thread(self, dst: int) -> queue.Queue[Any]:
        q: queue.Queue[Any] = queue.Queue()
        name = f"in flight {self._stage}>{dst}"
        thread = threading.Thread(target=self._send_later, args=(dst, q), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return q

    def _send_later(self, dst: int, q: queue.Queue[Any]) -> None:
        tighten_timers()  # this thread only waits out latencies: wake it when they end
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                kind, n, tensor, due = item
                sleep_until(due, time.monotonic)
                if self._errors.error is None:
                    self._wire.post(dst, kind, n, tensor)
                    self._wire.push(dst)  # the stage may be busy: see it out ourselves
            except StageFailure:
                pass  # recorded by the wire's post
            finally:
                q.task_done()


class Channels:
    """The transport of stage ``stage`` of ``num_stages`` in a multi-process backend.

    ``store`` is shared by all stages (``prefix`` namespaces it); ``host`` is the address
    this process's sockets bind to; ``device`` is where received tensors go.

    Sends are posted and the stage moves on; each later send lets go of the buffers of those
    the neighbour has taken, and a phase's end waits for the rest (failing the channel if
    the neighbour takes nothing for ``timeout_s``). For each incoming channel the receive
    of the next expected message is always posted; the stage's own thread takes messages in
    the order they come and keeps those it does not need yet in a mailbox, so it only ever
    waits for what its next action needs. With emulated latency, one more thread per outgoing
    channel holds each message for its time in flight before posting it.
    """

    def __init__(
        self,
        store: dist.Store,
        stage: int,
        num_stages: int,
        *,
        prefix: str = "ch",
        backend: str = "gloo",
        host: str = "127.0.0.1",
        device: torch.device | str = "cpu",
        timeout_s: float = 60.0,
        unix_sockets: bool = True,
    ) -> None:
        self.stage = stage
        self.num_stages = num_stages
        self.device = torch.device(device)
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self.bytes_sent: dict[int, int] = {stage: 0}
        self.latency_s = 0.0
        # which stages read our clock (same machine): messages to them may be sent early
        # and held there until due (emulated device time)
        mine = boot_id()
        store.set(f"{prefix}/boot/{stage}", mine)
        boots = [store.get(f"{prefix}/boot/{s}").decode() for s in range(num_stages)]
        self._same_clock = {
            peer: bool(mine) and boots[peer] == mine
            for peer in (stage - 1, stage + 1)
            if 0 <= peer < num_stages
        }
        self._box: dict[Key, tuple[Any, float]] = {}  # arrived, not yet taken: (payload, due)
        self._errors = ChannelErrors(stage)
        links = None
        if unix_sockets and backend == "gloo" and bool(mine) and set(boots) == {mine}:
            links = connect_links(
                store, f"{prefix}/unix", stage, num_stages, timeout_s, HEADER_BYTES, decode
            )
        self._wire: UnixWire | GroupWire
        if links:
            self._wire = UnixWire(
                links, stage, num_stages, timeout_s=timeout_s, box=self._box, errors=self._errors
            )
        else:
            self._wire = GroupWire(
                store, prefix, stage, num_stages, backend=backend, host=host,
                device=self.device, timeout=self.timeout, box=self._box, errors=self._errors,
            )  # fmt: skip
        #: how messages travel: "unix" (sockets between processes of one machine), or the
        #: torch.distributed backend
        self.wire = "unix" if links else backend
        self._in_flight = _InFlight(stage, self._wire, self._errors)

    # -- the transport protocol ----------------------------------------------------------------
    def begin(self, expect: Mapping[int, int], latency_s: float = 0.0) -> None:
        """Start a phase: receive ``expect[src]`` messages from each neighbour ``src``."""
        self._errors.check()
        self.latency_s = latency_s
        for src, count in expect.items():
            if count > 0:
                self._wire.expect(src, count)

    def end(self) -> None:
        """End a phase: every expected message received, every send taken by its peer
        (each waited for at most ``timeout_s`` after the one before it)."""
        self._in_flight.join()
        self._wire.finish()
        self._errors.check()
        late = self._wire.late()
        if late:
            raise StageFailure(
                f"stage {self.stage}: messages still expected at a phase end: {late}"
            )
        if self._box:
            raise StageFailure(
                f"stage {self.stage}: {len(self._box)} message(s) arrived but were never used"
            )

    def can_hold(self, dst: int) -> bool:
        return self._same_clock.get(dst, False) and not self.latency_s

    def send(self, key: Key, payload: Any, due: float | None = None) -> None:
        kind, n, src, dst = key
        self._errors.check()
        if not self._wire.reaches(dst):
            raise StageFailure(f"stage {src}: no channel to stage {dst}")
        tensor = None
        if payload is not None:  # (each call on a tensor here is paid with cold caches)
            tensor = payload.detach() if payload.requires_grad else payload
            if not tensor.is_cpu and self.backend == "gloo":
                tensor = tensor.cpu()
            if not tensor.is_contiguous():
                tensor = tensor.contiguous()
            self.bytes_sent[src] += tensor.nbytes
        if due is not None:
            self._wire.post(dst, kind, n, tensor, due)
        elif self.latency_s:
            self._in_flight.put(dst, kind, n, tensor, self.latency_s)
        else:
            self._wire.post(dst, kind, n, tensor)

    def ready(self, key: Key) -> bool:
        return key in self._box

    def recv(self, key: Key, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        self._wire.receive(key, deadline, timeout)
        payload, due = self._box.pop(key)
        sleep_until(due)  # sent early: usable when due
        if payload is not None and payload.device != self.device:
            payload = payload.to(self.device)
        return payload

    def close(self) -> None:
        """Stop the threads (messages not yet sent are dropped), then let the process groups
        go: torch must not destroy them while the interpreter shuts down (it can abort)."""
        self._wire.close(idle=self._in_flight.stop())
