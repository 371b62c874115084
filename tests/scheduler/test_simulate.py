"""The cycle simulator against docs/design.md §4's closed forms and hand-derived timelines."""

import pytest

from aimcpipe.scheduler import (
    CostModel,
    DeadlockError,
    HardwareModel,
    Schedule,
    build_schedule,
    parse_action,
    simulate,
    sweep,
    wop_baseline,
)

FB_COSTS = [(1, 1), (1, 2), (2, 1)]


def closed_form(policy: str, s: int, bm: int, k: int, t: int) -> int:
    """docs/design.md §4 with U = 0 and no latency."""
    return {
        "wop": k * bm * s * t,
        "sync-1f1b": k * (bm + s - 1) * t,
        "gpipe": k * (bm + s - 1) * t,  # GPipe has the same bubble as 1F1B
        "async": (k * bm + s - 1) * t,  # one fill and one drain for the whole run
    }[policy]


@pytest.mark.parametrize("policy", ["wop", "sync-1f1b", "async", "gpipe"])
@pytest.mark.parametrize(("f", "b"), FB_COSTS)
def test_makespan_matches_closed_form_everywhere(policy: str, f: int, b: int) -> None:
    # every S in 1..8, Bm in 1..16 (so Bm < S-1 included), K in 1..3
    costs = CostModel(forward=f, backward=b, update=0)
    for s in range(1, 9):
        for bm in range(1, 17):
            for k in range(1, 4):
                result = simulate(build_schedule(policy, s, bm, k), costs)
                expected = closed_form(policy, s, bm, k, f + b)
                assert result.makespan == expected, (policy, s, bm, k, f, b)


@pytest.mark.parametrize(("f", "b", "u"), [(1, 1, 1), (1, 2, 3), (2, 1, 2)])
def test_update_cost_is_per_microbatch_applied(f: int, b: int, u: int) -> None:
    # wop and flush policies: stage 0 finishes last, then spends Bm*U on its U before the
    # next mini-batch can start; the other stages' Us overlap with stage 0's backwards
    t = f + b
    costs = CostModel(forward=f, backward=b, update=u)
    for s in (1, 2, 3, 5):
        for bm in (1, 2, 4, 7):
            for k in (1, 3):
                got = {
                    p: simulate(build_schedule(p, s, bm, k), costs).makespan
                    for p in ("wop", "sync-1f1b", "gpipe")
                }
                assert got["wop"] == k * bm * (s * t + u)
                assert got["sync-1f1b"] == k * ((bm + s - 1) * t + bm * u)
                assert got["gpipe"] == k * ((bm + s - 1) * t + bm * u)


@pytest.mark.parametrize("latency", [1, 3])
def test_latency_per_message(latency: int) -> None:
    # a micro-batch crosses 2(S-1) links; wop serialises every crossing, GPipe pays one
    # fill and one drain per mini-batch
    costs = CostModel(forward=1, backward=2, update=0, latency=latency)
    for s in (1, 2, 4):
        for bm in (1, 3, 6):
            for k in (1, 2):
                wop = simulate(build_schedule("wop", s, bm, k), costs).makespan
                gpipe = simulate(build_schedule("gpipe", s, bm, k), costs).makespan
                assert wop == k * bm * (3 * s + 2 * (s - 1) * latency)
                assert gpipe == k * ((bm + s - 1) * 3 + 2 * (s - 1) * latency)
                # one micro-batch per mini-batch: every policy degenerates to wop
                one = [
                    simulate(build_schedule(p, s, 1, k), costs).makespan
                    for p in ("sync-1f1b", "gpipe")
                ]
                assert one == [k * (3 * s + 2 * (s - 1) * latency)] * 2


def test_hand_derived_sync_timeline() -> None:
    # S=2, Bm=2, F=1, B=2, U=0, derived on paper:
    # stage 0: F0 [0,1] F1 [1,2] B0 [4,6] (waits for 1B0) B1 [7,9] U [9,9]
    # stage 1: F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7] U [7,7]
    r = simulate(build_schedule("sync-1f1b", 2, 2), CostModel(forward=1, backward=2, update=0))
    assert r.starts[0] == [0, 1, 4, 7, 9] and r.ends[0] == [1, 2, 6, 9, 9]
    assert r.starts[1] == [1, 2, 4, 5, 7] and r.ends[1] == [2, 4, 5, 7, 7]
    assert r.makespan == 9
    assert r.busy == (6, 6)
    assert r.utilization == (6 / 9, 6 / 9)
    assert r.bubble_fraction == pytest.approx(1 / 3)
    assert r.messages == 4  # two activations down, two gradients up


def test_unbalanced_partition_slowest_stage_is_the_bottleneck() -> None:
    # async, S=2, 3 micro-batches, stage 1 twice as slow (F=B=2), U=0; by hand:
    # s0: F0[0,1] F1[1,2] B0[5,6] F2[6,7] B1[9,10] B2[13,14]
    # s1: F0[1,3] B0[3,5] F1[5,7] B1[7,9] F2[9,11] B2[11,13]
    costs = CostModel(forward=(1, 2), backward=(1, 2), update=0)
    r = simulate(build_schedule("async", 2, 3), costs)
    assert r.makespan == 14
    assert r.busy == (6, 12)
    assert r.utilization[1] == max(r.utilization)
    f_starts_s1 = [
        st for a, st in zip(r.schedule.stages[1], r.starts[1], strict=True) if a.kind == "F"
    ]
    assert f_starts_s1 == [1, 5, 9]
    # for a long run the makespan per micro-batch tends to the slowest stage's F+B
    long = simulate(build_schedule("async", 2, 200), costs)
    assert 200 * 4 <= long.makespan <= 200 * 4 + 2 * 4


def test_utilization_closed_forms() -> None:
    for s in (1, 2, 4, 8):
        for bm in (1, 4, 16):
            costs = CostModel(forward=1, backward=1, update=0)
            wop = simulate(build_schedule("wop", s, bm), costs)
            sync = simulate(build_schedule("sync-1f1b", s, bm), costs)
            assert wop.utilization == pytest.approx([1 / s] * s)
            assert sync.mean_utilization == pytest.approx(bm / (bm + s - 1))
            assert sync.bubble_fraction == pytest.approx((s - 1) / (bm + s - 1))


def test_fixed_model_reproduces_the_speedup_figure() -> None:
    # arXiv 2410.15155: whole-model costs split over S stages; wop -> 1,
    # sync -> S*Bm/(Bm+S-1), async -> S*N/(N+S-1) which tends to S with N = K*Bm
    bm, k = 8, 50
    pairs = sweep(
        ["wop", "sync-1f1b", "async"],
        [1, 2, 4, 8],
        bm,
        k,
        CostModel(forward=1, backward=1, update=0),
        fixed_model=True,
    )
    for _result, row in pairs:
        s, n = row["stages"], bm * k
        expected = {"wop": 1, "sync-1f1b": s * bm / (bm + s - 1), "async": s * n / (n + s - 1)}
        assert row["speedup_vs_wop"] == pytest.approx(expected[row["policy"]])
        assert row["wop_makespan"] == pytest.approx(n * 2)  # the whole model, serially
        if row["policy"] == "async":
            assert row["speedup_vs_wop"] > 0.98 * s


def test_wop_baseline_has_same_shape_and_costs() -> None:
    costs = CostModel(forward=2, backward=3, update=1)
    sched = build_schedule("async", 3, 4, 2)
    base = wop_baseline(sched, costs)
    assert base.schedule.policy == "wop"
    assert base.makespan == 2 * 4 * (3 * 5 + 1)


def test_async_with_one_stage_times_like_wop_with_one_microbatch() -> None:
    costs = CostModel(forward=2, backward=3, update=1)
    a = simulate(build_schedule("async", 1, 6), costs)
    w = simulate(build_schedule("wop", 1, 1, 6), costs)
    assert (a.starts, a.ends) == (w.starts, w.ends)


def test_energy_and_time_by_hand() -> None:
    # wop, S=2, Bm=2, F=B=1, U=0: makespan 8; per stage 2 F, 2 B, 2 micro-batches applied,
    # busy 4 of 8 cycles; 4 messages (2 activations from stage 0, 2 gradients from stage 1)
    hw = HardwareModel(
        cycle_ns=2.5,
        forward_pj=10,
        backward_pj=20,
        update_pj=5,
        message_pj=1,
        idle_pj_per_cycle=0.5,
    )
    r = simulate(build_schedule("wop", 2, 2), CostModel(update=0), hw)
    assert r.makespan == 8 and r.time_ns == 20.0
    per_stage = 2 * 10 + 2 * 20 + 2 * 5 + 2 * 1 + 4 * 0.5
    assert r.energy_pj_per_stage == (per_stage, per_stage)
    assert r.energy_pj == 2 * per_stage
    row = r.to_row(8)
    assert row["time_ns"] == 20.0 and row["energy_pj"] == 2 * per_stage


def test_simulate_raises_on_deadlock() -> None:
    rows = ["0F0 0B0 0F1 0B1 0U0-1", "1F1 1B1 1F0 1B0 1U0-1"]
    stages = tuple(tuple(parse_action(t) for t in r.split()) for r in rows)
    with pytest.raises(DeadlockError, match="stage 0 stuck at 0B0"):
        simulate(Schedule("custom", stages, 2))


def test_json_row_has_the_contract_keys() -> None:
    r = simulate(build_schedule("async", 3, 4))
    row = r.to_row(wop_baseline(r.schedule).makespan)
    for key in [
        "policy",
        "stages",
        "microbatches",
        "makespan",
        "utilization",
        "utilization_per_stage",
        "bubble_fraction",
        "speedup_vs_wop",
        "staleness",
        "peak_stash",
    ]:
        assert key in row
    assert len(row["utilization_per_stage"]) == 3
    wop_closed_form = 4 * (3 * 2 + 1)  # K*Bm*(S*t + U) with F=B=U=1
    assert row["wop_makespan"] == wop_closed_form
    assert row["speedup_vs_wop"] == wop_closed_form / row["makespan"]
