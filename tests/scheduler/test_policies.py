"""Built-in policies produce exactly the action lists docs/design.md §4 describes."""

import pytest

from aimcpipe.errors import ConfigError
from aimcpipe.scheduler import POLICIES, build_schedule, validate


def rows(policy: str, num_stages: int, bm: int, k: int = 1, **opts: object) -> list[str]:
    sched = build_schedule(policy, num_stages, bm, k, **opts)
    return [" ".join(r) for r in sched.to_strings()]


def test_wop_one_microbatch_in_flight_and_one_update_per_minibatch() -> None:
    assert rows("wop", 2, 2, 2) == [
        "0F0 0B0 0F1 0B1 0U0-1 0F2 0B2 0F3 0B3 0U2-3",
        "1F0 1B0 1F1 1B1 1U0-1 1F2 1B2 1F3 1B3 1U2-3",
    ]


def test_sync_1f1b_warmup_steady_drain_flush() -> None:
    assert rows("sync-1f1b", 3, 4) == [
        "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3 0U0-3",  # warm-up min(S-1-s, Bm) = 2
        "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3 1U0-3",  # warm-up 1
        "2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3 2U0-3",  # warm-up 0
    ]
    # fewer micro-batches than stages: warm-up capped at Bm, next mini-batch after the U
    assert rows("sync-1f1b", 4, 2, 2)[0] == "0F0 0F1 0B0 0B1 0U0-1 0F2 0F3 0B2 0B3 0U2-3"


def test_async_no_flush_one_update_per_microbatch() -> None:
    assert rows("async", 3, 2, 2) == [
        "0F0 0F1 0F2 0B0 0U0 0F3 0B1 0U1 0B2 0U2 0B3 0U3",
        "1F0 1F1 1B0 1U0 1F2 1B1 1U1 1F3 1B2 1U2 1B3 1U3",
        "2F0 2B0 2U0 2F1 2B1 2U1 2F2 2B2 2U2 2F3 2B3 2U3",
    ]
    # fewer micro-batches than warm-up slots: all forwards, then drain
    assert rows("async", 4, 2)[0] == "0F0 0F1 0B0 0U0 0B1 0U1"


def test_async_drain_every() -> None:
    assert rows("async", 2, 2, 2, drain_every=1)[0] == (
        "0F0 0F1 0B0 0U0 0B1 0U1 0F2 0F3 0B2 0U2 0B3 0U3"
    )


def test_gpipe_all_forwards_then_all_backwards() -> None:
    assert rows("gpipe", 2, 3)[1] == "1F0 1F1 1F2 1B0 1B1 1B2 1U0-2"


def test_async_with_one_stage_equals_wop_with_one_microbatch_per_minibatch() -> None:
    # docs/design.md §4 numerical fact, at the level of action lists
    a = build_schedule("async", 1, 5, 1)
    w = build_schedule("wop", 1, 1, 5)
    assert a.stages == w.stages


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_shape_is_valid_and_complete(policy: str) -> None:
    for num_stages in (1, 2, 3, 5, 8):
        for bm in (1, 2, 3, 7, 9):
            for k in (1, 2, 3):
                sched = build_schedule(policy, num_stages, bm, k)
                validate(sched)  # also checks every stage runs F, B and U of every n once
                assert sched.num_stages == num_stages
                assert sched.num_microbatches == bm * k
                assert (sched.policy, sched.microbatches_per_minibatch) == (policy, bm)


def test_weight_stashing_is_recorded_and_changes_no_order() -> None:
    plain = build_schedule("async", 4, 6, 2)
    stash = build_schedule("async", 4, 6, 2, weight_stashing=True)
    assert stash.weight_stashing and not plain.weight_stashing
    assert stash.stages == plain.stages


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        (("pipedream", 2, 2), {}, "unknown policy 'pipedream'; allowed: wop, sync-1f1b"),
        (("wop", 0, 2), {}, "num_stages"),
        (("wop", 2, 0), {}, "microbatches"),
        (("wop", 2, 2, 0), {}, "minibatches"),
        (("wop", 2, 2), {"weight_stashing": True}, "takes no option"),
        (("async", 2, 2), {"weight_stashing": 1}, "weight_stashing"),
        (("async", 2, 2), {"drain_every": 0}, "drain_every"),
        (("async", 2, 2), {"flush": True}, "allowed: weight_stashing, drain_every"),
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_schedule(*args, **kwargs)
