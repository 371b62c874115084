"""Point-to-point channels between neighbouring stages over torch.distributed (DESIGN §5).

Each direction between two neighbours is a process group of its own (two ranks: the sender
and the receiver), so every group carries one ordered stream of messages and nothing can
cross: stage s sends activations to s+1 on one group and receives gradients from s+1 on
another. Every message is a fixed-size header (kind, micro-batch, dtype, shape, a none-flag)
followed by the tensor, so stages need no shape configuration.

Nothing waits on a neighbour while it could be sending to us. In 1F1B both neighbours send
at once and a gloo send completes only when its receive is posted, so:

* **sends are asynchronous**: :meth:`Channels.send` queues the tensor and returns; one
  sender thread per outgoing channel sends in order;
* **receives are posted ahead**: at the start of each phase (an epoch, an evaluation pass)
  one receiver thread per incoming channel receives exactly the messages the schedule says
  will come, in the order they are sent, into a mailbox; :meth:`Channels.recv` takes from
  the mailbox.

gloo's batched ``isend/irecv`` (``batch_isend_irecv``), which is known to hang, is not used.
Every wait has a timeout; a neighbour that dies closes its sockets and the waiting side
fails at once, naming it.

With ``nccl`` (every stage on a GPU of its own) payloads stay on the GPU; with ``gloo`` a GPU
stage's tensors are staged through the CPU.
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
from aimcpipe.runtime.transport import Key

__all__ = ["Channels", "PeerLost", "PeerTimeout"]

log = logging.getLogger(__name__)

KINDS = ("activation", "gradient", "eval")
DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
MAX_DIMS = 8
HEADER = 5 + MAX_DIMS  # kind, micro-batch, dtype, ndim, none-flag, dims


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


def _header(kind: str, n: int, payload: torch.Tensor | None) -> torch.Tensor:
    h = torch.zeros(HEADER, dtype=torch.int64)
    h[0] = KINDS.index(kind)
    h[1] = n
    if payload is None:
        h[4] = 1
        return h
    if payload.dtype not in DTYPES:
        raise StageFailure(f"cannot send a tensor of dtype {payload.dtype}")
    if payload.dim() > MAX_DIMS:
        raise StageFailure(f"cannot send a tensor of {payload.dim()} dimensions (max {MAX_DIMS})")
    h[2] = DTYPES.index(payload.dtype)
    h[3] = payload.dim()
    h[5 : 5 + payload.dim()] = torch.tensor(payload.shape, dtype=torch.int64)
    return h


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
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            opts._timeout = timeout
            self.pg: Any = dist.ProcessGroupGloo(prefixed, rank, 2, opts)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
        self.peer = 1 - rank


class Channels:
    """The transport of stage ``stage`` of ``num_stages`` in a multi-process backend.

    ``store`` is shared by all stages (``prefix`` namespaces it); ``host`` is the address
    this process's sockets bind to; ``device`` is where received tensors go.
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
    ) -> None:
        self.stage = stage
        self.num_stages = num_stages
        self.device = torch.device(device)
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self.bytes_sent: dict[int, int] = {stage: 0}
        self.latency_s = 0.0
        self._out: dict[int, _Pair] = {}
        self._in: dict[int, _Pair] = {}
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
                (self._out if stage == src else self._in)[dst if stage == src else src] = pair
        self._box: dict[Key, Any] = {}
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._receivers: list[threading.Thread] = []
        self._queues: dict[int, queue.Queue[Any]] = {}
        self._senders: dict[int, threading.Thread] = {}
        for dst, pair in self._out.items():
            q: queue.Queue[Any] = queue.Queue()
            t = threading.Thread(
                target=self._send_loop, args=(dst, pair, q), name=f"send {stage}>{dst}", daemon=True
            )
            self._queues[dst] = q
            self._senders[dst] = t
            t.start()

    # -- the transport protocol ----------------------------------------------------------------
    def begin(self, expect: Mapping[int, int], latency_s: float = 0.0) -> None:
        """Start a phase: receive ``expect[src]`` messages from each neighbour ``src``."""
        self._raise_if_failed()
        self.latency_s = latency_s
        for src, count in expect.items():
            if count <= 0:
                continue
            pair = self._in[src]
            t = threading.Thread(
                target=self._recv_loop,
                args=(src, pair, count),
                name=f"recv {src}>{self.stage}",
                daemon=True,
            )
            self._receivers.append(t)
            t.start()

    def end(self) -> None:
        """End a phase: every expected message received, every queued send delivered."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        for t in self._receivers:
            t.join(max(0.0, deadline - time.monotonic()))
        self._receivers = [t for t in self._receivers if t.is_alive()]
        for q in self._queues.values():
            while q.unfinished_tasks and time.monotonic() < deadline and self._error is None:
                time.sleep(0.001)
        self._raise_if_failed()
        if self._receivers or any(q.unfinished_tasks for q in self._queues.values()):
            raise StageFailure(f"stage {self.stage}: messages still in flight at a phase end")
        if self._box:
            raise StageFailure(
                f"stage {self.stage}: {len(self._box)} message(s) arrived but were never used"
            )

    def send(self, key: Key, payload: Any) -> None:
        kind, n, src, dst = key
        self._raise_if_failed()
        if dst not in self._queues:
            raise StageFailure(f"stage {src}: no channel to stage {dst}")
        tensor = None
        if payload is not None:
            tensor = payload.detach()
            if self.backend == "gloo" and tensor.device.type != "cpu":
                tensor = tensor.cpu()
            tensor = tensor.contiguous()
            self.bytes_sent[src] += tensor.numel() * tensor.element_size()
        due = time.monotonic() + self.latency_s if self.latency_s else 0.0
        self._queues[dst].put((kind, n, tensor, due))

    def ready(self, key: Key) -> bool:
        with self._cond:
            return key in self._box

    def recv(self, key: Key, timeout: float) -> Any:
        kind, n, src, _ = key
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self._box:
                if self._error is not None:
                    raise self._error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeout(
                        f"stage {self.stage}: no {kind} of micro-batch {n} from stage {src} "
                        f"within {timeout:g} s",
                        src,
                    )
                self._cond.wait(min(left, 1.0))
            payload = self._box.pop(key)
        if payload is not None and payload.device != self.device:
            payload = payload.to(self.device)
        return payload

    # -- threads ---------------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _wrap(self, exc: BaseException, peer: int, what: str) -> StageFailure:
        if _is_timeout(exc):
            return PeerTimeout(
                f"stage {self.stage}: stage {peer} did not {what} within "
                f"{self.timeout.total_seconds():g} s",
                peer,
            )
        if _is_broken(exc):
            return PeerLost(f"stage {self.stage}: lost stage {peer} while it had to {what}", peer)
        return StageFailure(f"stage {self.stage}: channel to stage {peer} failed: {exc}")

    def _send_loop(self, dst: int, pair: _Pair, q: queue.Queue[Any]) -> None:
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                if self._error is not None:
                    continue  # drain: the phase has failed
                kind, n, tensor, due = item
                if due:
                    while (left := due - time.monotonic()) > 0:
                        time.sleep(left)
                header = _header(kind, n, tensor)
                if self.backend == "nccl":
                    header = header.to(self.device)
                pair.pg.send([header], pair.peer, 0).wait(self.timeout)
                if tensor is not None:
                    pair.pg.send([tensor], pair.peer, 0).wait(self.timeout)
            except Exception as exc:
                self._fail(self._wrap(exc, dst, "take a message"))
            finally:
                q.task_done()

    def _recv_loop(self, src: int, pair: _Pair, count: int) -> None:
        try:
            device = self.device if self.backend == "nccl" else torch.device("cpu")
            for _ in range(count):
                header = torch.empty(HEADER, dtype=torch.int64, device=device)
                pair.pg.recv([header], pair.peer, 0).wait(self.timeout)
                h = header.tolist()
                kind, n = KINDS[h[0]], h[1]
                payload = None
                if not h[4]:
                    shape = h[5 : 5 + h[3]]
                    payload = torch.empty(shape, dtype=DTYPES[h[2]], device=device)
                    pair.pg.recv([payload], pair.peer, 0).wait(self.timeout)
                with self._cond:
                    self._box[(kind, n, src, self.stage)] = payload
                    self._cond.notify_all()
        except Exception as exc:
            self._fail(self._wrap(exc, src, "send its next message"))

    def close(self) -> None:
        """Stop the sender threads (queued messages are dropped if the phase failed)."""
        for q in self._queues.values():
            q.put(None)
        for t in self._senders.values():
            t.join(timeout=1.0)
