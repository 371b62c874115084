"""Every analog path on CUDA tensors: expected and pulsed updates, IO noise and quantisation,
Tiki-Taka, convolutions, the count kernels and a pipeline stage. Skipped without a GPU.

Where the arithmetic is deterministic (expected updates, ideal IO) CUDA must agree with the
CPU to float32 rounding; where random numbers are drawn, CUDA draws its own stream, so the
test checks what must hold whatever the draws: the state stays on the device, bounded and
finite, and training moves it the way the gradient asks.
"""

from __future__ import annotations

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
    convert,
    counting,
    io_preset,
)
from aimcpipe.stages.stage import Stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
PULSED = UpdateConfig(mode="pulsed", desired_bl=31)
SOFT = DeviceConfig(kind="soft-bounds", tau=1.0, dw_min=0.001)
NOISY = DeviceConfig(tau=1.0, dw_min=0.001, dw_min_std=0.3, dw_min_dtod=0.3, write_noise_std=0.1)
PAPER = io_preset("paper")

CONFIGS = {
    "expected": AnalogConfig(device=SOFT),
    "pulsed": AnalogConfig(device=SOFT, update=PULSED),
    "pulsed-noisy-device": AnalogConfig(device=NOISY, update=PULSED),
    "paper-io": AnalogConfig(device=SOFT, forward=PAPER, backward=PAPER),
    "pulsed-paper-io": AnalogConfig(device=SOFT, update=PULSED, forward=PAPER, backward=PAPER),
    "tiki-taka": AnalogConfig(
        rule="tiki-taka",
        device=SOFT,
        tiki_taka=TikiTakaConfig(transfer_every=1, transfer_columns=4),
    ),
    "tiki-taka-pulsed": AnalogConfig(rule="tiki-taka", device=SOFT, update=PULSED),
    "digital-sgd": AnalogConfig(rule="digital-sgd"),
}


def _batch(n: int, features: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def _state_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in module.state_dict().values() if torch.is_tensor(t)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_linear_layer_trains_on_cuda(name):
    layer = AnalogLinear(32, 10, config=CONFIGS[name], seed=0).to(CUDA)
    assert all(t.device.type == "cuda" for t in _state_tensors(layer))
    opt = AnalogSGD(layer, lr=0.1)
    x, y = _batch(64, 32, 10, seed=1)
    x, y = x.to(CUDA), y.to(CUDA)
    before = F.cross_entropy(layer(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(layer(x), y).backward()
        opt.step()
    after = F.cross_entropy(layer(x), y).item()
    weight = layer.analog.effective_weight()
    assert weight.is_cuda and torch.isfinite(weight).all()
    assert weight.abs().max() <= 1.0 + 1e-6 or name == "digital-sgd"
    assert after < before, (name, before, after)


@pytest.mark.parametrize("name", ["expected", "tiki-taka", "digital-sgd"])
def test_deterministic_paths_match_the_cpu(name):
    config = CONFIGS[name]
    x, y = _batch(16, 12, 5, seed=2)
    weights = []
    for device in ("cpu", "cuda"):
        layer = AnalogLinear(12, 5, config=config, seed=3).to(device)
        opt = AnalogSGD(layer, lr=0.2)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(layer(x.to(device)), y.to(device)).backward()
            opt.step()
        weights.append(layer.analog.effective_weight().cpu())
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["expected", "pulsed", "paper-io"])
def test_convolution_trains_on_cuda(name):
    conv = AnalogConv2d(3, 8, 3, padding=1, config=CONFIGS[name], seed=0).to(CUDA)
    head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).to(CUDA)
    model = nn.Sequential(conv, nn.ReLU(), head)
    opt = AnalogSGD(model, lr=0.05)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 3, 8, 8, generator=g).to(CUDA)
    y = torch.randint(0, 4, (16,), generator=g).to(CUDA)
    before = conv.analog.effective_weight().clone()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = conv.analog.effective_weight()
    assert after.is_cuda and torch.isfinite(after).all()
    assert not torch.equal(after, before)


def test_paper_io_quantises_outputs_on_cuda():
    layer = AnalogLinear(16, 8, config=CONFIGS["paper-io"], seed=0).to(CUDA)
    layer.eval()
    with torch.no_grad():
        y = layer(torch.randn(32, 16, device=CUDA))
    assert y.is_cuda and torch.isfinite(y).all()
    ideal = AnalogLinear(16, 8, config=CONFIGS["expected"], seed=0).to(CUDA)
    with torch.no_grad():
        x = torch.randn(32, 16, device=CUDA)
        assert not torch.equal(layer(x), ideal(x))  # noise and quantisation are applied


@pytest.mark.parametrize("candidate", counting.CANDIDATES, ids=lambda c: c.name)
def test_count_kernels_on_cuda_are_exact_or_absent(candidate):
    if "cuda" not in candidate.devices:
        pytest.skip(f"{candidate.name} is a CPU kernel")
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-1, 2, (256, 3000), generator=g, dtype=torch.int8)
    b = torch.randint(-1, 2, (3000, 128), generator=g, dtype=torch.int8)
    want = (a.to(torch.int64) @ b.to(torch.int64)).to(torch.float32)
    try:
        got = candidate.run(a.to(CUDA), b.to(CUDA))
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        pytest.skip(f"{candidate.name} does not run on this GPU")
    assert torch.equal(got.cpu(), want)


def test_automatic_kernel_choice_on_cuda_is_exact():
    counting.reset()
    g = torch.Generator().manual_seed(6)
    a = torch.randint(-1, 2, (512, 4000), generator=g, dtype=torch.int8).to(CUDA)
    b = torch.randint(-1, 2, (4000, 512), generator=g, dtype=torch.int8).to(CUDA)
    got = counting.count_products(a, b)
    assert torch.equal(got.cpu(), a.cpu().float() @ b.cpu().float())
    assert any(key.startswith("cuda") for key in counting.chosen())


def test_pulsed_weights_do_not_depend_on_the_cuda_kernel(monkeypatch):
    def train(kernel: str) -> torch.Tensor:
        monkeypatch.setenv(counting.ENV, kernel)
        layer = AnalogLinear(64, 32, config=CONFIGS["pulsed-noisy-device"], seed=7).to(CUDA)
        opt = AnalogSGD(layer, lr=0.05)
        x, y = _batch(64, 64, 32, seed=8)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(layer(x.to(CUDA)), y.to(CUDA)).backward()
            opt.step()
        return layer.analog.effective_weight().cpu()

    reference = train("float32")
    for candidate in counting.CANDIDATES[1:]:
        if "cuda" not in candidate.devices:
            continue
        try:
            weight = train(candidate.name)
        except (RuntimeError, TypeError, AttributeError, NotImplementedError):
            continue  # not available on this GPU
        assert torch.equal(weight, reference), candidate.name


def test_a_stage_runs_its_actions_on_cuda():
    model = convert(
        nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)), CONFIGS["pulsed"], seed=0
    ).to(CUDA)
    stage = Stage(0, 1, list(model.named_children()), lr=0.1, loss_fn=F.cross_entropy)
    x, y = _batch(8, 16, 4, seed=9)
    for n in range(2):
        loss, stats = stage.forward(n, x.to(CUDA), y.to(CUDA))
        assert loss.is_cuda and stats is not None
        assert stage.backward(n) is None
    stage.update([0, 1])
    assert stage.version == 2
    assert stats.as_dict()["samples"] == 8.0
