"""Channels: point-to-point messages between stages over real gloo process groups.

The stages are threads of this process here (each with its own channels, as a process would
have): the protocol, ordering, timeouts and errors are what is tested, quickly."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from aimcpipe.errors import StageFailure
from aimcpipe.runtime.channels import Channels, PeerLost, PeerTimeout
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


def _world(count: int, timeout_s: float = 10.0) -> list[Channels]:
    store, port = host_store("127.0.0.1", timeout_s)
    stores = [store] + [connect_store("127.0.0.1", port, timeout_s) for _ in range(count - 1)]
    return _in_threads(
        count, lambda s: Channels(stores[s], s, count, prefix="t", timeout_s=timeout_s)
    )


def test_neighbours_sending_to_each_other_at_once_get_everything_in_order():
    """Every stage sends all its activations and gradients before receiving anything —
    the pattern that deadlocks blocking sends — with assorted dtypes, shapes and None."""
    count, n_msgs = 4, 30
    chans = _world(count)

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


def test_a_message_that_never_comes_times_out_naming_the_peer():
    chans = _world(2, timeout_s=5.0)
    chans[0].begin({1: 1})
    started = time.monotonic()
    with pytest.raises(PeerTimeout, match="no gradient of micro-batch 0 from stage 1") as info:
        chans[0].recv(("gradient", 0, 1, 0), 0.3)
    assert info.value.peer == 1
    assert time.monotonic() - started < 5.0
    for c in chans:
        c.close()


def test_a_message_sent_but_not_taken_fails_the_phase_end():
    chans = _world(2)
    chans[1].begin({0: 1})
    chans[0].begin({})
    chans[0].send(("activation", 0, 0, 1), torch.ones(2))
    chans[0].end()
    deadline = time.monotonic() + 10
    while not chans[1].ready(("activation", 0, 0, 1)) and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(StageFailure, match="never used"):
        chans[1].end()
    for c in chans:
        c.close()


def test_a_broken_connection_is_reported_as_a_lost_peer():
    """When a neighbour's sockets close (its process died), a waiting stage fails at once
    instead of waiting out its timeout."""
    chans = _world(2, timeout_s=30.0)
    chans[0].begin({1: 1})
    for pair in list(chans[1]._in.values()) + list(chans[1]._out.values()):
        del pair.pg  # the only reference: gloo closes the pair's sockets
    chans[1]._in.clear()
    chans[1]._out.clear()
    started = time.monotonic()
    with pytest.raises(PeerLost, match="lost stage 1"):
        chans[0].recv(("gradient", 0, 1, 0), 30.0)
    assert time.monotonic() - started < 15.0


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
