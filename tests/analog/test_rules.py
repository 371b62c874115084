"""Update rules: Tiki-Taka transfer mechanics and its advantage over Analog SGD."""

import torch

from aimcpipe.analog import AnalogConfig, DeviceConfig, TikiTakaConfig, build_weight
from aimcpipe.launch.lsq import asymptotic_error, make_problem, run_lsq


def test_tiki_taka_transfers_columns_of_fast_tile_onto_slow_tile():
    config = AnalogConfig(
        rule="tiki-taka",
        device=DeviceConfig(kind="ideal"),
        tiki_taka=TikiTakaConfig(transfer_every=2, transfer_columns=2, transfer_lr=0.5),
    )
    weight = build_weight(config, 3, 5, seed=0)
    weight.set_weight(torch.zeros(3, 5))
    x, d = torch.randn(4, 5), torch.randn(4, 3)
    weight.update(x, d, lr=0.1)  # first update: fast tile only
    a1 = -0.1 * d.t() @ x
    torch.testing.assert_close(weight.fast.weight, a1)
    assert weight.slow.weight.abs().sum() == 0
    weight.update(x, d, lr=0.1)  # second update: transfer columns 0, 1
    a2 = 2 * a1
    torch.testing.assert_close(weight.fast.weight, a2)
    expected = torch.zeros(3, 5)
    expected[:, :2] = 0.5 * a2[:, :2]
    torch.testing.assert_close(weight.slow.weight, expected)
    weight.update(x, d, lr=0.1)
    weight.update(x, d, lr=0.1)  # next transfer: columns 2, 3
    expected[:, 2:4] = 0.5 * 4 * a1[:, 2:4]
    torch.testing.assert_close(weight.slow.weight, expected)
    assert int(weight.next_column) == 4
    torch.testing.assert_close(weight.effective_weight(), weight.slow.weight)


def test_tiki_taka_gamma_mixes_fast_tile_into_mvm():
    config = AnalogConfig(
        rule="tiki-taka", device=DeviceConfig(kind="ideal"), tiki_taka=TikiTakaConfig(gamma=0.5)
    )
    weight = build_weight(config, 2, 3, seed=0)
    weight.fast.set_weight(torch.ones(2, 3))
    weight.slow.set_weight(torch.full((2, 3), 2.0))
    torch.testing.assert_close(weight(torch.ones(1, 3)), torch.full((1, 2), 7.5))


def test_digital_rule_ignores_the_device():
    config = AnalogConfig(rule="digital-sgd", device=DeviceConfig(tau=0.1))
    weight = build_weight(config, 2, 2, seed=0)
    weight.set_weight(torch.full((2, 2), 5.0))  # outside ±τ: no bounds for digital weights
    weight.update(torch.ones(1, 2), torch.ones(1, 2), lr=1.0)
    torch.testing.assert_close(weight.effective_weight(), torch.full((2, 2), 4.0))


def test_tiki_taka_beats_analog_sgd_on_least_squares():
    problem = make_problem(seed=0)
    errors = {
        algorithm: asymptotic_error(
            run_lsq(
                problem,
                algorithm=algorithm,
                mode="expected",
                tau=1.0,
                lr=0.01,
                iterations=3000,
                dw_min=1e-4,
                replicas=2,
            )
        )
        for algorithm in ("digital-sgd", "analog-sgd", "tiki-taka")
    }
    assert errors["tiki-taka"] < 0.5 * errors["analog-sgd"]
    assert errors["digital-sgd"] < errors["tiki-taka"]


def test_tiki_taka_pending_updates_transfer_at_the_unscaled_lr():
    """A U that applies the mean of 4 micro-batches (scale 1/4) moves A by the mean request,
    but the transfer onto C runs at the configured lr: α must not shrink with Bm."""
    config = AnalogConfig(rule="tiki-taka", device=DeviceConfig(kind="ideal"))
    weight = build_weight(config, 3, 5, seed=0)
    weight.set_weight(torch.zeros(3, 5))
    records = [(torch.randn(2, 5), torch.randn(2, 3)) for _ in range(4)]
    weight.pending.extend(records)
    assert weight.apply_pending(lr=0.5, scale=0.25) == 4
    x = torch.cat([x for x, _ in records])
    d = torch.cat([d for _, d in records])
    a = -0.125 * d.t() @ x
    torch.testing.assert_close(weight.fast.weight, a)
    torch.testing.assert_close(weight.slow.weight, 0.5 * a)
