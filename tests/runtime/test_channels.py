"""Channels: point-to-point messages between stages, over both wires they use on CPU —
unix sockets (neighbours on one machine, the default) and real gloo process groups.

The stages are threads of this process here (each with its own channels, as a process would
have): the protocol, ordering, timeouts and errors are what is tested, quickly."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from aimcpipe.errors import StageFailure
from aimcpipe.runtime.channels import HEADER_BYTES, Channels, PeerLost, PeerTimeout
from aimcpipe.runtime.rendezvous import connect_store, host_store, put_obj, take_obj


def _in_threads(count: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(s)`` for every stage in a thread of its own; re-raise the first error."""
    out: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(s: int) -> None:
        try:
            out[s] = fn(s)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a stage thread did not finish"
    if errors:
        raise errors[0]
    return out


@pytest.fixture(params=["unix", "gloo"])
def wire(request: pytest.FixtureRequest) -> str:
    return request.param


def _world(count: int, wire: str, timeout_s: float = 10.0) -> list[Channels]:
    store, port = host_store("127.0.0.1", timeout_s)
    stores = [store] + [connect_store("127.0.0.1", port, timeout_s) for _ in range(count - 1)]
    chans = _in_threads(
        count,
        lambda s: Channels(
            stores[s], s, count, prefix="t", timeout_s=timeout_s, unix_sockets=wire == "unix"
        ),
    )
    assert {c.wire for c in chans} == {wire}  # one machine: unix unless turned off
    return chans


def test_neighbours_sending_to_each_other_at_once_get_everything_in_order(wire: str):
    """Every stage sends all its activations and gradients before receiving anything —
    the pattern that deadlocks blocking sends — with assorted dtypes, shapes and None."""
    count, n_msgs = 4, 30
    chans = _world(count, wire)

    def payload(kind: str, n: int) -> torch.Tensor | None:
        if n % 7 == 3:
            return None
        dtype = (torch.float32, torch.float64, torch.int64, torch.bool)[n % 4]
        shape = (n % 3 + 1, 2, 1)[: n % 3 + 1]
        return (torch.arange(torch.Size(shape).numel()).reshape(shape) + n).to(dtype)

    def stage(s: int) -> dict[int, int]:
        c = chans[s]
        expect = {}
        if s > 0:
            expect[s - 1] = n_msgs
        if s < count - 1:
            expect[s + 1] = n_msgs
        c.begin(expect)
        for n in range(n_msgs):
            if s < count - 1:
                c.send(("activation", n, s, s + 1), payload("activation", n))
            if s > 0:
                c.send(("gradient", n, s, s - 1), payload("gradient", n))
        for n in range(n_msgs):
            for key in ([("activation", n, s - 1, s)] if s > 0 else []) + (
                [("gradient", n, s + 1, s)] if s < count - 1 else []
            ):
                got, want = c.recv(key, 10.0), payload(key[0], n)
                if want is None:
                    assert got is None
                else:
                    assert got.dtype == want.dtype and torch.equal(got, want), key
        c.end()
        if wire == "gloo":
            assert not any(c._wire._posted.values())  # every send taken, its buffers let go
        else:
            assert not any(link.sending for link in c._wire._links.values())
        return c.bytes_sent

    sent = _in_threads(count, stage)
    per = sum(
        p.numel() * p.element_size()
        for n in range(n_msgs)
        if (p := payload("activation", n)) is not None
    )
    assert sent[0] == {0: per}  # the first stage sends activations only
    assert sent[1] == {1: 2 * per}
    for c in chans:
        c.close()


def test_a_message_that_never_comes_times_out_naming_the_peer(wire: str):
    chans = _world(2, wire, timeout_s=5.0)
    chans[0].begin({1: 1})
    started = time.monotonic()
    with pytest.raises(
        PeerTimeout, match="stage 1 did not send its gradient of micro-batch 0"
    ) as info:
        chans[0].recv(("gradient", 0, 1, 0), 0.3)
    assert info.value.peer == 1
    assert time.monotonic() - started < 5.0
    for c in chans:
        c.close()


def test_messages_taken_out_of_order_wait_in_the_mailbox_and_unused_ones_fail_the_end(wire: str):
    chans = _world(2, wire)
    chans[1].begin({0: 3})
    chans[0].begin({})
    for n in range(3):
        chans[0].send(("activation", n, 0, 1), torch.full((2,), float(n)))
    assert chans[1].recv(("activation", 2, 0, 1), 10.0).tolist() == [2.0, 2.0]
    assert chans[1].ready(("activation", 0, 0, 1))  # arrived first, kept for later
    assert chans[1].recv(("activation", 0, 0, 1), 10.0).tolist() == [0.0, 0.0]
    chans[0].end()
    with pytest.raises(StageFailure, match=r"1 message\(s\) arrived but were never used"):
        chans[1].end()
    for c in chans:
        c.close()


def test_payloads_larger_than_the_posted_receive_travel_whole_in_both_directions(wire: str):
    """A payload that does not fit the posted receive goes on its own and both ends grow
    the buffer alike (the next one of that size is packed); beyond 1 MiB, always apart."""
    chans = _world(2, wire)
    sizes = [70_000, 70_000, 3, 200_000, 200_000, 600_000, 10, 3_000_000]  # float32 elements
    sent = [torch.arange(float(n)) * (i + 1) for i, n in enumerate(sizes)]

    def stage(s: int) -> None:
        c = chans[s]
        c.begin({1 - s: len(sizes)})
        kind = ("activation", "gradient")[s]
        for i, t in enumerate(sent):
            c.send((kind, i, s, 1 - s), t)
        for i, t in enumerate(sent):
            got = c.recv((("activation", "gradient")[1 - s], i, 1 - s, s), 10.0)
            assert torch.equal(got, t), i
        c.end()

    _in_threads(2, stage)
    if wire == "gloo":
        grown = HEADER_BYTES + 200_000 * 4
        assert chans[1]._wire._in[0].capacity == chans[0]._wire._capacity[1] == grown
    for c in chans:
        c.close()


PEER = """
import os, sys
from aimcpipe.runtime.channels import Channels
from aimcpipe.runtime.rendezvous import connect_store
store = connect_store("127.0.0.1", int(sys.argv[1]), 30.0)
Channels(store, 1, 2, prefix="t", timeout_s=30.0, unix_sockets=sys.argv[2] == "unix")
os._exit(0)  # dies at once, as a killed stage would: its sockets close
"""


def test_a_neighbour_that_dies_is_reported_as_lost_at_once(wire: str):
    store, port = host_store("127.0.0.1", 30.0)
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(port), wire])
    chans = Channels(store, 0, 2, prefix="t", timeout_s=30.0, unix_sockets=wire == "unix")
    assert chans.wire == wire
    started = time.monotonic()
    with pytest.raises(PeerLost, match="lost stage 1 while it had to send its") as info:
        chans.begin({1: 1})  # posting the receive may already find the pair broken
        chans.recv(("gradient", 0, 1, 0), 30.0)
    assert info.value.peer == 1
    assert time.monotonic() - started < 20.0  # the connection closed: no timeout waited out
    assert peer.wait(30) == 0


def test_objects_travel_through_the_store_in_chunks():
    store, port = host_store("127.0.0.1", 10.0)
    client = connect_store("127.0.0.1", port, 10.0)
    big = {"x": torch.arange(3_000_000, dtype=torch.float32), "name": "stage 1"}  # 12 MB
    put_obj(client, "k", big)
    got = take_obj(store, "k", 10.0)
    assert torch.equal(got["x"], big["x"]) and got["name"] == "stage 1"
    assert not store.check(["k"])  # taken: removed
    with pytest.raises(StageFailure, match="nothing arrived"):
        take_obj(store, "missing", 0.2)


def test_a_message_sent_early_is_held_by_the_receiver_until_it_is_due(wire: str):
    """Emulated device time: neighbours on one machine read the same clock, so a message may
    leave as soon as it is computed and be held at the receiver until its due time."""
    chans = _world(2, wire)
    assert chans[0].can_hold(1) and chans[1].can_hold(0)
    hold = 0.05

    def stage(s: int) -> float:
        c = chans[s]
        c.begin({0: 1} if s == 1 else {})
        if s == 0:
            due = time.perf_counter() + hold
            c.send(("activation", 0, 0, 1), torch.ones(3), due)
            c.end()
            return due
        c.recv(("activation", 0, 0, 1), 10.0)
        got = time.perf_counter()
        c.end()
        return got

    due, got = _in_threads(2, stage)
    assert got >= due
    chans[0].begin({})
    chans[0].latency_s = 0.01
    assert not chans[0].can_hold(1)  # emulated latency: the sender holds messages itself
    for c in chans:
        c.close()


def test_messages_held_in_flight_by_emulated_latency_arrive_whole_and_in_order(wire: str):
    """With emulated latency a thread of the sender posts each message when its time in
    flight is over, beside the stage's own sends; large payloads need several writes."""
    chans = _world(2, wire)
    sent = [torch.arange(float(n)) for n in (5, 2_000_000, 7, 1_500_000)]

    def stage(s: int) -> None:
        c = chans[s]
        c.begin({1 - s: len(sent)}, latency_s=0.01)
        for i, t in enumerate(sent):
            c.send((("activation", "gradient")[s], i, s, 1 - s), t * (s + 1))
        for i, t in enumerate(sent):
            got = c.recv((("activation", "gradient")[1 - s], i, 1 - s, s), 10.0)
            assert torch.equal(got, t * (2 - s)), i
        c.end()

    _in_threads(2, stage)
    for c in chans:
        c.close()
