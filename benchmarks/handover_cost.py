"""Cost of a hand-over on our unix-socket channels with caches cold, as between two actions.

Two processes, 400 round trips of a 32 × 512 float32 tensor (64 KiB, the benchmark-2
activation). Rank 0 does four 32 × 512 × 512 GEMMs, computes the activation and sends it,
does six more GEMMs and then receives the gradient, which has arrived by then. Rank 1
receives, computes and sends back. It reports the medians (the first 50 round trips left
out) of rank 0's ``send``, of rank 0's ``recv`` of the already-arrived message, and of rank
1's ``send``. A/B two trees by alternating::

    for t in OLD_TREE .; do PYTHONPATH=$t .venv/bin/python benchmarks/handover_cost.py; done

It prints one JSON line and writes no file: it is for comparing code side by side on one
machine, not a recorded result."""

import json
import statistics
import time

import torch
import torch.multiprocessing as mp

from aimcpipe.runtime.channels import Channels
from aimcpipe.runtime.rendezvous import connect_store, host_store

N = 400


def side(rank: int, port: int, q) -> None:
    torch.set_num_threads(1)
    store = connect_store("127.0.0.1", port, 60)
    ch = Channels(store, rank, 2, prefix="h", timeout_s=60, unix_sockets=True)
    W = torch.randn(512, 512)
    X = torch.randn(32, 512)
    ts, tr = [], []
    ch.begin({1 - rank: N})
    for i in range(N):
        for _ in range(4):
            X @ W
        if rank == 0:
            y = torch.relu(X @ W)
            t0 = time.perf_counter()
            ch.send(("activation", i, 0, 1), y)
            ts.append(time.perf_counter() - t0)
            for _ in range(6):
                X @ W
            t0 = time.perf_counter()
            ch.recv(("gradient", i, 1, 0), 60)
            tr.append(time.perf_counter() - t0)
        else:
            t0 = time.perf_counter()
            x = ch.recv(("activation", i, 0, 1), 60)
            tr.append(time.perf_counter() - t0)
            y = torch.relu(x @ W)
            t0 = time.perf_counter()
            ch.send(("gradient", i, 1, 0), y)
            ts.append(time.perf_counter() - t0)
    ch.end()
    ch.close()
    q.put((rank, 1e6 * statistics.median(ts[50:]), 1e6 * statistics.median(tr[50:])))


def main() -> None:
    server, port = host_store("127.0.0.1", 60)  # kept alive while the two sides run
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=side, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    del server
    print(
        json.dumps(
            {
                "send_us_rank0": round(res[0][1], 1),
                "recv_arrived_us_rank0": round(res[0][2], 1),
                "send_us_rank1": round(res[1][1], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
