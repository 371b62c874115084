"""``aimcpipe train`` under torchrun: one node, two nodes (two launchers on loopback), and
the one-line errors of a world that does not fit the job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aimcpipe.launch.train import train
from tests.runtime.test_backends import largest_difference

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "digits-analog.yaml")
SMALL = [
    "data.limit_train=96",
    "data.limit_test=30",
    "epochs=2",
    "pipeline.microbatches=3",
    "pipeline.microbatch_size=8",
    "pipeline.stages=2",
    "pipeline.policy=sync-1f1b",
]
SETS = [arg for o in SMALL for arg in ("--set", o)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _train_args(out: Path, *extra: str) -> list[str]:
    return ["-m", "aimcpipe", "train", CONFIG, "--backend", "torch", "--out", str(out),
            "--no-progress", *SETS, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("local") / "run"
    train(CONFIG, out=out, overrides=SMALL, progress=False)
    return torch.load(out / "model.pt", weights_only=True)


@pytest.mark.slow
def test_torchrun_on_one_node_trains_the_local_weights(tmp_path, local_weights):
    out = tmp_path / "run"
    proc = _torchrun("--nproc-per-node", "2", "--master-port", str(_port()), *_train_args(out))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "sync-1f1b on 2 stage(s)" in stdout  # rank 0 reports; the other rank is silent
    weights = torch.load(out / "model.pt", weights_only=True)
    assert largest_difference(weights, local_weights) == 0.0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint.pt", "config.yaml", "curves.png", "history.jsonl", "metrics.json",
         "model.pt", "partition.json", "trace.json"]
    )  # fmt: skip


@pytest.mark.slow
def test_torchrun_on_two_nodes_trains_the_local_weights(tmp_path, local_weights):
    """Two launchers (two 'nodes' of one rank each) meeting at a loopback endpoint."""
    out = tmp_path / "run"
    port = str(_port())
    nodes = [
        _torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                  "--master-addr", "127.0.0.1", "--master-port", port, *_train_args(out))
        for rank in (0, 1)
    ]  # fmt: skip
    results = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results
    weights = torch.load(out / "model.pt", weights_only=True)
    assert largest_difference(weights, local_weights) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stages", "4"], "--stages: torchrun started 2 processes (WORLD_SIZE=2) but "
         "the model is cut into 4 stage(s); start torchrun with --nproc-per-node/--nnodes "
         "making 4 processes in all, or --stages 2"),
        (["--backend", "local"], "--backend: running under torchrun (WORLD_SIZE=2) "
         "needs the torch backend, not local; add --backend torch"),
    ],
)  # fmt: skip
def test_a_world_that_does_not_fit_is_one_line(tmp_path, extra, message):
    proc = _torchrun("--nproc-per-node", "2", "--master-port", str(_port()),
                     *_train_args(tmp_path / "run", *extra))  # fmt: skip
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert f"aimcpipe train: error: {message}" in stderr, stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_a_dry_run_under_torchrun_lets_every_rank_go(tmp_path):
    proc = _torchrun("--nproc-per-node", "2", "--master-port", str(_port()), "-m", "aimcpipe",
                     "train", CONFIG, "--backend", "torch", *SETS, "--dry-run")  # fmt: skip
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "policy sync-1f1b" in stdout
