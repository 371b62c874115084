"""Device responses against the equations of docs/design.md §3."""

import pytest
import torch

from aimcpipe.analog import AnalogTile, DeviceConfig, UpdateConfig
from aimcpipe.analog.devices import pulse_counts


def _tile(device: DeviceConfig, mode="expected", granularity="sample", seed=0, shape=(6, 8)):
    tile = AnalogTile(
        *shape, device, update=UpdateConfig(mode=mode, granularity=granularity), seed=seed
    )
    gen = torch.Generator().manual_seed(123)
    w = (torch.rand(shape, generator=gen) * 2 - 1) * 0.8 * device.w_max
    tile.set_weight(w)
    return tile, tile.weight.clone()


def _data(b=5, n_in=8, n_out=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n_in, generator=gen), torch.randn(b, n_out, generator=gen)


@pytest.mark.parametrize("tau", [0.7, 1.0, 2.5])
def test_batch_form_is_papers_equation(tau):
    tile, w = _tile(DeviceConfig(tau=tau), granularity="batch")
    x, d = _data()
    lr = 0.05
    tile.update(x, d, lr)
    delta = -lr * d.t() @ x
    expected = (w + delta - delta.abs() * w / tau).clamp(-tau, tau)
    torch.testing.assert_close(tile.weight, expected)


def test_sample_form_sums_per_sample_magnitudes():
    tau, lr = 1.3, 0.05
    tile, w = _tile(DeviceConfig(tau=tau), granularity="sample")
    x, d = _data()
    tile.update(x, d, lr)
    delta = -lr * d.t() @ x
    magnitude = sum(lr * (d[i : i + 1].t() @ x[i : i + 1]).abs() for i in range(len(x)))
    expected = (w + delta - magnitude * w / tau).clamp(-tau, tau)
    torch.testing.assert_close(tile.weight, expected)


def test_general_response_with_asymmetry_and_uneven_bounds():
    """W += Σ_b [ΔW_b]₊ q+(W) − [ΔW_b]₋ q−(W), checked with a per-sample loop."""
    cfg = DeviceConfig(kind="soft-bounds", w_max=0.9, w_min=-0.6, up_down=0.2)
    tile, w = _tile(cfg)
    x, d = _data()
    lr = 0.03
    tile.update(x, d, lr)
    q_up = (1 + 0.2) * (1 - w / 0.9)
    q_down = (1 - 0.2) * (1 - w / -0.6)
    change = torch.zeros_like(w)
    for i in range(len(x)):
        step = -lr * d[i : i + 1].t() @ x[i : i + 1]
        change += step.clamp(min=0) * q_up - (-step).clamp(min=0) * q_down
    torch.testing.assert_close(tile.weight, (w + change).clamp(-0.6, 0.9))


def test_power_step_with_gamma_one_equals_soft_bounds():
    x, d = _data()
    soft, _ = _tile(DeviceConfig(kind="soft-bounds", tau=1.2))
    power, _ = _tile(DeviceConfig(kind="power-step", tau=1.2, pow_gamma=1.0))
    soft.update(x, d, 0.05)
    power.update(x, d, 0.05)
    torch.testing.assert_close(soft.weight, power.weight)


def test_constant_step_and_power_step_responses():
    x, d = _data()
    lr = 0.02
    delta = -lr * d.t() @ x
    const, w = _tile(DeviceConfig(kind="constant-step", tau=1.0, up_down=0.1), granularity="batch")
    const.update(x, d, lr)
    expected = w + delta.clamp(min=0) * 1.1 - (-delta).clamp(min=0) * 0.9
    torch.testing.assert_close(const.weight, expected.clamp(-1, 1))
    power, w = _tile(DeviceConfig(kind="power-step", tau=1.0, pow_gamma=2.0), granularity="batch")
    power.update(x, d, lr)
    q_up, q_down = (1 - w) ** 2, (1 + w) ** 2  # (2(1−w)/2)², (2(w+1)/2)²
    expected = w + delta.clamp(min=0) * q_up - (-delta).clamp(min=0) * q_down
    torch.testing.assert_close(power.weight, expected.clamp(-1, 1))


@pytest.mark.parametrize(
    "cfg",
    [
        DeviceConfig(tau=0.5),
        DeviceConfig(kind="constant-step", tau=0.5),
        DeviceConfig(kind="power-step", w_max=0.4, w_min=-0.7, pow_gamma=0.5),
        DeviceConfig(tau=0.5, w_max_dtod=0.3, w_min_dtod=0.3, dw_min_dtod=0.3, up_down_dtod=0.1),
        DeviceConfig(tau=0.5, write_noise_std=5.0, dw_min=0.05),
    ],
)
@pytest.mark.parametrize("mode", ["expected", "pulsed"])
def test_weights_never_leave_bounds(cfg, mode):
    tile, _ = _tile(cfg, mode=mode)
    gen = torch.Generator().manual_seed(5)
    for _ in range(30):
        x = torch.randn(4, 8, generator=gen) * 5
        d = torch.randn(4, 6, generator=gen) * 5
        tile.update(x, d, 1.0)
        assert (tile.weight <= tile.w_max + 1e-6).all()
        assert (tile.weight >= tile.w_min - 1e-6).all()


def test_ideal_device_is_exact_sgd():
    tile, w = _tile(DeviceConfig(kind="ideal"))
    x, d = _data()
    tile.update(x, d, 0.1)
    torch.testing.assert_close(tile.weight, w - 0.1 * d.t() @ x)


@pytest.mark.parametrize(
    "cfg", [DeviceConfig(tau=1.0, dw_min=0.01), DeviceConfig(tau=1.0, dw_min=0.01, up_down=0.3)]
)
def test_mean_of_pulsed_updates_matches_expected_sample_update(cfg):
    """Statistical check: mean pulsed change within 5 standard errors of the expected one."""
    x, d = _data(b=4)
    lr, repeats = 0.02, 600
    expected_tile, w = _tile(cfg, mode="expected", granularity="sample")
    expected_tile.update(x, d, lr)
    expected = expected_tile.weight - w
    pulsed, _ = _tile(cfg, mode="pulsed", seed=7)
    changes = []
    for _ in range(repeats):
        pulsed.set_weight(w)
        pulsed.update(x, d, lr)
        changes.append(pulsed.weight - w)
    changes = torch.stack(changes)
    mean, sem = changes.mean(0), changes.std(0) / repeats**0.5
    assert ((mean - expected).abs() <= 5 * sem + 1e-4).all()
    # ... and it is a real stochastic update, not the expected one in disguise
    assert changes.std(0).mean() > 0.1 * expected.abs().mean()


def test_pulse_trains_respect_bit_length_and_dw_min():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 30, generator=gen)
    d = torch.randn(1, 20, generator=gen)
    coincidences, signed = pulse_counts(x, d, lr=10.0, dw_min=0.001, desired_bl=7, generator=gen)
    assert coincidences.max() <= 7
    assert (signed.abs() <= coincidences).all()
    # the sign of every pulse follows the requested update −lr·dᵀx
    requested = -(d.t() @ x)
    assert (torch.sign(signed[signed != 0]) == torch.sign(requested[signed != 0])).all()
    # small update: bit length 1, at most one pulse per cross-point
    small, _ = pulse_counts(x, d, lr=1e-4, dw_min=0.001, desired_bl=31, generator=gen)
    assert small.max() <= 1


def test_a_learning_rate_beyond_float32_over_dw_min_saturates_not_nan():
    """lr/dw_min beyond float32 is inf: samples with a signal fire the longest train, a
    sample of zeros fires nothing (0 * inf would be NaN)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, generator=gen)
    x[1] = 0.0
    d = torch.randn(2, 4, generator=gen)
    coincidences, signed = pulse_counts(x, d, lr=1e37, dw_min=1e-3, desired_bl=5, generator=gen)
    assert torch.isfinite(coincidences).all() and torch.isfinite(signed).all()
    assert 0 < coincidences.max() <= 5
    quiet, _ = pulse_counts(x[1:], d[1:], lr=1e37, dw_min=1e-3, desired_bl=5, generator=gen)
    assert quiet.sum() == 0


def test_same_seed_same_device_variation_and_pulses():
    cfg = DeviceConfig(tau=1.0, dw_min_dtod=0.3, w_max_dtod=0.2, dw_min_std=0.3)
    a, _ = _tile(cfg, mode="pulsed", seed=11)
    b, _ = _tile(cfg, mode="pulsed", seed=11)
    c, _ = _tile(cfg, mode="pulsed", seed=12)
    torch.testing.assert_close(a.dw_min, b.dw_min)
    torch.testing.assert_close(a.w_max, b.w_max)
    assert not torch.equal(a.dw_min, c.dw_min)
    assert a.dw_min.std() > 0.1 * a.dw_min.mean()
    x, d = _data()
    for tile in (a, b, c):
        tile.update(x, d, 0.5)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    assert not torch.equal(a.weight, c.weight)


def test_cycle_to_cycle_noise_adds_spread():
    x, d = _data(b=2)
    quiet, w = _tile(DeviceConfig(tau=1.0, dw_min=0.01), mode="pulsed", seed=3)
    noisy, _ = _tile(DeviceConfig(tau=1.0, dw_min=0.01, dw_min_std=0.5), mode="pulsed", seed=3)
    quiet.update(x, d, 0.05)
    noisy.update(x, d, 0.05)
    q = quiet.weight - w
    n = noisy.weight - w
    hit = q != 0
    assert hit.any()
    # Same pulses (same seed), but each pulse's size varies around dw_min·q(w).
    assert not torch.allclose(q[hit], n[hit])
    assert torch.equal(q[~hit], n[~hit])


def test_expected_update_uses_per_device_step_sizes():
    """With dw_min variation, a device with twice the nominal step moves twice as far, in the
    expected mode as with pulses."""
    cfg = DeviceConfig(kind="constant-step", tau=1.0, dw_min=0.01, dw_min_dtod=0.5)
    tile = AnalogTile(6, 8, cfg, seed=4)
    tile.set_weight(torch.zeros(6, 8))
    x, d = _data()
    tile.update(x, d, 0.01)
    torch.testing.assert_close(tile.weight, -0.01 * d.t() @ x * tile.dw_min / 0.01)


def test_write_noise_is_redrawn_not_accumulated():
    cfg = DeviceConfig(kind="ideal", dw_min=0.1, write_noise_std=1.0)
    tile = AnalogTile(20, 20, cfg, seed=0)
    tile.set_weight(torch.zeros(20, 20))
    x, d = torch.zeros(1, 20), torch.zeros(1, 20)
    x[0, 0] = 1.0
    for _ in range(100):
        tile.update(x, d, 0.1)  # a zero-size request: only write noise changes the read weight
    assert abs(tile.weight.std().item() - 0.1) < 0.02  # one draw of σ·dw_min, not √100 of them
    assert tile.hidden_weight.abs().max() == 0


def test_tiny_pulse_probabilities_fire_at_the_right_rate():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((20000, 2), 1.0)
    x[:, 1] = 1e-4  # bit probability ≈ 1e-4·√k, far below the 2⁻¹⁵ resolution
    d = torch.ones(20000, 1)
    coincidences, _ = pulse_counts(x, d, lr=0.5, dw_min=0.001, desired_bl=31, generator=gen)
    ratio = coincidences[0, 1] / coincidences[0, 0]
    assert 0.3e-4 < ratio < 3e-4  # expected 1e-4; without dithering it would be 0


def test_negative_learning_rate_is_refused():
    tile, _ = _tile(DeviceConfig(tau=1.0))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        tile.update(*_data(), lr=-0.1)
