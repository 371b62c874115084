"""A stage's data feed: micro-batches gathered a block at a time, each the plan's samples."""

from __future__ import annotations

import types

import pytest
import torch

from aimcpipe.runtime import worker
from aimcpipe.runtime.transport import DRIVER


@pytest.mark.parametrize("block_bytes", [1, 600, 1 << 20])
def test_feed_gives_each_microbatch_in_the_plans_order(monkeypatch, block_bytes):
    monkeypatch.setattr(worker, "FEED_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 3, generator=gen), torch.randint(0, 9, (50,), generator=gen)
    order = torch.randperm(50, generator=gen)
    b = 4  # 13 micro-batches, the last of 2 samples
    host = types.SimpleNamespace(
        data={"train": worker.StageData(x, y)}, device=torch.device("cpu"), index=0
    )
    plan = types.SimpleNamespace(data="train", order=order, microbatch_size=b)
    feed = worker.StageWorker._feed(host, plan)
    for n in [*range(13), 5, 0, 12, 3]:  # in order, then back and forth
        idx = order[n * b : (n + 1) * b]
        assert torch.equal(feed(("input", n, DRIVER, 0)), x[idx])
        assert torch.equal(feed(("target", n, DRIVER, 0)), y[idx])
    assert feed(("input", 12, DRIVER, 0)).shape == (2, 3)
