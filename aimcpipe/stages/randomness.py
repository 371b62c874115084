"""A stage's own torch random state, and which modules may draw from torch's global generator.

A stage swaps its own random state (a :class:`StageRandomState`) in around every action so
that, say, dropout draws the same numbers whatever the other stages do (see
:class:`~aimcpipe.stages.Stage`). The swap costs a few microseconds, paid on every action; a
stage built only of modules known never to touch the global generator, with no module hooks,
skips it. Unknown module types (user modules, dropout, RReLU, ...) and hooks (user code run
inside a module) are assumed to draw, so the swap stays wherever it could matter. A stage
decides again at the start of every epoch, so hooks registered between epochs are seen.
Analog layers draw only from their tiles' own generators.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from aimcpipe.analog.layers import AnalogConv2d, AnalogLayer, AnalogLinear
from aimcpipe.analog.tile import AnalogTile
from aimcpipe.seeding import derive_seed
from aimcpipe.stages.deferred_linear import DeferredLinear
from aimcpipe.stages.zoo import BasicBlock

__all__ = [
    "StageRandomState",
    "deterministic_loss",
    "draws_global_random",
    "loss_draws_global_random",
]

# Exact types (not subclasses: a subclass may add randomness) that draw no random numbers.
_DETERMINISTIC: frozenset[type[nn.Module]] = frozenset(
    {
        nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten, nn.Unflatten,
        nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
        nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding,
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
        nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
        nn.Softsign, nn.Tanhshrink, nn.Softmax, nn.LogSoftmax,
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    }
)  # fmt: skip


_MODULE_HOOKS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
)  # fmt: skip
_GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_pre_hooks",
    "_global_backward_hooks", "_global_backward_pre_hooks",
)  # fmt: skip


def _has_hooks(m: nn.Module) -> bool:
    """Hooks run user code inside the module's forward or backward (noise injection, say).
    Where torch's hook tables cannot be read, assume there are hooks."""
    return any(getattr(m, name, True) for name in _MODULE_HOOKS)


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, name, True) for name in _GLOBAL_HOOKS)


def draws_global_random(module: nn.Module) -> bool:
    """Whether ``module`` or anything inside it might draw from torch's global generator: a
    module of a type not known to draw nothing, or any module hook (a hook is user code)."""
    if _global_hooks():
        return True
    known = _DETERMINISTIC | {AnalogLinear, AnalogConv2d, BasicBlock, DeferredLinear}
    stack = [module]
    while stack:
        m = stack.pop()
        if type(m) not in known or _has_hooks(m):
            return True
        if not isinstance(m, AnalogLayer):  # tiles draw from their own generators only
            stack.extend(m.children())
    return False


_DETERMINISTIC_LOSSES: set[object] = {
    F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
    F.binary_cross_entropy, F.binary_cross_entropy_with_logits, F.kl_div,
}  # fmt: skip


def deterministic_loss(fn: object) -> object:
    """Declare that the loss function ``fn`` draws no random numbers (returns ``fn``)."""
    _DETERMINISTIC_LOSSES.add(fn)
    return fn


def loss_draws_global_random(fn: object) -> bool:
    """Whether a loss function might draw from torch's global generator (unknown: yes)."""
    return fn not in _DETERMINISTIC_LOSSES


_NO_SWAP = nullcontext()


class StageRandomState:
    """Stage ``index``'s own torch (CPU) random state, seeded from ``seed``: swapped in for
    torch's global one around every action while ``swaps`` (whether the stage's modules or
    loss might draw from the global generator; decided by the stage), and replaced, with its
    tiles' generators, by streams of their own while the stage evaluates."""

    def __init__(self, seed: int, index: int) -> None:
        self._seed = seed
        self._index = index
        self.state = (
            torch.Generator().manual_seed(derive_seed(seed, "stage-rng", index)).get_state()
        )
        self.swaps = True

    def own(self) -> AbstractContextManager[None]:
        """The stage's random state in place of the global one while inside, if it swaps."""
        return self.swapped() if self.swaps else _NO_SWAP

    @contextmanager
    def swapped(self) -> Iterator[None]:
        saved = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(saved)

    @contextmanager
    def evaluation(self, tiles: Sequence[AnalogTile], stream: int) -> Iterator[None]:
        """Every tile's generator and this state replaced by ones seeded from ``stream``
        while inside, and restored afterwards."""
        kept = [tile._generator for tile in tiles]
        kept_state = self.state
        try:
            for tile in tiles:
                g = torch.Generator(device=tile.weight.device)
                g.manual_seed(derive_seed(tile.seed, "eval", stream))
                tile._generator = g
            seed = derive_seed(self._seed, "eval", self._index, stream)
            self.state = torch.Generator().manual_seed(seed).get_state()
            yield
        finally:
            for tile, g in zip(tiles, kept, strict=True):
                tile._generator = g
            self.state = kept_state
