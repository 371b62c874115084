"""IO non-idealities of the analog MVM."""

import pytest
import torch

from aimcpipe.analog import IOConfig, io_preset
from aimcpipe.analog.io import analog_mvm
from aimcpipe.errors import ConfigError


def _setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(7, 9, generator=gen) - 0.5
    x = torch.randn(16, 9, generator=gen)
    return w, x, gen


def test_ideal_io_is_exact_in_both_directions():
    w, x, gen = _setup()
    torch.testing.assert_close(analog_mvm(w, x, IOConfig(), gen), x @ w.t())
    d = torch.randn(16, 7)
    torch.testing.assert_close(analog_mvm(w, d, IOConfig(), gen, transposed=True), d @ w)


def test_quantisation_puts_outputs_on_the_grid():
    w, x, gen = _setup()
    io = IOConfig(
        noise_management="abs-max", inp_bound=1.0, inp_res=1 / 30, out_bound=4.0, out_res=1 / 50
    )
    y = analog_mvm(w, x, io, gen)
    scale = x.abs().amax(dim=1, keepdim=True)
    levels = y / scale / (io.out_res * 2 * io.out_bound)  # step = res × full range
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
    # close to the exact product: the error is bounded by the resolutions
    exact = x @ w.t()
    out_err, in_err = 0.5 * 8 / 50, 9 * 0.5 * (2 / 30) * 0.5
    assert ((y - exact).abs() <= scale * (out_err + in_err) + 1e-5).all()


def test_eight_bit_preset_has_255_input_levels():
    w = torch.eye(4)
    x = torch.linspace(-1, 1, 4000).view(-1, 4)
    io = IOConfig(inp_bound=1.0, inp_res=1 / 254)
    levels = analog_mvm(w, x, io, torch.Generator()).unique()
    assert len(levels) == 255


def test_output_bound_clips():
    w, x, gen = _setup()
    io = IOConfig(out_bound=0.1)
    y = analog_mvm(w, x * 10, io, gen)
    assert y.abs().max() <= 0.1 + 1e-7
    assert (y.abs() == 0.1).any()


def test_output_noise_has_configured_std_and_is_seeded():
    w, x, _ = _setup()
    x = x.repeat(200, 1)
    io = IOConfig(out_noise=0.05)
    y1 = analog_mvm(w, x, io, torch.Generator().manual_seed(1))
    y2 = analog_mvm(w, x, io, torch.Generator().manual_seed(1))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    err = y1 - x @ w.t()
    assert abs(err.std().item() - 0.05) < 0.005
    assert abs(err.mean().item()) < 0.005


def test_noise_management_scales_out_input_magnitude():
    w, x, gen = _setup()
    io = IOConfig(noise_management="abs-max", inp_bound=1.0)
    torch.testing.assert_close(analog_mvm(w, x * 100, io, gen), (x * 100) @ w.t())
    clipped = analog_mvm(w, x * 100, IOConfig(inp_bound=1.0), gen)
    assert not torch.allclose(clipped, (x * 100) @ w.t())


def test_paper_preset_and_bad_values():
    paper = io_preset("paper")
    assert paper.inp_res == paper.out_res == pytest.approx(1 / 254)
    assert paper.out_noise == pytest.approx(0.005)
    assert io_preset("ideal").is_ideal
    with pytest.raises(ConfigError, match="unknown 'fast'"):
        io_preset("fast")
    with pytest.raises(ConfigError, match="out_noise"):
        IOConfig(out_noise=-1)
    with pytest.raises(ConfigError, match="out_res"):
        IOConfig(out_res=0.01)
    with pytest.raises(ConfigError, match="inp_res"):
        IOConfig(inp_res=0.01)
