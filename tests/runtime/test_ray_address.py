"""Ray cluster addresses: parsed before anything starts, reached within a bounded time, and
a loopback address kept on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aimcpipe.errors import ConfigError
from aimcpipe.runtime.options import RayOptions
from aimcpipe.runtime.ray_address import (
    RayAddress,
    call_within,
    check_grpc,
    parse_ray_address,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text, host, port, loopback",
    [
        ("10.0.0.5:6379", "10.0.0.5", 6379, False),
        ("head.example.org:7000", "head.example.org", 7000, False),
        (" 127.0.0.1:6379 ", "127.0.0.1", 6379, True),
        ("127.0.0.2:1", "127.0.0.2", 1, True),
        ("localhost:65535", "localhost", 65535, True),
        ("[::1]:6379", "::1", 6379, True),
        ("[fe80::1]:6379", "fe80::1", 6379, False),
    ],
)
def test_cluster_addresses_are_read_with_their_host_and_port(text, host, port, loopback):
    address = parse_ray_address(text)
    assert (address.host, address.port, address.loopback) == (host, port, loopback)
    assert parse_ray_address(str(address)) == address  # what the backend hands Ray


def test_auto_is_the_cluster_started_on_this_machine():
    address = parse_ray_address("auto")
    assert address.auto and not address.loopback and str(address) == "auto"


@pytest.mark.parametrize("text", [3, "", "  ", "host:", ":6379", "a..b:1", "-a:1", "[::1]"])
def test_anything_else_is_a_config_error_naming_the_key(text):
    with pytest.raises(ConfigError, match=r"^ray\.address: "):
        parse_ray_address(text)


def test_ray_options_check_the_address_and_the_connect_timeout():
    assert RayOptions(address="10.0.0.5:6379").connect_timeout_s == 30.0
    with pytest.raises(ConfigError, match=r"^address: .*has no port"):
        RayOptions(address="10.0.0.5")
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ConfigError, match=r"^connect_timeout_s: must be a number > 0"):
            RayOptions(connect_timeout_s=bad)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when this returns: nothing listens there


def test_an_address_where_nothing_listens_fails_after_the_timeout_naming_it():
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        wait_for_port(RayAddress("127.0.0.1", port), 0.6)
    took = time.monotonic() - start
    message = str(info.value)
    assert message.startswith(f"ray.address: nothing answers at 127.0.0.1:{port} ("), message
    assert "TCP connection attempts" in message and "ray start --head" in message, message
    assert 0.6 <= took < 10.0  # it retried until the deadline, and stopped there


def test_an_address_that_listens_is_reached_at_once():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_for_port(RayAddress("127.0.0.1", server.getsockname()[1]), 30.0)


def test_a_host_that_does_not_exist_is_named():
    with pytest.raises(ConfigError, match=r"cannot find the host 'no-such-host\.invalid'"):
        wait_for_port(RayAddress("no-such-host.invalid", 6379), 5.0)


def test_a_port_that_speaks_no_grpc_is_told_apart_from_a_ray_head():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = RayAddress("127.0.0.1", server.getsockname()[1])
        with pytest.raises(ConfigError, match=r"does not answer as a Ray cluster does"):
            check_grpc(address, 0.3)


def test_call_within_gives_up_on_a_call_that_does_not_return():
    release = threading.Event()
    with pytest.raises(TimeoutError):
        call_within(lambda: release.wait(60), 0.05, "blocked")
    release.set()
    assert call_within(lambda: 42, 5.0, "quick") == 42
    with pytest.raises(KeyError):
        call_within(lambda: {}["x"], 5.0, "raises")  # the call's own error reaches the caller


# ---- with Ray: the whole command ------------------------------------------------------------


def _aimcpipe(*argv: str, timeout_s: float = 240.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "aimcpipe", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_train_on_an_unreachable_cluster_is_one_line_in_bounded_time(tmp_path):
    pytest.importorskip("ray")
    port = _closed_port()
    out = tmp_path / "out"
    done = _aimcpipe("train", "configs/digits-analog.yaml", "--backend", "ray",
                     "--ray-address", f"127.0.0.1:{port}", "--set", "ray.connect_timeout_s=1",
                     "--out", str(out))  # fmt: skip
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"aimcpipe train: error: --ray-address: nothing answers at "
                           f"127.0.0.1:{port}"), done.stderr  # fmt: skip
    assert "Traceback" not in done.stderr
    assert not (out / "results.json").exists()


def test_a_port_that_is_not_a_ray_cluster_is_given_up_on_in_time(tmp_path):
    """Something accepts the connection but never speaks Ray's protocol: without a bound,
    ``ray.init`` would retry for minutes."""
    pytest.importorskip("ray")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        port = server.getsockname()[1]
        done = _aimcpipe("train", "configs/digits-analog.yaml", "--backend", "ray",
                         "--ray-address", f"127.0.0.1:{port}", "--set",
                         "ray.connect_timeout_s=3", "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{port} accepts connections but does not answer as a Ray cluster" in last
    assert "ray.connect_timeout_s" in last and "Traceback" not in done.stderr, done.stderr


@pytest.fixture
def loopback_head(tmp_path):
    """A Ray head started with ``ray start --head --block`` on a free port (its own process
    group, so the whole cluster is stopped afterwards without touching any other Ray)."""
    pytest.importorskip("ray")
    port = _closed_port()
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("the ray command is not installed beside this Python")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [
            *(str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2"),
            *("--include-dashboard=false", "--disable-usage-stats"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(RayAddress("127.0.0.1", port), 120.0)
        yield port
    finally:  # the whole group at once: a graceful `ray stop` of one head takes ~30 s
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)


def test_a_cluster_joined_on_loopback_trains_like_the_local_backend(tmp_path, loopback_head):
    import torch

    common = ["configs/digits-analog.yaml", "--stages", "2", "--epochs", "1",
              "--set", "data.limit_train=256", "--set", "data.limit_test=64"]  # fmt: skip
    ray_run = _aimcpipe("train", *common, "--backend", "ray", "--ray-address",
                        f"127.0.0.1:{loopback_head}", "--out", str(tmp_path / "ray"))  # fmt: skip
    assert ray_run.returncode == 0, ray_run.stderr
    local_run = _aimcpipe("train", *common, "--backend", "local", "--out", str(tmp_path / "loc"))
    assert local_run.returncode == 0, local_run.stderr
    ray_weights = torch.load(tmp_path / "ray" / "model.pt", weights_only=True)
    local_weights = torch.load(tmp_path / "loc" / "model.pt", weights_only=True)
    assert ray_weights and _flat(ray_weights).keys() == _flat(local_weights).keys()
    for key, value in _flat(ray_weights).items():
        assert torch.equal(value, _flat(local_weights)[key]), key


def _flat(state, prefix=""):
    """Tensors of a nested state by their key path."""
    import torch

    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        pairs = [(f"{prefix}/{key}", sub) for key, sub in state.items()]
        return {k: v for path, sub in pairs for k, v in _flat(sub, path).items()}
    return {prefix: torch.tensor(float(state))} if isinstance(state, int | float) else {}
