"""The process-group wire of :class:`~aimcpipe.runtime.channels.Channels`.

Each direction between two neighbours is a two-rank torch.distributed process group (gloo or
nccl) carrying one ordered stream of messages. Sends are posted and let go of once the peer
has taken them; for each incoming channel the receive of the next expected message is always
posted, into a buffer that header and payload share where they fit (both ends grow it by
:func:`~aimcpipe.runtime.message_format.grown`). Messages are filed in the channels'
mailbox; failures are recorded through the channels' :class:`ChannelErrors`.
"""

from __future__ import annotations

import time
from collections import deque
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from aimcpipe.runtime.message_format import (
    DIMS,
    DTYPES,
    FIRST_CAPACITY,
    HEADER,
    HEADER_BYTES,
    KINDS,
    NONE,
    SEPARATE,
    grown,
    make_header,
    packed,
)
from aimcpipe.runtime.transport import Key

if TYPE_CHECKING:
    from aimcpipe.runtime.channels import ChannelErrors

__all__ = ["GroupWire"]

_DEVICES: dict[str, Any] = {}


def _gloo_device(host: str) -> Any:
    """One gloo device (one socket loop thread) per address for all of a process's groups."""
    if host not in _DEVICES:
        _DEVICES[host] = dist.ProcessGroupGloo.create_device(hostname=host)
    return _DEVICES[host]


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


class GroupWire:
    """Stage ``stage``'s process groups to its neighbours, filing what arrives in ``box``
    (``key -> (payload, due)``) and recording failures in ``errors``."""

    def __init__(
        self,
        store: dist.Store,
        prefix: str,
        stage: int,
        num_stages: int,
        *,
        backend: str,
        host: str,
        device: torch.device,
        timeout: timedelta,
        box: dict[Key, tuple[Any, float]],
        errors: ChannelErrors,
    ) -> None:
        self.stage = stage
        self.backend = backend
        self.device = device
        self.timeout = timeout
        self._box = box
        self._errors = errors
        # nccl needs a receive of the exact size: header and payload always separate there
        first = HEADER_BYTES if backend == "nccl" else FIRST_CAPACITY
        self._out: dict[int, _Pair] = {}
        self._in: dict[int, _Inbound] = {}
        # Build the groups in one global order (pair (0,1), then (1,2), ...) so that each
        # group's two members meet without waiting on any other group.
        for a in range(num_stages - 1):
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
        self._capacity = dict.fromkeys(self._out, first)  # what the receiver has posted
        # per outgoing channel, the sends not yet known to be taken (each holds its buffers)
        self._posted: dict[int, deque[list[Any]]] = {dst: deque() for dst in self._out}

    def reaches(self, dst: int) -> bool:
        return dst in self._out

    def expect(self, src: int, count: int) -> None:
        """The phase expects ``count`` (> 0) messages from ``src``: post the first receive."""
        inbound = self._in[src]
        inbound.remaining = count
        self._post_receive(inbound)

    def post(
        self, dst: int, kind: str, n: int, tensor: torch.Tensor | None, due: float = 0.0
    ) -> None:
        """Post one message: header and payload packed into one transfer when they fit the
        receive buffer the peer has posted, else the header and then the payload. ``due``:
        the ``time.perf_counter`` time before which the receiver must not use it (0: none)."""
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
            raise self._errors.failed(exc, dst, "take a message", 0.0) from None
        self._posted[dst].append(works)  # the works hold their buffers until they complete

    def push(self, dst: int) -> None:
        """Nothing to do: gloo moves what was posted in its own threads."""

    def receive(self, key: Key, deadline: float, timeout: float) -> None:
        """Take messages from ``key``'s source into the mailbox until ``key`` is there."""
        kind, n, src, _ = key
        inbound = self._in.get(src)
        while key not in self._box:
            self._errors.check()
            if inbound is None or inbound.work is None:
                raise self._errors.not_coming(key)
            got_kind, got_n, payload, due = self._take(inbound, deadline, (kind, n))
            self._box[(got_kind, got_n, src, self.stage)] = (payload, due)

    def finish(self) -> None:
        """A phase's end: wait for every send to be taken (each up to the timeout)."""
        for dst in self._posted:
            self._reap(dst, wait=True)

    def late(self) -> dict[int, int]:
        """Messages the phase still expects, by source."""
        return {i.src: i.remaining for i in self._in.values() if i.remaining}

    def close(self, idle: bool) -> None:
        """Let the process groups go where no other thread may still use them (``idle``)."""
        if idle:
            self._out.clear()
            self._in.clear()

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.backend == "nccl" else t

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
            raise self._errors.failed(exc, inbound.src, "send its next message", 0.0) from None

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
                raise self._errors.failed(exc, inbound.src, what, 0.0) from None
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

    def _wait(self, work: Any, peer: int, deadline: float | None, what: str) -> None:
        """Wait for ``work`` until ``deadline`` (None: it has completed, no timeout needed)."""
        left = 0.0 if deadline is None else deadline - time.monotonic()
        try:
            if deadline is None:
                work.wait()
            else:
                work.wait(timedelta(seconds=max(left, 0.001)))
        except Exception as exc:
            raise self._errors.failed(exc, peer, what, left) from None
