"""The unix-socket wire between neighbouring stages: headers, byte views, partial sends."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from aimcpipe.runtime.message_format import DTYPES, HEADER, HEADER_BYTES, decode, make_header
from aimcpipe.runtime.unix_links import (
    UnixLink,
    byte_view,
    header_array,
    header_values,
    pump,
)


def test_header_bytes_round_trip():
    values = [2, 7, 3, 4, 0, 123_456_789_012, 1, 2, 3, 4, 0, 0, 0, -5]
    raw = header_array(values)
    assert len(raw) == 8 * len(values)
    assert header_values(raw) == values


@pytest.mark.parametrize("dtype", DTYPES)
def test_byte_view_is_the_tensors_memory(dtype):
    t = (torch.arange(24) % 2).to(dtype).reshape(2, 3, 4)
    view = byte_view(t)
    assert len(view) == t.numel() * t.element_size()
    assert bytes(view) == t.reshape(-1).view(torch.uint8).numpy().tobytes()
    target = torch.empty_like(t)
    byte_view(target)[:] = view  # reading into a fresh tensor gives the tensor back
    assert torch.equal(target, t)


def test_byte_view_of_a_scalar_and_an_empty_tensor():
    assert bytes(byte_view(torch.tensor(1.5))) == torch.tensor(1.5).numpy().tobytes()
    assert len(byte_view(torch.zeros(0))) == 0


def _pair(sndbuf: int | None = None) -> tuple[UnixLink, UnixLink]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = (UnixLink(s, peer, HEADER_BYTES, decode) for s, peer in ((a, 1), (b, 0)))
    if sndbuf is not None:  # a small kernel buffer: sends are taken in pieces
        for link in (left, right):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                link.sock.setsockopt(socket.SOL_SOCKET, opt, sndbuf)
    return left, right


def _send(link: UnixLink, n: int, payload: torch.Tensor | None) -> None:
    link.post(header_array(make_header("activation", n, payload, separate=False)), payload)


def test_messages_arrive_whole_and_in_order_through_a_small_buffer():
    sender, receiver = _pair(sndbuf=4096)
    payloads = [
        torch.randn(256, 1024),  # 1 MiB: far more than the kernel takes at once
        None,
        torch.tensor(3.0),
        torch.ones(5, dtype=torch.bfloat16),
        torch.tensor([True, False, True]),
        torch.randn(300, 7),
    ]
    for n, p in enumerate(payloads):
        _send(sender, n, p)
    assert sender.sending  # the kernel could not take it all
    receiver.remaining = len(payloads)
    deadline = time.monotonic() + 30
    assert pump([sender, receiver], lambda: len(receiver.arrived) == len(payloads), deadline)
    assert not sender.sending
    for n, p in enumerate(payloads):
        header, got = receiver.arrived.popleft()
        assert len(header) == HEADER and header[1] == n
        if p is None:
            assert got is None
        else:
            assert got.dtype == p.dtype and got.shape == p.shape and torch.equal(got, p)
    for link in (sender, receiver):
        link.close()


def test_a_read_stops_after_each_message():
    sender, receiver = _pair()
    for n in range(3):
        _send(sender, n, torch.full((4,), float(n)))
    receiver.remaining = 3
    assert receiver.read() and len(receiver.arrived) == 1
    assert receiver.read() and receiver.read() and len(receiver.arrived) == 3
    assert not receiver.read()  # nothing more expected
    for link in (sender, receiver):
        link.close()


def test_a_closed_peer_is_named():
    sender, receiver = _pair()
    receiver.remaining = 1
    sender.close()
    with pytest.raises(ConnectionError) as info:
        pump([receiver], lambda: False, time.monotonic() + 5)
    assert info.value.peer == receiver.peer == 0  # type: ignore[attr-defined]
    receiver.close()
