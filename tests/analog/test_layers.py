"""Analog layers: autograd contract, conv unfolding, conversion, state round-trip."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aimcpipe.analog import (
    AnalogConfig,
    AnalogConv2d,
    AnalogLinear,
    AnalogSGD,
    DeviceConfig,
    TikiTakaConfig,
    UpdateConfig,
    analog_layers,
    convert,
    io_preset,
)
from aimcpipe.errors import ConfigError

DIGITAL = AnalogConfig(rule="digital-sgd")


def test_digital_rule_matches_torch_linear_and_sgd():
    torch.manual_seed(0)
    ref = nn.Linear(6, 4)
    layer = convert(ref, DIGITAL)
    x = torch.randn(5, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(layer(x), ref(x2))
    (layer(x) ** 2).mean().backward()
    (ref(x2) ** 2).mean().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    AnalogSGD(layer, lr=0.1).step()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    torch.testing.assert_close(layer.weight, ref.weight)
    torch.testing.assert_close(layer.bias, ref.bias)


def test_backward_records_inputs_and_errors_without_weight_grad():
    layer = AnalogLinear(3, 2, config=AnalogConfig(device=DeviceConfig(tau=1.0)))
    x = torch.randn(4, 3)  # no grad needed on the input: the anchor still triggers backward
    layer(x).sum().backward()
    assert len(layer.pending) == 1
    rec_x, rec_d = layer.pending[0]
    torch.testing.assert_close(rec_x, x)
    torch.testing.assert_close(rec_d, torch.ones(4, 2))
    assert not any(isinstance(b, nn.Parameter) for b in layer.analog.buffers())
    # the records are copies: reusing the caller's buffers cannot corrupt a pending update
    x.zero_()
    torch.testing.assert_close(layer.pending[0][0], rec_x)
    assert rec_x.abs().sum() > 0


def test_convert_leaves_multihead_attention_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2))
    analog = convert(model, DIGITAL)
    assert isinstance(analog[0], AnalogLinear)
    assert type(analog[1].out_proj) is type(model[1].out_proj)


def test_update_between_forward_and_backward_is_visible_to_backward():
    layer = AnalogLinear(5, 3, bias=False, config=DIGITAL)
    x = torch.randn(2, 5, requires_grad=True)
    y = layer(x)
    layer.analog.update(torch.randn(4, 5), torch.randn(4, 3), lr=0.5)  # in-place, legal
    w_now = layer.weight.clone()
    g = torch.randn(2, 3)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w_now)


def test_conv_matches_unfold_and_matmul_reference_and_torch_conv():
    torch.manual_seed(1)
    ref = nn.Conv2d(3, 5, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    layer = convert(ref, DIGITAL)
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    y = layer(x)
    patches = F.unfold(x.detach(), (3, 2), dilation=(1, 2), padding=(1, 2), stride=(2, 1))
    manual = ref.weight.detach().reshape(5, -1) @ patches + ref.bias.detach().view(1, 5, 1)
    torch.testing.assert_close(y.detach().reshape(2, 5, -1), manual)
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(y, ref(x2))
    g = torch.randn_like(y)
    y.backward(g)
    ref(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    rec_x, rec_d = layer.pending[0]
    torch.testing.assert_close((rec_d.t() @ rec_x).reshape(ref.weight.shape), ref.weight.grad)
    assert layer.weight.shape == ref.weight.shape


def test_convert_keeps_function_and_names_layers():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Sequential(nn.Linear(2 * 4 * 4, 3))
    )
    x = torch.randn(4, 1, 6, 6)
    analog = convert(model, DIGITAL)
    assert isinstance(analog[0], AnalogConv2d) and isinstance(analog[3][0], AnalogLinear)
    assert isinstance(model[0], nn.Conv2d)  # not in place by default
    torch.testing.assert_close(analog(x), model(x))
    assert len(analog_layers(analog)) == 2
    # seeds come from layer names, so converting twice gives identical tiles
    again = convert(model, DIGITAL)
    assert analog[3][0].analog.tile.seed == again[3][0].analog.tile.seed
    assert analog[0].analog.tile.seed != analog[3][0].analog.tile.seed


def _noisy_model(seed: int) -> nn.Module:
    config = AnalogConfig(
        rule="tiki-taka",
        device=DeviceConfig(tau=1.0, dw_min=0.01, dw_min_dtod=0.2, dw_min_std=0.3),
        forward=io_preset("paper"),
        backward=io_preset("paper"),
        update=UpdateConfig(mode="pulsed"),
        tiki_taka=TikiTakaConfig(transfer_every=2, transfer_columns=3),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    return convert(model, config, seed=seed)


def _train(model: nn.Module, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = AnalogSGD(model, lr=0.1)
    for _ in range(steps):
        x = torch.randn(4, 1, 6, 6, generator=gen)
        target = torch.randint(0, 3, (4,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        opt.step()


def test_same_seed_same_training_and_state_dict_round_trip():
    a, b = _noisy_model(seed=5), _noisy_model(seed=5)
    _train(a, 3, seed=9)
    _train(b, 3, seed=9)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), ka
    # Save after 3 steps, restore into a model built with another seed, continue both.
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    c = _noisy_model(seed=99)
    c.load_state_dict(torch.load(buffer, weights_only=True))
    _train(a, 3, seed=10)
    _train(c, 3, seed=10)
    for name, value in a.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, c.state_dict()[name]), name
    assert not torch.equal(a[2].weight, b[2].weight)  # a trained further than b


def test_tiki_taka_state_includes_both_tiles_and_counters():
    keys = _noisy_model(0).state_dict().keys()
    assert {"2.analog.fast.weight", "2.analog.slow.weight", "2.analog.updates"} <= set(keys)
    assert "2.analog.slow._extra_state" in keys


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tiles_train_like_cpu_tiles_with_expected_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    config = AnalogConfig(device=DeviceConfig(tau=1.0))
    cpu = convert(model, config)
    gpu = convert(model, config).cuda()
    x, target = torch.randn(16, 8), torch.randint(0, 4, (16,))
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        opt = AnalogSGD(m, 0.1)
        F.cross_entropy(m(x.to(dev)), target.to(dev)).backward()
        opt.step()
    torch.testing.assert_close(gpu[0].weight.cpu(), cpu[0].weight, rtol=1e-4, atol=1e-5)
    pulsed = convert(model, AnalogConfig(update=UpdateConfig(mode="pulsed"))).cuda()
    F.cross_entropy(pulsed(x.cuda()), target.cuda()).backward()
    AnalogSGD(pulsed, 0.1).step()
    assert pulsed[0].weight.is_cuda


def test_an_analog_model_moves_with_to():
    """``.to(device)`` reaches every tile (an update rule's method once shadowed
    ``nn.Module._apply``, so moving an analog model raised)."""
    model = convert(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), AnalogConfig())
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    moved = model.to("cpu")
    assert moved is model
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    model.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in model.buffers() if t.is_floating_point())


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: AnalogLinear(0, 4), r"^in_features: must be an integer >= 1, got 0"),
        (lambda: AnalogLinear("4", 4), r"^in_features: must be an integer >= 1, got '4'"),
        (lambda: AnalogLinear(4, -1), r"^out_features: must be an integer >= 1"),
        (lambda: AnalogLinear(4, 4, config="ideal"), r"^config: must be an AnalogConfig or None"),
        (lambda: AnalogLinear(4, 4, dtype=torch.int64), r"^dtype: must be a floating-point"),
        (lambda: AnalogConv2d(1, 2, 0), r"^kernel_size: must be an integer >= 1"),
        (lambda: AnalogConv2d(1, 2, 3, stride=-1), r"^stride: must be an integer >= 1"),
        (lambda: AnalogConv2d(1, 2, (3, 3, 3)), r"^kernel_size: .*a pair of them"),
        (lambda: AnalogConv2d(0, 2, 3), r"^in_channels: must be an integer >= 1"),
    ],
)
def test_layer_arguments_are_checked_in_one_line(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_analog_sgd_checks_its_arguments():
    model = torch.nn.Sequential(AnalogLinear(4, 2))
    for lr in (0, float("nan"), "0.1", True, float("inf")):
        with pytest.raises(ConfigError, match=r"^lr: must be a number > 0"):
            AnalogSGD(model, lr)
    with pytest.raises(ConfigError, match=r"^model: must be a torch.nn.Module, got NoneType"):
        AnalogSGD(None, 0.1)
