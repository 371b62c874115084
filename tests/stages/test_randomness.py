"""Which stages swap their own random state in around each action, and that skipping the swap
where nothing draws changes no number."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aimcpipe.analog import AnalogConfig, convert
from aimcpipe.runtime.losses import LOSSES
from aimcpipe.stages import build_model
from aimcpipe.stages.randomness import draws_global_random, loss_draws_global_random
from aimcpipe.stages.stage import Stage


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x)


class Subclassed(nn.Linear):
    """A subclass of a known module may add randomness: not trusted."""


def test_built_in_models_and_analog_layers_draw_nothing_global():
    assert not draws_global_random(build_model("digits-fcn", seed=0))
    assert not draws_global_random(convert(build_model("digits-fcn", seed=0), AnalogConfig()))
    assert not draws_global_random(build_model("resnet10", seed=0))


def test_dropout_unknown_and_subclassed_modules_may_draw():
    assert draws_global_random(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
    assert draws_global_random(nn.Sequential(nn.Sequential(Noisy())))
    assert draws_global_random(Subclassed(4, 4))


def test_losses_by_name_and_torch_losses_draw_nothing_but_user_losses_might():
    assert not any(loss_draws_global_random(fn) for fn in LOSSES.values())
    assert not loss_draws_global_random(F.cross_entropy)
    assert loss_draws_global_random(lambda y, t: F.mse_loss(y, t) + 0 * torch.rand(()))


def test_a_stage_with_dropout_still_draws_from_its_own_state():
    def stage_output() -> torch.Tensor:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        stage = Stage(0, 2, [("net", net)], lr=0.1, seed=3)
        assert stage._rng.swaps
        y, _ = stage.forward(0, torch.ones(2, 4))
        return y

    first = stage_output()
    torch.manual_seed(12345)  # the global state differs; the stage's own does not
    torch.rand(7)
    assert torch.equal(stage_output(), first)


def test_a_stage_without_randomness_leaves_the_global_state_alone():
    stage = Stage(0, 2, [("fc", nn.Linear(4, 4))], lr=0.1)
    assert not stage._rng.swaps
    before = torch.get_rng_state()
    stage.forward(0, torch.ones(2, 4))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_hook_is_user_code_that_may_draw():
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    assert not draws_global_random(net)
    handle = net[0].register_forward_hook(lambda m, i, o: o + torch.randn_like(o))
    assert draws_global_random(net)
    handle.remove()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, i: None)
    try:
        assert draws_global_random(net)  # a global hook runs inside every module
    finally:
        handle.remove()
    assert not draws_global_random(net)


def test_a_stage_sees_hooks_registered_before_an_epoch():
    fc = nn.Linear(4, 4)
    stage = Stage(0, 2, [("fc", fc)], lr=0.1, seed=3)
    assert not stage._rng.swaps
    fc.register_forward_hook(lambda m, i, o: o + torch.randn_like(o))
    stage.recheck_randomness()  # what the worker does at every epoch's start
    assert stage._rng.swaps

    def output(global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)  # the caller's state, which must not matter
        probe = Stage(0, 2, [("fc", fc)], lr=0.1, seed=3)
        return probe.forward(0, torch.ones(2, 4))[0]

    assert torch.equal(output(1), output(2))  # the hook's noise comes from the stage's state
