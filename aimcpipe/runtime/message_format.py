"""The channels' message format: a fixed-size header and the tensor (both wires use it).

A header is ``HEADER`` int64s: kind, micro-batch, dtype, number of dims, flags, due time
(ns, 0: none) and up to ``MAX_DIMS`` dims, so a receiver needs no shape configuration. On
the process-group wire (:mod:`aimcpipe.runtime.group_wire`) header and payload travel
packed into one buffer where they fit the receive the peer has posted, and the buffer
grows by :func:`grown` on both ends alike; on the unix wire
(:mod:`aimcpipe.runtime.unix_wire`) the payload follows its header on the socket.
"""

from __future__ import annotations

import numpy as np
import torch

from aimcpipe.errors import StageFailure
from aimcpipe.runtime.unix_links import Message, header_values

__all__ = [
    "DIMS",
    "DTYPES",
    "FIRST_CAPACITY",
    "HEADER",
    "HEADER_BYTES",
    "KINDS",
    "MAX_CAPACITY",
    "MAX_DIMS",
    "NONE",
    "SEPARATE",
    "decode",
    "grown",
    "make_header",
    "packed",
]

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
_KIND_CODE = {kind: i for i, kind in enumerate(KINDS)}
_DTYPE_CODE = {dtype: i for i, dtype in enumerate(DTYPES)}
# receive buffers are allocated through numpy where it has the dtype: between two actions,
# with the caches cold, np.empty + torch.from_numpy cost about half of torch.empty
_NUMPY_DTYPE = {
    dtype: torch.empty(0, dtype=dtype).numpy().dtype for dtype in DTYPES if dtype != torch.bfloat16
}
MAX_DIMS = 8
HEADER = 6 + MAX_DIMS  # kind, micro-batch, dtype, ndim, flags, due, dims
DIMS = 6  # where the dims start
HEADER_BYTES = 8 * HEADER
NONE, SEPARATE = 1, 2  # flags: no payload; the payload follows as a message of its own
FIRST_CAPACITY = 64 << 10  # bytes a posted receive takes at first (header + payload)
MAX_CAPACITY = 1 << 20  # beyond this a payload always travels on its own (no packing copy)


def make_header(
    kind: str, n: int, payload: torch.Tensor | None, separate: bool, due_ns: int = 0
) -> list[int]:
    """The header's values (a list: filling a tensor element by element cost ~15 µs)."""
    h = [0] * HEADER
    h[0] = _KIND_CODE[kind]
    h[1] = n
    h[5] = due_ns
    if payload is None:
        h[4] = NONE
        return h
    h[4] = SEPARATE if separate else 0
    dtype = payload.dtype
    code = _DTYPE_CODE.get(dtype)
    if code is None:
        raise StageFailure(f"cannot send a tensor of dtype {dtype}")
    shape = payload.shape
    if len(shape) > MAX_DIMS:
        raise StageFailure(f"cannot send a tensor of {len(shape)} dimensions (max {MAX_DIMS})")
    h[2] = code
    h[3] = len(shape)
    h[DIMS : DIMS + len(shape)] = shape
    return h


def packed(header: list[int], payload: torch.Tensor) -> torch.Tensor:
    """Header and payload in one byte buffer, written through numpy (a few µs; the same with
    torch's indexing took ~10)."""
    nbytes = payload.numel() * payload.element_size()
    buffer = torch.empty(HEADER_BYTES + nbytes, dtype=torch.uint8)
    out = buffer.numpy()
    out[:HEADER_BYTES].view(np.int64)[:] = header
    if nbytes:
        out[HEADER_BYTES:] = payload.reshape(-1).view(torch.uint8).numpy()
    return buffer


def decode(raw: bytes) -> Message:
    """A header read from a unix link, and the tensor its payload is to be read into."""
    h = header_values(raw)
    if h[4] & NONE:
        return h, None
    shape, dtype = h[DIMS : DIMS + h[3]], DTYPES[h[2]]
    as_numpy = _NUMPY_DTYPE.get(dtype)
    if as_numpy is None:
        return h, torch.empty(shape, dtype=dtype)
    return h, torch.from_numpy(np.empty(shape, dtype=as_numpy))


def grown(capacity: int, nbytes: int, backend: str) -> int:
    """The receive buffer after a payload of ``nbytes`` had to travel on its own: both ends
    apply this same rule, so the sender always knows what the receiver has posted."""
    if backend == "nccl" or HEADER_BYTES + nbytes > MAX_CAPACITY:
        return capacity
    return max(capacity, HEADER_BYTES + nbytes)
