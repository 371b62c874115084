"""Stage + interpreter on the in-process transport: the numerical facts of docs/design.md §4."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aimcpipe.analog import AnalogConfig, AnalogSGD, DeviceConfig, UpdateConfig, convert
from aimcpipe.errors import ScheduleError
from aimcpipe.runtime.interpreter import Interpreter, run_local
from aimcpipe.runtime.transport import LocalTransport
from aimcpipe.scheduler import Action, Schedule, build_schedule, order_metrics
from aimcpipe.stages.stage import Stage

B = 4  # micro-batch size
ASYMMETRIC = AnalogConfig(
    rule="analog-sgd",
    device=DeviceConfig(kind="soft-bounds", tau=1.0),
    update=UpdateConfig(mode="expected", granularity="sample"),
)


def _model(config: AnalogConfig | None = ASYMMETRIC, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    digital = nn.Sequential(
        nn.Sequential(nn.Linear(6, 8), nn.Tanh()),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.Linear(8, 3),
    )
    return digital if config is None else convert(digital, config, seed=seed)


def _data(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and learnable labels (the argmax of a fixed linear map)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(count * B, 6, generator=g)
    return x, (x @ torch.randn(6, 3, generator=g)).argmax(dim=1)


def _run(model: nn.Sequential, schedule: Schedule, lr: float = 0.2) -> list[Stage]:
    """Execute ``schedule`` on ``model``'s blocks split evenly over its stages."""
    blocks = [(str(i), m) for i, m in enumerate(model)]
    s_count = schedule.num_stages
    per = len(blocks) // s_count
    stages = [
        Stage(
            s,
            s_count,
            blocks[s * per : (s + 1) * per] if s < s_count - 1 else blocks[s * per :],
            lr=lr,
            loss_fn=F.cross_entropy if s == s_count - 1 else None,
            weight_stashing=schedule.weight_stashing,
        )
        for s in range(s_count)
    ]
    x, y = _data(schedule.num_microbatches)

    def feed(key):
        kind, n, _, _ = key
        return (x if kind == "input" else y)[n * B : (n + 1) * B]

    transport = LocalTransport(feed)
    run_local([Interpreter(st, schedule.stages[s], transport) for s, st in enumerate(stages)])
    return stages


def _plain(model: nn.Sequential, bm: int, k: int, lr: float = 0.2) -> nn.Sequential:
    """Non-pipelined mini-batch training of the whole model (the reference)."""
    x, y = _data(bm * k)
    opt = AnalogSGD(model, lr=lr)
    for mb in range(k):
        opt.zero_grad()
        for n in range(mb * bm, (mb + 1) * bm):
            F.cross_entropy(model(x[n * B : (n + 1) * B]), y[n * B : (n + 1) * B]).backward()
        opt.step(scale=1.0 / bm)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = _state(a), _state(b)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa if sa[k].numel())


def _assert_same(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("config", [ASYMMETRIC, None], ids=["analog", "digital"])
@pytest.mark.parametrize("num_stages", [1, 2, 4])
def test_wop_and_sync_equal_plain_minibatch_training(config, num_stages):
    bm, k = 3, 2
    base = _model(config)
    plain = _plain(copy.deepcopy(base), bm, k)
    for policy in ("wop", "sync-1f1b", "gpipe"):
        model = copy.deepcopy(base)
        _run(model, build_schedule(policy, num_stages, bm, k))
        _assert_same(model, plain)
    assert (
        _max_diff(plain, base) > 1e-3
    )  # training changed the weights: the comparison is not vacuous


def test_async_one_stage_equals_wop_with_one_microbatch_per_minibatch():
    base = _model()
    a = copy.deepcopy(base)
    _run(a, build_schedule("async", 1, 4, 2))
    w = copy.deepcopy(base)
    _run(w, build_schedule("wop", 1, 1, 8))
    _assert_same(a, w)


def test_async_differs_from_sync_with_several_stages():
    base = _model()
    a, s = copy.deepcopy(base), copy.deepcopy(base)
    _run(a, build_schedule("async", 4, 4, 2))
    _run(s, build_schedule("sync-1f1b", 4, 4, 2))
    assert _max_diff(a, s) > 1e-4


@pytest.mark.parametrize("policy", ["wop", "sync-1f1b", "async", "gpipe"])
def test_observed_staleness_and_stash_match_the_schedule(policy):
    num_stages, bm, k = 4, 5, 2
    schedule = build_schedule(policy, num_stages, bm, k)
    stages = _run(_model(), schedule)
    expected = order_metrics(schedule)
    observed = [st.counters.max_staleness for st in stages]
    assert observed == list(expected.update_delay)
    if policy == "async":
        assert observed == [num_stages - 1 - s for s in range(num_stages)]
    else:
        assert observed == [0] * num_stages
    assert [st.counters.peak_stash for st in stages] == list(expected.peak_stash)
    assert all(st.idle for st in stages)
    assert all(st.counters.updates_applied == bm * k for st in stages)


def test_async_backward_sees_updates_its_forward_did_not():
    """Staleness is real, not just counted: on stage 1 of 4, backwards run after updates
    their forwards did not see, so the transposed MVM that computes stage 0's error uses
    newer weights; weight stashing runs it on the forward's weights instead."""
    base = _model()
    plain_async = copy.deepcopy(base)
    _run(plain_async, build_schedule("async", 4, 4, 1))
    stashed = copy.deepcopy(base)
    stages = _run(stashed, build_schedule("async", 4, 4, 1, weight_stashing=True))
    assert stages[1].weight_stashing
    assert _max_diff(plain_async, stashed) > 1e-6
    assert not stages[0]._weights.snapshots  # snapshots are freed once their backwards ran


def test_weight_stashing_with_one_stage_changes_nothing():
    base = _model()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    _run(a, build_schedule("async", 1, 3, 2))
    _run(b, build_schedule("async", 1, 3, 2, weight_stashing=True))
    _assert_same(a, b, atol=0)


def test_tiki_taka_trains_in_a_pipeline():
    config = AnalogConfig(
        rule="tiki-taka", device=DeviceConfig(kind="soft-bounds", tau=1.0, dw_min=1e-3)
    )
    model = _model(config)
    x, y = _data(24)
    before = F.cross_entropy(model(x), y).item()
    stages = _run(model, build_schedule("async", 4, 8, 3), lr=0.3)
    after = F.cross_entropy(model(x), y).item()
    assert after < before - 0.05
    tt = stages[0].analog[0].analog
    assert int(tt.updates) == 24  # one fast-tile update per micro-batch under async
    assert tt.slow.weight.abs().sum() > 0


def test_update_of_a_microbatch_without_backward_is_a_schedule_error():
    model = _model()
    bad = Schedule("custom", [[Action("F", 0, 0), Action("U", 0, (0,))]], 1)
    blocks = [(str(i), m) for i, m in enumerate(model)]
    stage = Stage(0, 1, blocks, lr=0.1, loss_fn=F.cross_entropy)
    x, y = _data(1)
    transport = LocalTransport(lambda key: x[:B] if key[0] == "input" else y[:B])
    with pytest.raises(ScheduleError, match="no completed backward"):
        run_local([Interpreter(stage, bad.stages[0], transport)])


def test_a_schedule_that_cannot_finish_names_the_stuck_stages():
    model = _model()
    blocks = [(str(i), m) for i, m in enumerate(model)]
    stages = [
        Stage(0, 2, blocks[:2], lr=0.1),
        Stage(1, 2, blocks[2:], lr=0.1, loss_fn=F.cross_entropy),
    ]
    # stage 1 waits for a forward stage 0 never runs
    lists = [[Action("F", 0, 0)], [Action("F", 1, 1)]]
    x, y = _data(2)
    transport = LocalTransport(lambda key: (x if key[0] == "input" else y)[:B])
    with pytest.raises(ScheduleError, match="stage 1 stuck at 1F1"):
        run_local([Interpreter(st, lists[s], transport) for s, st in enumerate(stages)])


def test_stage_state_round_trip_continues_identically():
    base = _model()
    first = copy.deepcopy(base)
    stages = _run(first, build_schedule("async", 2, 2, 1))
    states = [st.state_dict() for st in stages]
    assert states[0]["version"] == 2
    clone = copy.deepcopy(base)
    blocks = [(str(i), m) for i, m in enumerate(clone)]
    fresh = [
        Stage(0, 2, blocks[:2], lr=0.2),
        Stage(1, 2, blocks[2:], lr=0.2, loss_fn=F.cross_entropy),
    ]
    for st, state in zip(fresh, states, strict=True):
        st.load_state_dict(state)
    _assert_same(clone, first, atol=0)
    assert fresh[1].version == 2


def test_weight_stashing_runs_each_backward_on_its_forwards_weights():
    """Stage 1 of 3 under async has staleness 1: B(1) runs after U(0). The error it sends to
    stage 0 must be what its blocks give at the weights F(1) saw (a copy of the initial
    stage-1 blocks), not at the updated ones."""
    base = _model(seed=4)
    model = copy.deepcopy(base)
    blocks = [(str(i), m) for i, m in enumerate(model)]
    stages = [
        Stage(0, 3, blocks[:1], lr=0.5, weight_stashing=True),
        Stage(1, 3, blocks[1:3], lr=0.5, weight_stashing=True),
        Stage(2, 3, blocks[3:], lr=0.5, loss_fn=F.cross_entropy, weight_stashing=True),
    ]
    schedule = build_schedule("async", 3, 4, 1, weight_stashing=True)
    x, y = _data(4)
    sent = {}

    class Spy(LocalTransport):
        def send(self, key, payload):
            sent[key] = payload.clone() if isinstance(payload, torch.Tensor) else payload
            super().send(key, payload)

    transport = Spy(lambda key: (x if key[0] == "input" else y)[key[1] * B : (key[1] + 1) * B])
    run_local([Interpreter(st, schedule.stages[s], transport) for s, st in enumerate(stages)])
    assert stages[1].counters.max_staleness == 1
    act_in = sent[("activation", 1, 0, 1)].requires_grad_(True)
    grad_out = sent[("gradient", 1, 2, 1)]
    initial = nn.Sequential(*copy.deepcopy(base)[1:3])
    out = initial(act_in)
    (expected,) = torch.autograd.grad(out, act_in, grad_out)
    for layer in initial.modules():
        if hasattr(layer, "analog"):
            layer.analog.pending.clear()
    torch.testing.assert_close(sent[("gradient", 1, 1, 0)], expected, atol=1e-6, rtol=1e-5)
    # and without stashing the same message differs (the updated weights are used)
    unstashed = copy.deepcopy(base)
    ublocks = [(str(i), m) for i, m in enumerate(unstashed)]
    plain = [
        Stage(0, 3, ublocks[:1], lr=0.5),
        Stage(1, 3, ublocks[1:3], lr=0.5),
        Stage(2, 3, ublocks[3:], lr=0.5, loss_fn=F.cross_entropy),
    ]
    sent_stashed = sent[("gradient", 1, 1, 0)]
    sent.clear()
    transport = Spy(lambda key: (x if key[0] == "input" else y)[key[1] * B : (key[1] + 1) * B])
    schedule = build_schedule("async", 3, 4, 1)
    run_local([Interpreter(st, schedule.stages[s], transport) for s, st in enumerate(plain)])
    assert (sent[("gradient", 1, 1, 0)] - sent_stashed).abs().max() > 1e-6


def test_stash_bytes_count_what_autograd_keeps():
    model = _model()
    blocks = [(str(i), m) for i, m in enumerate(model)]
    stage = Stage(0, 2, blocks[:2], lr=0.1)
    x, _ = _data(1)
    stage.forward(0, x[:B])
    # inputs (B×6) + two linear inputs/tanh outputs (B×8 each) at least, in float32
    assert stage.counters.peak_stash_bytes >= 4 * B * (6 + 8 + 8)
    weights = sum(t.numel() * t.element_size() for t in stage._weight_tensors())
    assert stage.counters.peak_stash_bytes < weights  # the weights are not counted


def test_stash_bytes_are_measured_once_per_input_shape_and_stay_right():
    model = _model()
    blocks = [(str(i), m) for i, m in enumerate(model)]
    stage = Stage(0, 2, blocks[:2], lr=0.1)
    x, _ = _data(4)
    stage.forward(0, x[:B])
    one = stage.counters.peak_stash_bytes
    stage.forward(1, x[B : 2 * B])  # same shape: the measured size is reused
    assert stage.counters.peak_stash_bytes == 2 * one
    stage.forward(2, x[2 * B :])  # a new shape (2B samples) is measured afresh
    assert len(stage._stash_nbytes) == 2
    assert stage._stash[2].nbytes != one
    assert stage.counters.peak_stash_bytes == 2 * one + stage._stash[2].nbytes
    fresh = Stage(0, 2, blocks[:2], lr=0.1)  # measuring the second micro-batch anew agrees
    fresh.forward(0, x[B : 2 * B])
    assert fresh.counters.peak_stash_bytes == one
    for n in range(3):
        stage.backward(n, torch.ones(B if n < 2 else 2 * B, 8))
    assert stage._held_bytes == sum(stage._updates.pending_bytes.values())


def _interleaving(feed_on: str) -> tuple[list[Action], list[torch.Tensor]]:
    """Run sync-1f1b on 3 stages with the data fed by the interpreters ("interpreter":
    replayed interleaving) or by the transport ("transport": decided live)."""
    model = _model()
    blocks = [(str(i), m) for i, m in enumerate(model)]
    stages = [
        Stage(0, 3, blocks[:1], lr=0.2),
        Stage(1, 3, blocks[1:2], lr=0.2),
        Stage(2, 3, blocks[2:], lr=0.2, loss_fn=F.cross_entropy),
    ]
    schedule = build_schedule("sync-1f1b", 3, 4, 2)
    x, y = _data(schedule.num_microbatches)

    def feed(key):
        kind, n, _, _ = key
        return (x if kind == "input" else y)[n * B : (n + 1) * B]

    transport = LocalTransport(feed if feed_on == "transport" else None)
    its = [
        Interpreter(
            st, schedule.stages[s], transport, feed=feed if feed_on != "transport" else None
        )
        for s, st in enumerate(stages)
    ]
    order: list[Action] = []
    run_local(its, order.append)
    weights = [t.clone() for st in stages for t in st.model_state().values() if torch.is_tensor(t)]
    return order, weights


def test_replayed_interleaving_is_the_live_one():
    replayed, weights = _interleaving("interpreter")
    live, live_weights = _interleaving("transport")
    assert replayed == live and len(replayed) == 3 * (4 * 2 * 2 + 2)
    assert weights
    assert all(torch.equal(a, b) for a, b in zip(weights, live_weights, strict=True))


def test_a_replayed_schedule_that_cannot_finish_runs_nothing():
    model = _model()
    blocks = [(str(i), m) for i, m in enumerate(model)]
    stages = [
        Stage(0, 2, blocks[:2], lr=0.1),
        Stage(1, 2, blocks[2:], lr=0.1, loss_fn=F.cross_entropy),
    ]
    x, y = _data(2)

    def feed(key):
        return (x if key[0] == "input" else y)[:B]

    lists = [[Action("F", 0, 0)], [Action("F", 1, 1)]]
    its = [Interpreter(st, lists[s], LocalTransport(), feed=feed) for s, st in enumerate(stages)]
    with pytest.raises(ScheduleError, match="stage 1 stuck at 1F1"):
        run_local(its)
    assert all(it.position == 0 for it in its)


def test_loss_statistics_are_summarised_per_microbatch():
    from aimcpipe.stages.stage import LossStats, summarize

    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)]
    targets = [torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 0])]
    odd = (torch.randn(3, 3, generator=g), torch.tensor([1, 0, 2]))  # a shorter micro-batch
    stats = [
        LossStats(torch.tensor(0.5), 4, logits[0], targets[0]),
        LossStats(torch.tensor(0.25), 4),  # regression: no accuracy
        LossStats(torch.tensor(1.5), 4, logits[1], targets[1]),
    ]
    out = summarize(stats)
    assert [o["loss"] for o in out] == [0.5, 0.25, 1.5]
    assert [o["samples"] for o in out] == [4.0, 4.0, 4.0]
    want = [float((lg.argmax(1) == t).sum()) for lg, t in zip(logits, targets, strict=True)]
    assert [out[0]["correct"], out[2]["correct"]] == want
    assert "correct" not in out[1]
    shorter = LossStats(torch.tensor(2.0), 3, odd[0], odd[1])
    mixed = summarize([*stats, shorter])  # shapes differ: compared one by one
    assert mixed[:3] == out
    assert mixed[3]["correct"] == float((odd[0].argmax(1) == odd[1]).sum())
    assert summarize([]) == []


def test_run_local_finishes_interpreters_that_already_ran_part_of_their_lists():
    model = _model()
    blocks = [(str(i), m) for i, m in enumerate(model)]
    stages = [
        Stage(0, 2, blocks[:2], lr=0.1),
        Stage(1, 2, blocks[2:], lr=0.1, loss_fn=F.cross_entropy),
    ]
    schedule = build_schedule("sync-1f1b", 2, 2, 1)
    x, y = _data(2)

    def feed(key):
        return (x if key[0] == "input" else y)[key[1] * B : (key[1] + 1) * B]

    transport = LocalTransport()
    its = [Interpreter(st, schedule.stages[s], transport, feed=feed) for s, st in enumerate(stages)]
    its[0].step()  # stepped by hand: its message is already in the transport
    run_local(its)
    assert all(it.done for it in its)


def test_message_keys_follow_the_stage_count_of_the_same_action_list():
    from aimcpipe.runtime.interpreter import _wiring

    actions = (Action("F", 0, 0), Action("B", 0, 0))
    alone, _, _ = _wiring(actions, 1)  # the only stage: it reads the target too
    first, _, _ = _wiring(actions, 2)  # the first of two: it receives the gradient
    assert ("target", 0, -1, 0) in alone[0] and ("target", 0, -1, 0) not in first[0]
    assert first[1] == (("gradient", 0, 1, 0),)


def test_loss_statistics_are_summarised_in_bounded_batches(monkeypatch):
    import aimcpipe.runtime.interpreter as interpreter

    def run(every: int) -> tuple[list[dict[str, float]], int]:
        monkeypatch.setattr(interpreter, "_SUMMARISE_EVERY", every)
        blocks = [(str(i), m) for i, m in enumerate(_model())]
        stage = Stage(0, 1, blocks, lr=0.1, loss_fn=F.cross_entropy)
        x, y = _data(8)

        def feed(key):
            return (x if key[0] == "input" else y)[key[1] * B : (key[1] + 1) * B]

        it = Interpreter(
            stage, build_schedule("wop", 1, 4, 2).stages[0], LocalTransport(), feed=feed
        )
        run_local([it])
        return it.stats, len(it._stats)

    batched, held = run(3)
    whole, _ = run(1000)
    assert held < 3 and len(batched) == 8
    assert batched == whole


def _digital_stage(seed: int = 0) -> Stage:
    model = _model(None, seed)
    return Stage(0, 1, [(str(i), m) for i, m in enumerate(model)], lr=0.1, loss_fn=F.cross_entropy)


def _train_by_hand(stage: Stage, order: list[int], groups: bool) -> list[torch.Tensor]:
    """F and B of micro-batches 0-3 in ``order``, then U(0, 1, 2, 3); the weights after."""
    x, y = _data(4)
    ns = (0, 1, 2, 3)
    for n in order:
        stage.forward(n, x[n * B : (n + 1) * B], y[n * B : (n + 1) * B])
        stage.backward(n, None, ns if groups else None)
    stage.update(ns)
    return [p.detach().clone() for p in stage.digital]


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [1, 0, 2, 3], [0, 1, 3, 2]])
def test_a_groups_running_sum_gives_the_weights_of_gradients_kept_apart(order):
    kept = _train_by_hand(_digital_stage(), [0, 1, 2, 3], groups=False)
    summed = _train_by_hand(_digital_stage(), order, groups=True)
    for a, b in zip(kept, summed, strict=True):
        if order == [0, 1, 2, 3]:  # the same sum in the same order: bit for bit
            assert torch.equal(a, b)
        else:  # some were kept apart: the same sum in another order
            torch.testing.assert_close(a, b)


def test_a_summed_group_holds_one_gradient_set_not_one_per_microbatch():
    stage = _digital_stage()
    x, y = _data(3)
    for n in range(3):
        stage.forward(n, x[n * B : (n + 1) * B], y[n * B : (n + 1) * B])
        stage.backward(n, None, (0, 1, 2))
    assert all(grads is None for _, grads in stage._updates.pending.values())
    ((members, sums),) = stage._updates.sums.values()
    assert members == [0, 1, 2] and len(sums) == len(stage.digital)
    stage.update((0, 1, 2))
    assert stage.idle and not stage._updates.sums


def test_the_interpreter_gives_each_backward_the_group_of_its_update():
    from aimcpipe.runtime.interpreter import _groups

    sync = build_schedule("sync-1f1b", 2, 4, 2).stages[0]
    got = {a.microbatches[0]: g for a, g in zip(sync, _groups(sync), strict=True) if g}
    assert got == {n: (0, 1, 2, 3) if n < 4 else (4, 5, 6, 7) for n in range(8)}
    asyn = build_schedule("async", 2, 4, 2).stages[1]
    got = {a.microbatches[0]: g for a, g in zip(asyn, _groups(asyn), strict=True) if g}
    assert got == {n: (n,) for n in range(8)}
    assert all(g is None for a, g in zip(sync, _groups(sync), strict=True) if a.kind != "B")
