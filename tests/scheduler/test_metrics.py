"""Peak stash and staleness, against formulas derived from the action lists.

Derivations (stage s of S, N = K*Bm micro-batches, W_s = min(S-1-s, N) warm-up forwards):

* async: after the warm-up each steady step is F(n), B(n-W), U(n-W); the count of
  micro-batches between their F and their U peaks right after F(n): W_s + 1 = S - s
  (or N if the run is shorter). U follows B at once, so activations peak the same.
  Between F(n) and B(n) the stage applies U(n-W) .. U(n-1): W updates, or only n of them
  for the first W micro-batches -> staleness of the j-th micro-batch = min(j, W_s).
* sync-1f1b: all Bm micro-batches of a mini-batch are held until the flush U -> stash Bm;
  activations peak after the warm-up plus one forward: min(S-s, Bm). No U between any F
  and its B -> staleness 0.
* wop: one activation at a time, Bm pending updates before the U; staleness 0.
* gpipe: all Bm forwards before any backward -> Bm activations and Bm stashed.
"""

from collections import Counter

import pytest

from aimcpipe.scheduler import Schedule, build_schedule, order_metrics, parse_action, simulate

SHAPES = [(s, bm, k) for s in range(1, 9) for bm in (1, 2, 3, 5, 8, 13) for k in (1, 2, 3)]


def test_async_stash_and_staleness() -> None:
    for s_count, bm, k in SHAPES:
        n = bm * k
        m = order_metrics(build_schedule("async", s_count, bm, k))
        for s in range(s_count):
            w = min(s_count - 1 - s, n)
            assert m.peak_stash[s] == min(s_count - s, n)
            assert m.peak_activations[s] == min(s_count - s, n)
            expected_hist = Counter(min(j, w) for j in range(n))
            assert m.update_delay_histogram[s] == dict(expected_hist)
            assert m.staleness[s] == m.update_delay[s] == min(w, n - 1)
            if n >= s_count:  # pipeline full: staleness S-1-s
                assert m.staleness[s] == s_count - 1 - s


def test_async_drains_reset_staleness_and_stash() -> None:
    m = order_metrics(build_schedule("async", 4, 3, 4, drain_every=2))  # segments of 6
    for s in range(4):
        w = 3 - s
        assert m.update_delay_histogram[s] == dict(Counter(min(j % 6, w) for j in range(12)))
        assert m.peak_stash[s] == 4 - s


@pytest.mark.parametrize("policy", ["wop", "sync-1f1b", "gpipe"])
def test_flush_policies_have_no_staleness(policy: str) -> None:
    for s_count, bm, k in SHAPES:
        m = order_metrics(build_schedule(policy, s_count, bm, k))
        assert m.staleness == (0,) * s_count
        assert all(h == {0: bm * k} for h in m.staleness_histogram)
        assert m.peak_stash == (bm,) * s_count
        expected_act = {
            "wop": [1] * s_count,
            "sync-1f1b": [min(s_count - s, bm) for s in range(s_count)],
            "gpipe": [bm] * s_count,
        }[policy]
        assert list(m.peak_activations) == expected_act


def test_weight_stashing_reports_zero_effective_staleness() -> None:
    m = order_metrics(build_schedule("async", 4, 8, 1, weight_stashing=True))
    assert m.staleness == (0, 0, 0, 0)
    assert m.update_delay == (3, 2, 1, 0)  # the gradient is still applied late
    assert m.staleness_histogram[0] == {0: 8}


def test_hand_written_schedule() -> None:
    # one stage: F0 F1 B0 U0 F2 B1 U1 B2 U2 -> held after F1: 2, after F2: 2 (0 applied);
    # B1 sees one update (U0) since F1; B2 sees one (U1) since F2; B0 none
    acts = tuple(parse_action(t, 0) for t in ["F0", "F1", "B0", "U0", "F2", "B1", "U1", "B2", "U2"])
    m = order_metrics(Schedule("custom", (acts,), 3))
    assert m.peak_stash == (2,)
    assert m.update_delay_histogram == ({0: 1, 1: 2},)


def test_simulate_exposes_order_metrics() -> None:
    r = simulate(build_schedule("async", 3, 6))
    row = r.to_row(1)
    assert row["staleness"] == [2, 1, 0]
    assert row["peak_stash"] == [3, 2, 1]
    assert row["staleness_histogram"][0] == {"0": 1, "1": 1, "2": 4}
