"""The pulse-coincidence count kernels: every one is exact, and the choice never changes a
result (same counts, same random stream, same weights)."""

from __future__ import annotations

import pytest
import torch

from aimcpipe.analog import (
    AnalogConfig,
    AnalogLinear,
    AnalogSGD,
    DeviceConfig,
    UpdateConfig,
    counting,
)
from aimcpipe.analog.devices import pulse_counts


def _runs_here(name: str) -> bool:
    candidate = next(c for c in counting.CANDIDATES if c.name == name)
    if "cpu" not in candidate.devices:
        return False
    a = torch.ones(32, 32, dtype=torch.int8)
    try:
        candidate.run(a, a)
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return False
    return True


HERE = [c.name for c in counting.CANDIDATES if _runs_here(c.name)]


def _ternary(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-1, 2, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-1, 2, (k, n), generator=g, dtype=torch.int8)
    return a, b


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.delenv(counting.ENV, raising=False)
    counting.reset()
    yield
    counting.reset()


def test_float32_is_always_available():
    assert "float32" in HERE


@pytest.mark.parametrize("name", HERE)
@pytest.mark.parametrize("shape", [(37, 24, 41), (64, 264, 48), (16, 2056, 24), (128, 4000, 8)])
def test_every_kernel_counts_exactly(name, shape):
    a, b = _ternary(*shape, seed=sum(shape))
    want = a.to(torch.int64) @ b.to(torch.int64)  # integer reference
    got = next(c for c in counting.CANDIDATES if c.name == name).run(a, b)
    assert got.dtype == torch.float32
    assert torch.equal(got.to(torch.int64), want)


@pytest.mark.parametrize("name", HERE)
def test_counts_beyond_half_precision_stay_exact(name):
    # all-ones: every count is k = 3000, more than bfloat16 (2⁸) or float16 (2¹¹) can hold
    a = torch.ones(24, 3000, dtype=torch.int8)
    b = -torch.ones(3000, 16, dtype=torch.int8)
    got = next(c for c in counting.CANDIDATES if c.name == name).run(a, b)
    assert torch.equal(got, torch.full((24, 16), -3000.0))


def test_automatic_choice_is_exact_and_recorded():
    a, b = _ternary(512, 1000, 256, seed=1)
    got = counting.count_products(a, b)
    assert torch.equal(got.to(torch.int64), a.to(torch.int64) @ b.to(torch.int64))
    chosen = counting.chosen()
    assert list(chosen) == ["cpu 512x1024x256"]
    assert chosen["cpu 512x1024x256"] in HERE
    counting.reset()
    assert counting.chosen() == {}


def test_small_products_use_float32_without_measuring():
    a, b = _ternary(16, 8, 16, seed=2)
    assert counting.kernel_for(a, b) == "float32"
    assert counting.chosen() == {}


def test_empty_products_are_zero():
    a = torch.zeros(5, 0, dtype=torch.int8)
    b = torch.zeros(0, 3, dtype=torch.int8)
    assert torch.equal(counting.count_products(a, b), torch.zeros(5, 3))


def test_forced_kernel_is_used(monkeypatch):
    monkeypatch.setenv(counting.ENV, "float32")
    a, b = _ternary(512, 1000, 256, seed=3)
    assert counting.kernel_for(a, b) == "float32"
    assert counting.chosen() == {}  # nothing measured


def test_unknown_forced_kernel_names_the_variable(monkeypatch):
    monkeypatch.setenv(counting.ENV, "popcount")
    a, b = _ternary(4, 8, 4, seed=4)
    with pytest.raises(ValueError, match=r"AIMCPIPE_COUNT_KERNEL='popcount'.*allowed: auto"):
        counting.count_products(a, b)


def _pulsed_layer_after_steps(kernel: str, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel == "auto":
        monkeypatch.delenv(counting.ENV, raising=False)
    else:
        monkeypatch.setenv(counting.ENV, kernel)
    config = AnalogConfig(
        device=DeviceConfig(tau=1.0, dw_min=0.001, dw_min_std=0.3),
        update=UpdateConfig(mode="pulsed", desired_bl=31),
    )
    layer = AnalogLinear(256, 128, config=config, seed=5)
    opt = AnalogSGD(layer, lr=0.01)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 256, generator=g)
    grad = torch.randn(64, 128, generator=g)
    for _ in range(3):
        opt.zero_grad()
        (layer(x) * grad).sum().backward()
        opt.step()
    after = torch.randn(4, generator=layer.analog.tile._generator)  # where its stream stands
    return layer.analog.tile.weight.clone(), after


def test_the_kernel_never_changes_the_weights_or_the_random_stream(monkeypatch):
    reference, stream = _pulsed_layer_after_steps("float32", monkeypatch)
    for kernel in ["auto", *HERE]:
        weight, after = _pulsed_layer_after_steps(kernel, monkeypatch)
        assert torch.equal(weight, reference), kernel
        assert torch.equal(after, stream), kernel


@pytest.mark.parametrize("name", HERE)
def test_pulse_counts_are_the_same_with_every_kernel(name, monkeypatch):
    g = torch.Generator().manual_seed(7)
    x, d = torch.randn(32, 96, generator=g), torch.randn(32, 80, generator=g)
    monkeypatch.setenv(counting.ENV, "float32")
    want = pulse_counts(x, d, 0.05, 0.001, 31, torch.Generator().manual_seed(8))
    monkeypatch.setenv(counting.ENV, name)
    got = pulse_counts(x, d, 0.05, 0.001, 31, torch.Generator().manual_seed(8))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert float(want[0].sum()) > 0  # the case has coincidences to count


def _fake_candidates(monkeypatch, times: dict[str, float]):
    """Candidates with made-up speeds (``_timed`` reports ``times``), so that the choice's
    logic is tested without timing anything."""
    calls: list[tuple[str, int]] = []

    def exact(a, b):
        return a.to(torch.float32) @ b.to(torch.float32)

    def wrong(a, b):
        return exact(a, b) + 1

    def broken(a, b):
        raise RuntimeError("unsupported shape")

    runs = {"fast-but-wrong": wrong, "broken": broken, "quick": exact, "sluggish": exact}
    fakes = [counting.Candidate(name, fn, ("cpu",)) for name, fn in runs.items()]
    monkeypatch.setattr(counting, "CANDIDATES", (counting.CANDIDATES[0], *fakes))
    monkeypatch.setattr(counting, "_BY_NAME", {c.name: c for c in counting.CANDIDATES})

    def timed(kernel, a, b, repeats):
        name = next(c.name for c in counting.CANDIDATES if c.run is kernel)
        calls.append((name, a.shape[1]))
        return times[name]

    monkeypatch.setattr(counting, "_timed", timed)
    return calls


def test_the_fastest_exact_candidate_is_chosen(monkeypatch):
    times = {"float32": 1.0, "fast-but-wrong": 0.01, "broken": 0.01, "quick": 0.5, "sluggish": 9}
    calls = _fake_candidates(monkeypatch, times)
    a, b = _ternary(512, 1000, 256, seed=9)
    assert counting.kernel_for(a, b) == "quick"
    timed_full = {name for name, k in calls if k == 1024}
    assert timed_full == {"float32", "quick"}  # wrong, broken and too slow: never at full size
    assert torch.equal(counting.count_products(a, b), a.float() @ b.float())


def test_float32_stays_when_nothing_beats_it(monkeypatch):
    times = {"float32": 1.0, "fast-but-wrong": 0.01, "broken": 0.01, "quick": 2.0, "sluggish": 9}
    _fake_candidates(monkeypatch, times)
    a, b = _ternary(512, 1000, 256, seed=10)
    assert counting.kernel_for(a, b) == "float32"


def test_a_kernel_that_refuses_a_member_of_its_class_falls_back_to_float32(monkeypatch):
    def even_only(a, b):
        if a.shape[1] % 2:
            raise RuntimeError("k must be even")
        return a.to(torch.float32) @ b.to(torch.float32)

    picky = counting.Candidate("picky", even_only, ("cpu",))
    monkeypatch.setattr(counting, "CANDIDATES", (counting.CANDIDATES[0], picky))
    monkeypatch.setattr(counting, "_BY_NAME", {c.name: c for c in counting.CANDIDATES})
    speed = {"float32": 1.0, "picky": 0.1}
    monkeypatch.setattr(
        counting,
        "_timed",
        lambda kernel, a, b, repeats: speed["picky" if kernel is even_only else "float32"],
    )
    a, b = _ternary(512, 1001, 256, seed=11)  # odd k: the probe (k = 1024) met the rule
    assert counting.kernel_for(a, b) == "picky"
    assert torch.equal(counting.count_products(a, b), a.float() @ b.float())


@pytest.mark.parametrize("name", HERE)
def test_kernels_work_in_bounded_blocks_exactly(name, monkeypatch):
    monkeypatch.setattr(counting, "_BLOCK_K", 96)  # blocks of the inner dimension
    monkeypatch.setattr(counting, "_PARTIALS", 40 * 24)  # a few slices per batched product
    a, b = _ternary(40, 3001, 24, seed=12)
    got = next(c for c in counting.CANDIDATES if c.name == name).run(a, b)
    assert torch.equal(got.to(torch.int64), a.to(torch.int64) @ b.to(torch.int64))


def test_the_probe_is_capped_and_a_failed_probe_settles_on_float32(monkeypatch):
    sizes = []

    def failing(m, k, n, device):
        sizes.append((m, k, n))
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(counting, "_measure", failing)
    a, b = _ternary(2000, 20000, 3, seed=13)
    assert counting.kernel_for(a, b) == "float32"
    assert sizes == [(counting._PROBE_MN, counting._PROBE_K, 4)]
    assert counting.chosen() == {"cpu 2048x32768x4": "float32"}
    assert torch.equal(counting.count_products(a, b), a.float() @ b.float())


def test_a_forced_kernel_this_torch_lacks_falls_back_to_float32(monkeypatch):
    monkeypatch.delattr(torch, "_int_mm", raising=False)
    monkeypatch.setenv(counting.ENV, "int8")
    a, b = _ternary(64, 256, 32, seed=14)
    assert torch.equal(counting.count_products(a, b), a.float() @ b.float())


def test_usable_lists_the_exact_kernels_that_run_here():
    names = counting.usable("cpu")
    assert names[0] == "float32"
    assert set(names) <= set(HERE)  # what runs here, minus any that miscounts
