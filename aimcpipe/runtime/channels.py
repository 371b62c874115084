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
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from aimcpipe.errors import StageFailure
from aimcpipe.runtime.clock import boot_id, sleep_until, tighten_timers
from aimcpipe.runtime.message_format import (
    DIMS,
    DTYPES,
    FIRST_CAPACITY,
    HEADER,
    HEADER_BYTES,
    KINDS,
    NONE,
    SEPARATE,
    decode,
    grown,
    make_header,
    packed,
)
from aimcpipe.runtime.transport import Key
from aimcpipe.runtime.unix_links import UnixLink, connect_links, header_array, pump

__all__ = ["Channels", "PeerLost", "PeerTimeout"]

log = logging.getLogger(__name__)

# A stage waiting on a unix link first polls it without sleeping for this long, when every
# stage has a core of its own: waking a sleeping receiver cost ~75 µs of a ~100 µs message
# on a 2-core VM (spinning: ~27 µs); beyond this it sleeps in poll()
SPIN_S = 0.0005


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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


_DEVICES: dict[str, Any] = {}


def _gloo_device(host: str) -> Any:
    """One gloo device (one socket loop thread) per address for all of a process's groups."""
    if host not in _DEVICES:
        _DEVICES[host] = dist.ProcessGroupGloo.create_device(hostname=host)
    return _DEVICES[host]


def _is_broken(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        word in text for word in ("closed", "reset by peer", "broken pipe", "connection", "eof")
    )


def _is_timeout(exc: BaseException) -> bool:
    return "timed out" in str(exc).lower() or "timeout" in str(exc).lower()


class _Pair:
    """One direction between two neighbours: a two-rank process group."""

    def __init__(
        self,
        store: dist.Store,
        name: str,
        rank: int,
        backend: str,
        host: str,
        timeout: timedelta,
    ) -> None:
        prefixed = dist.PrefixStore(name, store)
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._devices = [_gloo_device(host)]
            opts._timeout = timeout
            self.pg: Any = dist.ProcessGroupGloo(prefixed, rank, 2, opts)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
        self.peer = 1 - rank


class _Inbound:
    """The receiving end of one channel: how many messages the phase still expects, and the
    receive posted for the next one."""

    def __init__(self, src: int, pair: _Pair, capacity: int) -> None:
        self.src = src
        self.pair = pair
        self.remaining = 0
        self.capacity = capacity
        self.buffer: torch.Tensor | None = None
        self.work: Any = None


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
        self._timeout_s = timeout_s
        self.bytes_sent: dict[int, int] = {stage: 0}
        self.latency_s = 0.0
        # nccl needs a receive of the exact size: header and payload always separate there
        first = HEADER_BYTES if backend == "nccl" else FIRST_CAPACITY
        self._out: dict[int, _Pair] = {}
        self._in: dict[int, _Inbound] = {}
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
        self._links: dict[int, UnixLink] = {}
        if unix_sockets and backend == "gloo" and bool(mine) and set(boots) == {mine}:
            links = connect_links(
                store, f"{prefix}/unix", stage, num_stages, timeout_s, HEADER_BYTES, decode
            )
            self._links = links or {}
        #: how messages travel: "unix" (sockets between processes of one machine), or the
        #: torch.distributed backend
        self.wire = "unix" if self._links else backend
        self._spin_s = SPIN_S if self._links and _cores() >= num_stages else 0.0
        # Build the groups in one global order (pair (0,1), then (1,2), ...) so that each
        # group's two members meet without waiting on any other group.
        for a in range(num_stages - 1) if self.wire != "unix" else ():
            b = a + 1
            if stage not in (a, b):
                continue
            for src, dst in ((a, b), (b, a)):
                pair = _Pair(
                    store, f"{prefix}/{src}>{dst}", 0 if stage == src else 1, backend, host,
                    self.timeout,
                )  # fmt: skip
                if stage == src:
                    self._out[dst] = pair
                else:
                    self._in[src] = _Inbound(src, pair, first)
        self._box: dict[Key, tuple[Any, float]] = {}
        self._capacity = dict.fromkeys(self._out, first)  # what the receiver has posted
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # guards _error
        self._threads: list[threading.Thread] = []
        # per outgoing channel, the sends not yet known to be taken (each holds its buffers)
        self._posted: dict[int, deque[list[Any]]] = {dst: deque() for dst in self._out}
        self._delayed: dict[int, queue.Queue[Any]] = {}

    def _thread(self, target: Any, dst: int, what: str) -> queue.Queue[Any]:
        q: queue.Queue[Any] = queue.Queue()
        name = f"{what} {self.stage}>{dst}"
        thread = threading.Thread(target=target, args=(dst, q), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return q

    # -- the transport protocol ----------------------------------------------------------------
    def begin(self, expect: Mapping[int, int], latency_s: float = 0.0) -> None:
        """Start a phase: receive ``expect[src]`` messages from each neighbour ``src``."""
        self._raise_if_failed()
        self.latency_s = latency_s
        for src, count in expect.items():
            if count <= 0:
                continue
            if self._links:
                self._links[src].remaining = count
                continue
            inbound = self._in[src]
            inbound.remaining = count
            self._post_receive(inbound)

    def end(self) -> None:
        """End a phase: every expected message received, every send taken by its peer
        (each waited for at most ``timeout_s`` after the one before it)."""
        for q in self._delayed.values():
            q.join()
        for dst in self._posted:
            self._reap(dst, wait=True)
        if self._links:
            self._pump(lambda: not any(link.sending for link in self._links.values()),
                       None, "take a message")  # fmt: skip
        self._raise_if_failed()
        late = {i.src: i.remaining for i in self._in.values() if i.remaining}
        late.update({p: link.remaining for p, link in self._links.items() if link.remaining})
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
        self._raise_if_failed()
        if dst not in self._out and dst not in self._links:
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
            self._post(dst, kind, n, tensor, due)
        elif self.latency_s:
            if dst not in self._delayed:
                self._delayed[dst] = self._thread(self._send_later, dst, "in flight")
            self._delayed[dst].put((kind, n, tensor, time.monotonic() + self.latency_s))
        else:
            self._post(dst, kind, n, tensor)

    def ready(self, key: Key) -> bool:
        return key in self._box

    def recv(self, key: Key, timeout: float) -> Any:
        kind, n, src, _ = key
        deadline = time.monotonic() + timeout
        if self._links:
            return self._recv_unix(key, deadline, timeout)
        inbound = self._in.get(src)
        while key not in self._box:
            self._raise_if_failed()
            if inbound is None or inbound.work is None:
                raise StageFailure(
                    f"stage {self.stage}: needs {kind} of micro-batch {n} from stage {src}, "
                    "which sends it nothing more in this phase"
                )
            got_kind, got_n, payload, due = self._take(inbound, deadline, (kind, n))
            self._box[(got_kind, got_n, src, self.stage)] = (payload, due)
        return self._unboxed(key)

    def _unboxed(self, key: Key) -> Any:
        payload, due = self._box.pop(key)
        sleep_until(due)  # sent early: usable when due
        if payload is not None and payload.device != self.device:
            payload = payload.to(self.device)
        return payload

    # -- the wire ----------------------------------------------------------------------------------
    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.backend == "nccl" else t

    def _post(
        self, dst: int, kind: str, n: int, tensor: torch.Tensor | None, due: float = 0.0
    ) -> None:
        """Post one message: header and payload packed into one transfer when they fit the
        receive buffer the peer has posted, else the header and then the payload. ``due``:
        the ``time.perf_counter`` time before which the receiver must not use it (0: none)."""
        if self._links:
            header = make_header(kind, n, tensor, separate=False, due_ns=round(due * 1e9))
            try:
                self._links[dst].post(header_array(header), tensor)
            except OSError as exc:
                raise self._failed(exc, dst, "take a message", 0.0) from None
            return
        pair = self._out[dst]
        nbytes = 0 if tensor is None else tensor.numel() * tensor.element_size()
        together = self.backend != "nccl" and HEADER_BYTES + nbytes <= self._capacity[dst]
        header = make_header(kind, n, tensor, separate=not together, due_ns=round(due * 1e9))
        if tensor is not None and together:
            parts = [packed(header, tensor)]
        else:
            parts = [self._on_device(torch.tensor(header, dtype=torch.int64))]
            if tensor is not None:
                parts.append(tensor)
                self._capacity[dst] = grown(self._capacity[dst], nbytes, self.backend)
        self._reap(dst)
        try:
            works = [pair.pg.send([part], pair.peer, 0) for part in parts]
        except Exception as exc:
            raise self._failed(exc, dst, "take a message", 0.0) from None
        self._posted[dst].append(works)  # the works hold their buffers until they complete

    def _reap(self, dst: int, wait: bool = False) -> None:
        """Let go of this channel's sends that the neighbour has taken, oldest first; with
        ``wait``, of all of them, each waited for up to the timeout (a phase's end). No
        thread waits on sends: waking one per message cost as much as the message."""
        posted = self._posted[dst]
        while posted:
            works = posted[0]
            if all(w.is_completed() for w in works):
                for work in works:  # returns at once; raises what went wrong
                    self._wait(work, dst, None, "take a message")
            elif wait:
                for work in works:
                    self._wait(work, dst, time.monotonic() + self.timeout.total_seconds(),
                               "take a message")  # fmt: skip
            else:
                return
            posted.popleft()

    def _post_receive(self, inbound: _Inbound) -> None:
        """Post the receive of the next message (its header, and its payload if it fits)."""
        if self.backend == "nccl":
            inbound.buffer = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        else:
            inbound.buffer = torch.empty(inbound.capacity, dtype=torch.uint8)
        try:
            inbound.work = inbound.pair.pg.recv([inbound.buffer], inbound.pair.peer, 0)
        except Exception as exc:
            raise self._failed(exc, inbound.src, "send its next message", 0.0) from None

    def _take(
        self, inbound: _Inbound, deadline: float, wanted: tuple[str, int]
    ) -> tuple[str, int, Any, float]:
        """Wait for the next message of ``inbound``'s channel and post the receive of the
        one after it; returns its kind, micro-batch, payload and due time (0: none)."""
        what = f"send its {wanted[0]} of micro-batch {wanted[1]}"
        self._wait(inbound.work, inbound.src, deadline, what)
        for dst in self._posted:  # let sent buffers go before allocating receive buffers
            self._reap(dst)
        buffer = inbound.buffer
        assert buffer is not None
        if self.backend == "nccl":
            h = buffer.tolist()
        else:
            h = buffer.numpy()[:HEADER_BYTES].view(np.int64).tolist()
        kind, n, flags, due = KINDS[h[0]], h[1], h[4], h[5] / 1e9
        shape, dtype = h[DIMS : DIMS + h[3]], DTYPES[h[2]]
        payload = None
        if flags & SEPARATE:
            device = self.device if self.backend == "nccl" else torch.device("cpu")
            payload = torch.empty(shape, dtype=dtype, device=device)
            try:
                work = inbound.pair.pg.recv([payload], inbound.pair.peer, 0)
            except Exception as exc:
                raise self._failed(exc, inbound.src, what, 0.0) from None
            self._wait(work, inbound.src, deadline, what)
            nbytes = payload.numel() * payload.element_size()
            inbound.capacity = grown(inbound.capacity, nbytes, self.backend)
        elif not flags & NONE:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            payload = buffer[HEADER_BYTES : HEADER_BYTES + nbytes].view(dtype).reshape(shape)
            if 2 * nbytes < buffer.numel():  # a stage may keep it: not the whole buffer
                payload = payload.clone()
        inbound.remaining -= 1
        inbound.work = inbound.buffer = None
        if inbound.remaining > 0:
            self._post_receive(inbound)
        return kind, n, payload, due

    def _recv_unix(self, key: Key, deadline: float, timeout: float) -> Any:
        kind, n, src, _ = key
        link = self._links.get(src)
        what = f"send its {kind} of micro-batch {n}"
        while key not in self._box:
            self._raise_if_failed()
            if link is None or not (link.arrived or link.remaining):
                raise StageFailure(
                    f"stage {self.stage}: needs {kind} of micro-batch {n} from stage {src}, "
                    "which sends it nothing more in this phase"
                )
            if not link.arrived:
                self._pump(lambda: bool(link.arrived), deadline, what, src, timeout)
            self._unpack_arrived()
        return self._unboxed(key)

    def _unpack_arrived(self) -> None:
        """Move the messages read whole on every link into the mailbox."""
        for src, link in self._links.items():
            while link.arrived:
                h, payload = link.arrived.popleft()
                self._box[(KINDS[h[0]], h[1], src, self.stage)] = (payload, h[5] / 1e9)

    def _pump(
        self,
        until: Any,
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
                raise self._failed(exc, exc.peer, what, 0.0) from None  # type: ignore[attr-defined]
            if deadline is None and sum(link.progress for link in links) != before:
                continue  # still moving: not stuck
            peer = blame
            if peer is None:
                peer = next(p for p, link in self._links.items() if link.sending)
            waited = self._timeout_s if timeout is None else timeout
            raise self._failed(TimeoutError("timed out"), peer, what, waited)

    def _wait(self, work: Any, peer: int, deadline: float | None, what: str) -> None:
        """Wait for ``work`` until ``deadline`` (None: it has completed, no timeout needed)."""
        left = 0.0 if deadline is None else deadline - time.monotonic()
        try:
            if deadline is None:
                work.wait()
            else:
                work.wait(timedelta(seconds=max(left, 0.001)))
        except Exception as exc:
            raise self._failed(exc, peer, what, left) from None

    # -- failures ----------------------------------------------------------------------------------
    def _failed(self, exc: BaseException, peer: int, what: str, waited: float) -> StageFailure:
        """Record the channel's first failure (so every later call raises it) and return it."""
        error = self._wrap(exc, peer, what, waited)
        with self._lock:
            if self._error is None:
                self._error = error
        return error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

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

    # -- emulated latency --------------------------------------------------------------------------
    def _send_later(self, dst: int, q: queue.Queue[Any]) -> None:
        tighten_timers()  # this thread only waits out latencies: wake it when they end
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                kind, n, tensor, due = item
                sleep_until(due, time.monotonic)
                if self._error is None:
                    self._post(dst, kind, n, tensor)
                    if dst in self._links:  # the stage may be busy: see it out ourselves
                        self._links[dst].drain(time.monotonic() + self._timeout_s)
            except StageFailure:
                pass  # recorded by _post
            finally:
                q.task_done()

    def close(self) -> None:
        """Stop the threads (messages not yet sent are dropped), then let the process groups
        go: torch must not destroy them while the interpreter shuts down (it can abort)."""
        for q in self._delayed.values():
            q.put(None)
        for thread in self._threads:
            thread.join(timeout=2.0)
        for link in self._links.values():
            link.close()
        if not any(t.is_alive() for t in self._threads):
            self._out.clear()
            self._in.clear()
