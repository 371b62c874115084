"""Every backend trains exactly the weights of the in-process reference.

Each run here is a real multi-process pipeline: the torch backend's stages are separate
processes talking over gloo, the Ray backend's are actors. The same config and seed must
give bit-identical weights (and random states) on every backend, for every policy, with a
deterministic device and with a stochastic pulsed device with the paper's IO noise."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from aimcpipe.analog import AnalogConfig, convert
from aimcpipe.runtime import Dataset, Pipeline, load_dataset
from aimcpipe.runtime.options import RayOptions, RuntimeOptions
from aimcpipe.scheduler import POLICIES, build_schedule, order_metrics
from aimcpipe.stages import build_model

DETERMINISTIC = {"rule": "analog-sgd", "device": {"kind": "soft-bounds", "tau": 1.0}}
STOCHASTIC = {
    "rule": "analog-sgd",
    "device": {"kind": "soft-bounds", "tau": 1.0, "dw_min_std": 0.3, "dw_min_dtod": 0.2},
    "update": {"mode": "pulsed"},
    "forward": "paper",
    "backward": "paper",
}
B = 4  # samples per micro-batch


def _data(digits: tuple[Dataset, Dataset], microbatches: int) -> tuple[Dataset, Dataset]:
    train, test = digits
    per = microbatches * B
    return train.subset(torch.arange(3 * per + 1)), test.subset(torch.arange(37))


def _pipeline(
    device: dict[str, Any], stages: int, policy: str, microbatches: int, backend: Any, **kw: Any
) -> Pipeline:
    model = convert(build_model("digits-fcn", seed=1), AnalogConfig.from_dict(device), seed=1)
    return Pipeline(
        model, stages=stages, policy=policy, microbatches=microbatches, microbatch_size=B,
        lr=0.2, eval_batch_size=16, progress=False, backend=backend,
        runtime=RuntimeOptions(timeout_s=60), **kw,
    )  # fmt: skip


def _train(pipe: Pipeline, data: tuple[Dataset, Dataset]) -> tuple[dict[str, Any], dict]:
    with pipe:
        metrics = pipe.fit(data[0], data[1], epochs=2).to_dict()
        return pipe.state_dict(), metrics


@functools.cache
def _reference(device_key: str, stages: int, policy: str, microbatches: int, stash: bool):
    """The local backend's run of the same config (computed once)."""
    device = DETERMINISTIC if device_key == "det" else STOCHASTIC
    data = _data(load_dataset("digits", seed=0), microbatches)
    pipe = _pipeline(device, stages, policy, microbatches, "local", weight_stashing=stash)
    return _train(pipe, data)


def largest_difference(a: Any, b: Any) -> float:
    """0.0 when identical; the largest absolute difference of matching tensors otherwise
    (inf for anything that does not match at all)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        if torch.equal(a, b):
            return 0.0
        return float((a.double() - b.double()).abs().max()) if a.is_floating_point() else 1.0
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return float("inf")
        return max((largest_difference(a[k], b[k]) for k in a), default=0.0)
    return 0.0 if a == b else float("inf")


def _check(got: tuple[dict, dict], want: tuple[dict, dict], schedule_args: tuple) -> None:
    (weights, metrics), (ref_weights, ref_metrics) = got, want
    assert largest_difference(weights, ref_weights) == 0.0
    assert metrics["final"] == ref_metrics["final"]  # losses and accuracies, evaluation too
    expected = order_metrics(build_schedule(*schedule_args))
    assert metrics["staleness"] == list(expected.staleness)
    assert metrics["peak_stash"] == list(expected.peak_stash)
    assert metrics["cycles"] == ref_metrics["cycles"]


@pytest.mark.slow
@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_torch_backend_runs_every_policy_with_fewer_and_more_microbatches_than_stages(
    torch_pool, digits, stages, policy
):
    """No deadlock for Bm < S nor Bm > S (neighbours send to each other at once in 1F1B),
    and the weights are the local backend's."""
    for microbatches in (stages - 1, stages + 1):
        data = _data(digits, microbatches)
        got = _train(
            _pipeline(DETERMINISTIC, stages, policy, microbatches, torch_pool(stages)), data
        )
        want = _reference("det", stages, policy, microbatches, False)
        _check(got, want, (policy, stages, microbatches, 3))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "ray"])
@pytest.mark.parametrize("stages", [2, 4])
def test_a_stochastic_device_trains_identically_on_every_backend(request, digits, backend, stages):
    """Pulsed updates with cycle-to-cycle and device-to-device noise and the paper's IO
    noise: every random stream is a stage's own, drawn in its schedule order."""
    pool = request.getfixturevalue(f"{backend}_pool")(stages)
    for policy in POLICIES:
        microbatches = 3
        data = _data(digits, microbatches)
        got = _train(_pipeline(STOCHASTIC, stages, policy, microbatches, pool), data)
        want = _reference("sto", stages, policy, microbatches, False)
        _check(got, want, (policy, stages, microbatches, 3))


@pytest.mark.slow
@pytest.mark.parametrize("stages", [2, 4])
def test_ray_backend_matches_local_for_every_policy(ray_pool, digits, stages):
    for policy in POLICIES:
        data = _data(digits, 2)
        got = _train(_pipeline(DETERMINISTIC, stages, policy, 2, ray_pool(stages)), data)
        _check(got, _reference("det", stages, policy, 2, False), (policy, stages, 2, 3))


def test_gloo_channels_train_the_weights_unix_sockets_do(digits):
    """``runtime.unix_sockets: false``: stages on one machine talk over gloo process groups
    instead (the pooled backends use the sockets); the weights are the same."""
    from aimcpipe.runtime.backends import make_backend

    backend = make_backend("torch", RuntimeOptions(timeout_s=60, unix_sockets=False))
    try:
        got = _train(_pipeline(STOCHASTIC, 2, "sync-1f1b", 3, backend), _data(digits, 3))
    finally:
        backend.close()
    _check(got, _reference("sto", 2, "sync-1f1b", 3, False), ("sync-1f1b", 2, 3, 3))


def test_weight_stashing_trains_identically_in_stage_processes(torch_pool, digits):
    data = _data(digits, 3)
    got = _train(_pipeline(STOCHASTIC, 4, "async", 3, torch_pool(4), weight_stashing=True), data)
    want = _reference("sto", 4, "async", 3, True)
    assert largest_difference(got[0], want[0]) == 0.0
    assert got[1]["staleness"] == [3, 2, 1, 0]  # observed; the backward ran on stashed weights


def test_the_merged_trace_respects_causality_across_processes(torch_pool, digits):
    """Clocks are aligned: a stage's F(n) starts after the previous stage's F(n) ended and
    its B(n) after the next stage's B(n) ended, in every process's own measurements."""
    data = _data(digits, 3)
    pipe = _pipeline(DETERMINISTIC, 4, "sync-1f1b", 3, torch_pool(4))
    with pipe:
        pipe.fit(data[0], epochs=1)
        records = pipe._trace
    assert records is not None and len(records) == 4
    times = {
        (r.action.kind, s, r.action.microbatches): r for s, recs in enumerate(records) for r in recs
    }
    for (kind, s, mbs), r in times.items():
        assert r.end >= r.start >= 0
        if kind == "F" and s > 0:
            assert r.start >= times["F", s - 1, mbs].end
        if kind == "B" and s < 3:
            assert r.start >= times["B", s + 1, mbs].end


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "ray"])
def test_stages_on_cuda_train_the_local_cuda_weights(digits, backend):
    """With CUDA every stage lives on a GPU (shared by all stages when there is one): the
    weights equal the local backend's on the same device type (random streams differ between
    CPU and CUDA, so the reference is the local backend on CUDA too)."""
    if backend == "ray":
        pytest.importorskip("ray")
    data = _data(digits, 3)
    cuda = RuntimeOptions(timeout_s=120, device="cuda")

    def run(name: str) -> tuple[dict, dict]:
        # Ray shows an actor only the GPUs it asked for: two stages share one GPU
        kw = {"ray": RayOptions(num_gpus=0.5)} if name == "ray" else {}
        pipe = _pipeline(STOCHASTIC, 2, "async", 3, name, **kw)
        pipe.runtime = cuda
        return _train(pipe, data)

    got, want = run(backend), run("local")
    assert largest_difference(got[0], want[0]) == 0.0
    assert got[1]["final"] == want[1]["final"]
