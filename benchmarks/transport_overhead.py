"""Per-message cost of the data paths between stages, 1 KiB to 4 MiB.

Two processes (or two Ray actors) bounce a float32 tensor back and forth; the time per
one-way message is the round trip / 2, median over repeats. Paths:

* ``gloo``: bare ``ProcessGroupGloo.send/recv`` of the tensor (the floor);
* ``channels unix``: aimcpipe's transport (:class:`aimcpipe.runtime.channels.Channels`:
  header + tensor, mailbox) over its unix-domain socket between processes of one machine —
  what the torch and Ray backends use there (``runtime.unix_sockets``, the default);
* ``channels gloo``: the same channels over gloo process groups (``unix_sockets: false``,
  and what stages on different machines use);
* ``ray channels``: the channels between two Ray actors (unix sockets: one machine);
* ``ray call``: an actor-to-actor call carrying the tensor (``ray.get(peer.echo.remote(x))``),
  the data path the Ray backend did not take.

The torch cases are interleaved in one pair of processes. Run::

    PYTHONPATH=. .venv/bin/python benchmarks/transport_overhead.py --repeats 5

Results: ``benchmarks/results/transport_overhead.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info

from aimcpipe.runtime.channels import Channels
from aimcpipe.runtime.rendezvous import connect_store, host_store

SIZES = [1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20]  # bytes
TIMEOUT = 60.0


def _messages(size: int) -> int:
    return 200 if size <= 64 << 10 else 50 if size <= 1 << 20 else 20


def _bare(rank: int, store: dist.Store) -> dist.ProcessGroupGloo:
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    opts._timeout = timedelta(seconds=TIMEOUT)
    return dist.ProcessGroupGloo(dist.PrefixStore("bare", store), rank, 2, opts)


def ping_gloo(rank: int, pg: dist.ProcessGroupGloo, size: int, n: int) -> float:
    x = torch.ones(size // 4)
    buf = torch.empty_like(x)
    peer = 1 - rank
    start = time.perf_counter()
    for _ in range(n):
        if rank == 0:
            pg.send([x], peer, 0).wait()
            pg.recv([buf], peer, 0).wait()
        else:
            pg.recv([buf], peer, 0).wait()
            pg.send([buf], peer, 0).wait()
    return (time.perf_counter() - start) / (2 * n)


def ping_channels(rank: int, ch: Channels, size: int, n: int) -> float:
    x = torch.ones(size // 4)
    ch.begin({1 - rank: n})
    start = time.perf_counter()
    for i in range(n):
        if rank == 0:
            ch.send(("activation", i, 0, 1), x)
            ch.recv(("gradient", i, 1, 0), TIMEOUT)
        else:
            y = ch.recv(("activation", i, 0, 1), TIMEOUT)
            ch.send(("gradient", i, 1, 0), y)
    elapsed = time.perf_counter() - start
    ch.end()
    return elapsed / (2 * n)


def torch_side(rank: int, port: int, repeats: int, store: dist.Store | None = None) -> dict:
    """Both processes run this in the same order; rank 0's times are returned."""
    store = store or connect_store("127.0.0.1", port, TIMEOUT)
    pg = _bare(rank, store)
    chans = {
        f"channels {wire}": Channels(
            store, rank, 2, prefix=f"bench-{wire}", timeout_s=TIMEOUT, unix_sockets=wire == "unix"
        )
        for wire in ("unix", "gloo")
    }
    out: dict[str, dict[int, list[float]]] = {"gloo": {}, **{name: {} for name in chans}}
    for size in SIZES:
        n = _messages(size)
        ping_gloo(rank, pg, size, 5)  # warm-up
        for ch in chans.values():
            ping_channels(rank, ch, size, 5)
        for _ in range(repeats):
            out["gloo"].setdefault(size, []).append(ping_gloo(rank, pg, size, n))
            for name, ch in chans.items():
                out[name].setdefault(size, []).append(ping_channels(rank, ch, size, n))
    for ch in chans.values():
        ch.close()
    return out


def ray_side(repeats: int) -> dict:
    import ray

    from aimcpipe.runtime.backends.ray_actors import init_ray

    started = init_ray(num_cpus=4)

    @ray.remote(num_cpus=1)
    class Peer:
        def setup(self, rank: int, port: int) -> None:
            self.rank = rank
            self.store = connect_store("127.0.0.1", port, TIMEOUT)
            self.ch = Channels(self.store, rank, 2, prefix="ray", timeout_s=TIMEOUT)

        def echo(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def calls(self, peer, size: int, n: int) -> float:
            x = torch.ones(size // 4)
            start = time.perf_counter()
            for _ in range(n):
                ray.get(peer.echo.remote(x))
            return (time.perf_counter() - start) / (2 * n)

        def channels(self, size: int, n: int) -> float:
            return ping_channels(self.rank, self.ch, size, n)

    server, port = host_store("127.0.0.1", TIMEOUT)
    a, b = Peer.remote(), Peer.remote()
    ray.get([a.setup.remote(0, port), b.setup.remote(1, port)])
    out: dict[str, dict[int, list[float]]] = {"ray channels": {}, "ray call": {}}
    for size in SIZES:
        n = _messages(size)
        ray.get([a.channels.remote(size, 5), b.channels.remote(size, 5)])
        ray.get(a.calls.remote(b, size, 5))
        for _ in range(repeats):
            t, _ = ray.get([a.channels.remote(size, n), b.channels.remote(size, n)])
            out["ray channels"].setdefault(size, []).append(t)
            out["ray call"].setdefault(size, []).append(ray.get(a.calls.remote(b, size, n)))
    del server
    if started:
        ray.shutdown()
    return out


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for path_name in dict.fromkeys(r["path"] for r in rows):
        pts = [(r["bytes"], r["median_us"]) for r in rows if r["path"] == path_name]
        ax.plot(*zip(*pts, strict=True), marker="o", label=path_name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("time per one-way message (µs, median)")
    ax.set_title("stage-to-stage data paths on loopback")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--peer", type=int, help=argparse.SUPPRESS)  # the second process
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.peer is not None:
        torch_side(1, args.peer, args.repeats)
        return
    store, port = host_store("127.0.0.1", TIMEOUT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    peer = subprocess.Popen(
        [sys.executable, __file__, "--peer", str(port), "--repeats", str(args.repeats)], env=env
    )
    times = torch_side(0, port, args.repeats, store)
    peer.wait(timeout=600)
    if not args.no_ray:
        times.update(ray_side(args.repeats))
    rows = []
    for name, by_size in times.items():
        for size, values in by_size.items():
            med = statistics.median(values)
            floor = statistics.median(times["gloo"][size])
            rows.append({
                "path": name, "bytes": size, "median_us": med * 1e6, "min_us": min(values) * 1e6,
                "max_us": max(values) * 1e6, "vs_gloo": med / floor,
            })  # fmt: skip
    print(f"{'path':14s} {'bytes':>8s} {'median µs':>10s} {'min':>8s} {'max':>8s} {'× gloo':>7s}")
    for r in rows:
        print(f"{r['path']:14s} {r['bytes']:8d} {r['median_us']:10.1f} {r['min_us']:8.1f} "
              f"{r['max_us']:8.1f} {r['vs_gloo']:7.2f}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "transport_overhead",
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/transport_overhead.py "
        f"--repeats {args.repeats}" + (" --no-ray" if args.no_ray else ""),
        "machine": machine_info(),
        "unit": "microseconds per one-way message (round trip / 2), median over repeats",
        "results": rows,
    }
    (args.out / "transport_overhead.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(rows, args.out / "transport_overhead.png")


if __name__ == "__main__":
    main()
