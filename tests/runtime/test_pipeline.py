"""Pipeline (the in-process backend and Python API): end-to-end training facts."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from aimcpipe.analog import AnalogConfig, DeviceConfig, convert
from aimcpipe.errors import AimcpipeError, ConfigError
from aimcpipe.runtime import Dataset, LRSchedule, Pipeline, epoch_order, load_dataset
from aimcpipe.scheduler import CostModel, build_schedule, order_metrics, simulate
from aimcpipe.stages import build_model

ALD = AnalogConfig(rule="analog-sgd", device=DeviceConfig(kind="soft-bounds", tau=1.0))


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_dataset("digits", seed=0)


def _small(data: Dataset, count: int) -> Dataset:
    return data.subset(torch.arange(count))


def _analog_fcn(config: AnalogConfig = ALD, seed: int = 0) -> nn.Module:
    return convert(build_model("digits-fcn", seed=seed), config, seed=seed)


def _weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {k: v for k, v in pipe.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_wop_pipeline_equals_torch_sgd_on_a_digital_model(digits):
    """A digital torch model under wop is plain mini-batch SGD (torch.optim.SGD)."""
    train, _ = digits
    train = _small(train, 256)
    base = build_model("digits-fcn", seed=3)
    pipe = Pipeline(
        copy.deepcopy(base), stages=4, policy="wop", microbatches=4, microbatch_size=8,
        lr=0.1, progress=False,
    )  # fmt: skip
    pipe.fit(train, epochs=2)
    ref = copy.deepcopy(base)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for epoch in range(2):
        order = epoch_order(len(train), 0, epoch)
        for start in range(0, len(train) - 31, 32):
            idx = order[start : start + 32]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ref(train.x[idx]), train.y[idx])
            loss.backward()
            opt.step()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(pipe.state_dict()[key], value, atol=1e-6, rtol=1e-5)


def test_same_config_and_seed_give_identical_weights(digits):
    train, _ = digits
    train = _small(train, 192)
    config = AnalogConfig.from_dict(
        {
            "rule": "analog-sgd",
            "device": {"kind": "soft-bounds", "tau": 1.0, "dw_min_std": 0.3, "dw_min_dtod": 0.2},
            "update": {"mode": "pulsed"},
            "forward": "paper",
            "backward": "paper",
        }
    )
    runs = []
    for _ in range(2):
        pipe = Pipeline(
            _analog_fcn(config), stages=4, policy="async", microbatches=2, microbatch_size=8,
            progress=False,
        )  # fmt: skip
        pipe.fit(train, epochs=1)
        runs.append(_weights(pipe))
    _assert_equal(*runs)


@pytest.mark.parametrize("policy", ["wop", "sync-1f1b", "async"])
def test_metrics_match_the_simulator(digits, policy):
    train, test = digits
    train = _small(train, 160)
    costs = CostModel(forward=1, backward=2, update=1)
    pipe = Pipeline(
        _analog_fcn(), stages=4, policy=policy, microbatches=5, microbatch_size=8,
        costs=costs, progress=False,
    )  # fmt: skip
    metrics = pipe.fit(train, _small(test, 50), epochs=2).to_dict()
    schedule = build_schedule(policy, 4, 5, 4)  # 160 samples = 4 mini-batches of 5×8
    expected = order_metrics(schedule)
    assert metrics["peak_stash"] == list(expected.peak_stash)
    assert metrics["staleness"] == list(expected.staleness)
    if policy == "async":
        assert metrics["staleness"] == [3, 2, 1, 0]
    sim = simulate(schedule, costs)
    assert metrics["cycles"]["makespan"] == 2 * sim.makespan
    assert metrics["cycles"]["utilization"] == pytest.approx(list(sim.utilization))
    assert metrics["samples"] == 320
    assert len(metrics["measured"]["utilization"]) == 4
    assert 0 <= metrics["final"]["test_accuracy"] <= 1


def test_resume_equals_uninterrupted(tmp_path, digits):
    train, test = digits
    train, test = _small(train, 128), _small(test, 40)
    config = AnalogConfig(
        rule="tiki-taka", device=DeviceConfig(kind="soft-bounds", tau=1.0, dw_min_std=0.2)
    )

    def make(out):
        return Pipeline(
            _analog_fcn(config), stages=2, policy="async", microbatches=2, microbatch_size=8,
            lr=0.2, lr_schedule=LRSchedule(kind="step", step_epochs=2, gamma=0.5),
            out=out, checkpoint_every=1, progress=False,
        )  # fmt: skip

    whole = make(tmp_path / "whole")
    whole.fit(train, test, epochs=3)
    first = make(tmp_path / "part")
    first.fit(train, test, epochs=2)  # "interrupted" after epoch 2 (its checkpoint is saved)
    resumed = make(tmp_path / "part")  # a new process would build the same, then load
    resumed.load_checkpoint(tmp_path / "part")
    assert resumed.epoch == 2
    resumed.fit(train, test, epochs=3)
    _assert_equal(_weights(whole), _weights(resumed))
    history = (tmp_path / "part" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2, 3]
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert a["final"] == b["final"]
    assert a["cycles"] == b["cycles"]
    assert a["staleness"] == b["staleness"]


def test_checkpoint_of_another_partition_is_refused(tmp_path, digits):
    train, _ = digits
    pipe = Pipeline(
        _analog_fcn(), stages=2, microbatches=2, microbatch_size=8, out=tmp_path / "a",
        progress=False,
    )  # fmt: skip
    pipe.fit(_small(train, 32), epochs=1)
    other = Pipeline(_analog_fcn(), stages=4, microbatches=2, microbatch_size=8, progress=False)
    with pytest.raises(ConfigError, match="partition"):
        other.load_checkpoint(tmp_path / "a")


def test_a_model_with_a_blocks_list_trains(digits):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(
                [nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh()), nn.Linear(32, 10)]
            )

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    train, test = digits
    torch.manual_seed(0)
    pipe = Pipeline(
        Net(), stages=2, policy="sync-1f1b", microbatches=4, microbatch_size=16, lr=0.2,
        progress=False,
    )  # fmt: skip
    before = pipe.evaluate(test)["accuracy"]
    pipe.fit(train, test, epochs=3)
    after = pipe.evaluate(test)["accuracy"]
    assert after > 0.8 > before
    assert set(pipe.state_dict()) == set(pipe.model.state_dict())


def test_default_costs_charge_each_stage_for_its_layers(digits):
    """F = B = U = 1 per layer: cutting the 4-layer model into more stages shortens each
    stage's actions; an unbalanced split makes its heavy stage the bottleneck; the run's
    cycles are the simulator's for those per-stage costs."""
    train, _ = digits
    train = _small(train, 64)

    def costs(**kwargs):
        pipe = Pipeline(_analog_fcn(), microbatches=2, microbatch_size=8, progress=False, **kwargs)
        return pipe, pipe.costs.per_stage(pipe.num_stages)

    assert costs(stages=1)[1] == ((4,), (4,), (4,))
    assert costs(stages=2)[1] == ((2, 2), (2, 2), (2, 2))
    assert costs(stages=4)[1] == ((1,) * 4,) * 3
    pipe, per_stage = costs(stages=2, partition=[3, 1])
    assert per_stage == ((3, 1), (3, 1), (3, 1))
    assert costs(stages=2, costs=CostModel())[1] == ((1, 1), (1, 1), (1, 1))  # per stage
    metrics = pipe.fit(train, epochs=1).to_dict()
    sim = simulate(
        build_schedule("sync-1f1b", 2, 2, 4),
        CostModel(forward=(3, 1), backward=(3, 1), update=(3, 1)),
    )
    balanced = simulate(build_schedule("sync-1f1b", 2, 2, 4), CostModel(2, 2, 2))
    assert metrics["cycles"]["makespan"] > balanced.makespan  # the 3-layer stage sets the pace
    assert metrics["cycles"]["busy"] == list(sim.busy)
    assert metrics["cycles"]["makespan"] == sim.makespan
    assert metrics["cycles"]["utilization"][0] > metrics["cycles"]["utilization"][1]


def test_too_little_data_is_a_config_error(digits):
    train, _ = digits
    pipe = Pipeline(_analog_fcn(), stages=2, microbatches=8, microbatch_size=16, progress=False)
    with pytest.raises(ConfigError, match="fewer than one mini-batch"):
        pipe.fit(_small(train, 100), epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "1f1b"}, "pipeline.policy"),
        ({"microbatches": 0}, "pipeline.microbatches"),
        ({"lr": -1}, "optim.lr"),
        ({"policy": "wop", "weight_stashing": True}, "weight_stashing"),
        ({"stages": 5}, "5 stages"),
        ({"stages": 2, "partition": [3, 2]}, "partition"),
        ({"loss": "hinge"}, "loss"),
        ({"costs": "F=1"}, "costs: must be a CostModel"),
        ({"stages": 2, "costs": CostModel(forward=(1, 2, 3))}, "cost.forward: 3 per-stage"),
    ],
)
def test_bad_settings_are_one_line_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        Pipeline(_analog_fcn(), progress=False, **kwargs)
    assert "\n" not in str(info.value)


def test_lr_schedule_steps():
    step = LRSchedule(kind="step", step_epochs=100, gamma=0.1)
    assert [step.lr_at(0.1, e) for e in (0, 99, 100, 250)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    milestones = LRSchedule(kind="step", milestones=(2, 5), gamma=0.5)
    assert [milestones.lr_at(1.0, e) for e in range(6)] == [1, 1, 0.5, 0.5, 0.5, 0.25]
    with pytest.raises(ConfigError):
        LRSchedule(kind="step")
    with pytest.raises(ConfigError):
        LRSchedule(kind="constant", step_epochs=3)


def test_dropout_streams_belong_to_their_stage(digits):
    """Each stage draws from its own random state: the run is reproducible and does not
    consume (or depend on) the process's global torch generator."""
    train, _ = digits

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            OrderedDict(
                a=nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.3)),
                b=nn.Sequential(nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 10)),
            )
        )

    results = []
    for global_seed in (1, 2):
        pipe = Pipeline(build(), stages=2, microbatches=2, microbatch_size=8, progress=False)
        torch.manual_seed(global_seed)
        pipe.fit(_small(train, 64), epochs=1)
        results.append(_weights(pipe))
        untouched = torch.rand(3, generator=torch.Generator().manual_seed(global_seed))
        assert torch.equal(torch.rand(3), untouched)
    _assert_equal(*results)


@pytest.mark.slow
def test_digits_analog_fcn_in_four_stages_learns_under_every_policy(digits):
    """The issue's acceptance run: asymmetric (soft-bounds, τ=1) analog FCN in 4 stages.
    Every policy learns; async ends within 1.5 points of sync-1f1b; digital SGD ≥ 95 %."""
    train, test = digits
    accuracy = {}
    for rule in ("analog-sgd", "digital-sgd"):
        for policy in ("wop", "sync-1f1b", "async"):
            if rule == "digital-sgd" and policy != "sync-1f1b":
                continue
            pipe = Pipeline(
                _analog_fcn(AnalogConfig(rule=rule, device=ALD.device)), stages=4,
                policy=policy, microbatches=4, microbatch_size=8, lr=0.1,
                lr_schedule=LRSchedule(kind="step", step_epochs=5, gamma=0.5), progress=False,
            )  # fmt: skip
            accuracy[rule, policy] = pipe.fit(train, test, epochs=15).final["test_accuracy"]
    analog = {p: a for (r, p), a in accuracy.items() if r == "analog-sgd"}
    assert all(a > 0.85 for a in analog.values()), accuracy
    assert abs(analog["async"] - analog["sync-1f1b"]) <= 0.015, accuracy
    assert accuracy["digital-sgd", "sync-1f1b"] >= 0.95, accuracy
    # at equal step size (async applies one micro-batch per U, sync the mean of Bm = 4, so
    # async at lr/4) the staleness costs no accuracy either
    pipe = Pipeline(
        _analog_fcn(ALD), stages=4, policy="async", microbatches=4, microbatch_size=8,
        lr=0.025, lr_schedule=LRSchedule(kind="step", step_epochs=5, gamma=0.5), progress=False,
    )  # fmt: skip
    equal_step = pipe.fit(train, test, epochs=15).final["test_accuracy"]
    assert abs(equal_step - analog["sync-1f1b"]) <= 0.015, (equal_step, accuracy)


def test_evaluation_never_changes_training(digits):
    """Evaluation draws IO noise from streams of its own: evaluating or not, on any data, in
    any chunk size, gives the same trained weights."""
    train, test = digits
    train = _small(train, 96)
    config = AnalogConfig.from_dict(
        {"rule": "analog-sgd", "device": {"tau": 1.0}, "forward": "paper", "backward": "paper"}
    )
    runs = []
    for eval_test, chunk in ((None, 256), (test, 256), (_small(test, 33), 7)):
        pipe = Pipeline(
            _analog_fcn(config), stages=2, policy="async", microbatches=2, microbatch_size=8,
            eval_batch_size=chunk, progress=False,
        )  # fmt: skip
        pipe.fit(train, eval_test, epochs=2)
        runs.append(_weights(pipe))
    _assert_equal(runs[0], runs[1])
    _assert_equal(runs[0], runs[2])


def test_digital_rule_tiles_train_exactly_like_torch_sgd(digits):
    """An independent check of the update scale: tiles with the digital-sgd rule (ideal
    device) under sync-1f1b must follow torch.optim.SGD on the unconverted model."""
    train, _ = digits
    train = _small(train, 192)
    base = build_model("digits-fcn", seed=5)
    analog = convert(copy.deepcopy(base), AnalogConfig(rule="digital-sgd"), seed=5)
    pipe = Pipeline(
        analog, stages=4, policy="sync-1f1b", microbatches=3, microbatch_size=8, lr=0.2,
        progress=False,
    )  # fmt: skip
    pipe.fit(train, epochs=1)
    ref = copy.deepcopy(base)
    opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    order = epoch_order(len(train), 0, 0)
    for start in range(0, len(train), 24):
        idx = order[start : start + 24]
        opt.zero_grad()
        nn.functional.cross_entropy(ref(train.x[idx]), train.y[idx]).backward()
        opt.step()
    got = pipe.state_dict()
    for key, value in ref.state_dict().items():
        mine = (
            got[key.replace(".weight", ".analog.tile.weight")]
            if key.endswith("weight")
            else got[key]
        )
        torch.testing.assert_close(mine, value, atol=1e-5, rtol=1e-4, msg=key)


def test_async_one_stage_equals_wop_one_microbatch_per_minibatch(digits):
    train, _ = digits
    train = _small(train, 256)  # divisible by both mini-batch sizes: the same samples train
    a = Pipeline(_analog_fcn(), stages=1, policy="async", microbatches=4, microbatch_size=8,
                 progress=False)  # fmt: skip
    w = Pipeline(_analog_fcn(), stages=1, policy="wop", microbatches=1, microbatch_size=8,
                 progress=False)  # fmt: skip
    a.fit(train, epochs=2)
    w.fit(train, epochs=2)
    _assert_equal(_weights(a), _weights(w))


def test_an_interrupted_continuation_does_not_look_complete(tmp_path, digits, monkeypatch):
    train, _ = digits
    train = _small(train, 32)
    make = lambda: Pipeline(  # noqa: E731
        _analog_fcn(), stages=2, microbatches=2, microbatch_size=8, out=tmp_path / "run",
        progress=False,
    )  # fmt: skip
    make().fit(train, epochs=1)
    assert (tmp_path / "run" / "metrics.json").is_file()
    again = make()
    again.load_checkpoint(tmp_path / "run")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(again, "train_epoch", boom)
    with pytest.raises(KeyboardInterrupt):
        again.fit(train, epochs=3)
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    with pytest.raises(ConfigError, match="not empty"):
        make().fit(train, epochs=1)  # a fresh pipeline never writes over an earlier run


def test_defaults_and_limits_of_the_api(digits):
    pipe = Pipeline(_analog_fcn(), progress=False)
    assert pipe.num_stages == 1  # no stage count: one stage
    assert Pipeline(_analog_fcn(), partition=[2, 2], progress=False).num_stages == 2
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        Pipeline(_analog_fcn(), lr=float("inf"), progress=False)


def test_a_diverging_run_stops_with_one_line(digits, tmp_path):
    train, _ = digits
    pipe = Pipeline(
        build_model("digits-fcn", {"activation": "relu"}), stages=2, microbatches=2,
        microbatch_size=8, lr=1e30,
        out=tmp_path / "run", progress=False,
    )  # fmt: skip
    with pytest.raises(AimcpipeError, match="diverged in epoch 1") as info:
        pipe.fit(_small(train, 64), epochs=3)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_the_stages_hold_only_the_last_few_datasets(digits):
    train, test = digits
    pipe = Pipeline(_analog_fcn(), stages=2, microbatches=2, microbatch_size=8, progress=False)
    pipe.fit(_small(train, 32), _small(test, 10), epochs=1)
    parts = [_small(test, n) for n in (3, 4, 5, 6)]
    results = [pipe.evaluate(p)["loss"] for p in parts]
    held = pipe.backend.workers[0].data
    assert len(held) == 3  # the three used last
    assert [pipe.evaluate(p)["loss"] for p in parts] == results  # placed again when needed
