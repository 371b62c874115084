"""A pipeline stage: a contiguous run of model blocks with its tiles, stashes and versions.

A ``Stage`` executes the three actions of docs/design.md §4 for any micro-batch, in whatever
order its schedule gives:

* ``forward(n, x)`` runs the blocks and keeps the autograd graph (the *activation stash*)
  until ``backward(n)``; the last stage also computes the loss against the target.
* ``backward(n, grad)`` back-propagates. Analog layers and plain digital ``nn.Linear``
  layers record their (x, d) pairs (the weight gradient of a linear layer is formed at the
  update, :mod:`~aimcpipe.stages.deferred_linear`) and other digital parameters their
  gradients; the stage moves both into its *pending update stash* keyed by
  micro-batch, so nothing is applied yet.
* ``update(ns)`` applies the pending updates of micro-batches ``ns`` as one update at
  ``lr / len(ns)`` (the mean of their requested updates, each sample's magnitude still
  counting in the asymmetric device term) and advances the *weight version* by ``len(ns)``.

Updates change weights in place between a forward and its backward — that is the point of
the asynchronous policy — so digital parameters are written through ``.data`` (autograd's
saved tensors see the new values, as an analog array's transposed MVM does) and, with
``weight_stashing``, a backward temporarily runs on the weights its forward saw (PipeDream).

Each stage owns a torch random state (dropout and any other use of torch's global generator
inside its blocks) that is swapped in around every action, so a stage draws the same random
numbers whatever the other stages do and wherever it runs. (This is the CPU generator; tiles
have their own generators on any device, but dropout on a CUDA device would draw from the
process's CUDA generator.) A stage whose blocks are all known never to draw from the global
generator (:func:`~aimcpipe.stages.randomness.draws_global_random`) skips the swap: it is
paid on every action.

The activation stash's size in bytes (what autograd saves, weights excluded) is measured
with saved-tensor hooks on the first forward of each input shape and reused for later
forwards of the same shape, whose graphs are the same.

The stage keeps the activation stash and the actions; its pending update stash is a
:class:`~aimcpipe.stages.pending_updates.PendingUpdates`, its weight snapshots a
:class:`~aimcpipe.stages.weight_stash.WeightSnapshots` and its random state a
:class:`~aimcpipe.stages.randomness.StageRandomState`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aimcpipe.analog.layers import AnalogLayer
from aimcpipe.analog.tile import AnalogTile
from aimcpipe.errors import ScheduleError
from aimcpipe.stages.backprop import prepare, run_backward
from aimcpipe.stages.deferred_linear import defer_linear_gradients
from aimcpipe.stages.pending_updates import PendingUpdates
from aimcpipe.stages.randomness import (
    StageRandomState,
    draws_global_random,
    loss_draws_global_random,
)
from aimcpipe.stages.weight_stash import WeightSnapshots

__all__ = ["LossFn", "LossStats", "Stage", "StageCounters", "summarize"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StageCounters:
    """What a stage observed while executing its actions (docs/design.md §5 metrics)."""

    staleness_histogram: dict[int, int] = field(default_factory=dict)
    peak_stash: int = 0
    peak_stash_bytes: int = 0
    updates_applied: int = 0

    @property
    def max_staleness(self) -> int:
        return max(self.staleness_histogram, default=0)


@dataclass(slots=True)
class LossStats:
    """A micro-batch's loss statistics, kept as tensors until they are read: converting each
    micro-batch's on the spot (``float()``, ``argmax``) cost more than a small stage's
    compute. :func:`summarize` converts many at once; whoever keeps them should do so every
    few hundred micro-batches (the interpreter does), since a classification's logits are
    kept until then."""

    loss: torch.Tensor
    samples: int
    logits: torch.Tensor | None = None  # a classification's outputs
    target: torch.Tensor | None = None  # its labels (kept only for a classification)

    def as_dict(self) -> dict[str, float]:
        return summarize([self])[0]


def summarize(stats: Sequence[LossStats]) -> list[dict[str, float]]:
    """``{"loss", "samples"[, "correct"]}`` per micro-batch, as floats."""
    if not stats:
        return []
    losses = torch.stack([s.loss.reshape(()) for s in stats]).tolist()
    out = [
        {"loss": float(loss), "samples": float(s.samples)}
        for loss, s in zip(losses, stats, strict=True)
    ]
    scored = [(i, s) for i, s in enumerate(stats) if s.logits is not None]
    if scored:
        shapes = {s.logits.shape for _, s in scored}  # type: ignore[union-attr]
        if len(shapes) == 1:  # one batched comparison for all of them
            logits = torch.stack([s.logits for _, s in scored])  # type: ignore[misc]
            targets = torch.stack([s.target for _, s in scored])  # type: ignore[misc]
            correct = (logits.argmax(dim=2) == targets).sum(dim=1).tolist()
        else:
            correct = [
                int((s.logits.argmax(dim=1) == s.target).sum())  # type: ignore[union-attr]
                for _, s in scored
            ]
        for (i, _), c in zip(scored, correct, strict=True):
            out[i]["correct"] = float(c)
    return out


@dataclass(slots=True)
class _Stashed:
    """What F(n) leaves for B(n): the input leaf, the output (or loss) and the version."""

    inputs: torch.Tensor
    output: torch.Tensor
    version: int
    nbytes: int


_NO_SWAP = nullcontext()


class Stage:
    """Stage ``index`` of ``num_stages``: ``blocks`` are ``(qualified name, module)`` pairs
    applied in order. The last stage needs ``loss_fn(output, target)`` (a mean over the
    micro-batch). ``seed`` seeds the stage's own torch random state."""

    def __init__(
        self,
        index: int,
        num_stages: int,
        blocks: Sequence[tuple[str, nn.Module]],
        *,
        lr: float,
        loss_fn: LossFn | None = None,
        seed: int = 0,
        weight_stashing: bool = False,
    ) -> None:
        if not blocks:
            raise ValueError(f"stage {index}: no blocks")
        self.index = index
        self.num_stages = num_stages
        self.names = tuple(name for name, _ in blocks)
        modules, linears = defer_linear_gradients([m for _, m in blocks])
        self.modules = nn.ModuleList(modules)
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        if self.is_last and loss_fn is None:
            raise ValueError("the last stage needs a loss function")
        self.loss_fn = loss_fn
        self.lr = float(lr)
        self.weight_stashing = weight_stashing
        self.analog = [m for m in self.modules.modules() if isinstance(m, AnalogLayer)]
        anchors = {id(layer.anchor) for layer in self.analog}
        self.digital = [p for p in self.modules.parameters() if id(p) not in anchors]
        self._tiles = [m for m in self.modules.modules() if isinstance(m, AnalogTile)]
        # storages of weights, which autograd also saves but are not activations (updates are
        # in place, so these stay valid; build stages after moving the model to its device)
        self._weight_storages = {t.untyped_storage().data_ptr() for t in self._weight_tensors()}
        self.version = 0
        self.counters = StageCounters()
        self._stash: dict[int, _Stashed] = {}  # the activation stash
        self._updates = PendingUpdates(self.analog, linears, self.digital)
        self._weights = WeightSnapshots(self._tiles, self.digital)  # (weight stashing)
        self._rng = StageRandomState(seed, index)
        self.recheck_randomness()
        self._stash_nbytes: dict[tuple[Any, ...], int] = {}  # input signature -> bytes
        self._held_bytes = 0  # activation stashes + pending updates
        prepare()  # PyTorch's one-off cost of a first backward, here rather than in action B0

    def recheck_randomness(self) -> None:
        """Decide whether actions swap in the stage's own random state: only if a module, a
        hook or the loss might draw from torch's global generator (called at construction
        and by the worker at every epoch's start)."""
        self._rng.swaps = draws_global_random(self.modules) or (
            self.is_last and loss_draws_global_random(self.loss_fn)
        )

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def held(self) -> int:
        """Micro-batches held from F until the U that applies them (the stash count)."""
        return len(self._stash) + len(self._updates.pending)

    def _note_stash(self) -> None:
        c = self.counters
        held = len(self._stash) + len(self._updates.pending)
        if held > c.peak_stash:
            c.peak_stash = held
        nbytes = self._held_bytes + self._weights.nbytes
        if nbytes > c.peak_stash_bytes:
            c.peak_stash_bytes = nbytes

    def _weight_tensors(self) -> list[torch.Tensor]:
        return list(self.modules.parameters()) + list(self.modules.buffers())

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.modules:
            x = module(x)
        return x

    # -- actions ---------------------------------------------------------------------------
    def forward(
        self, n: int, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LossStats | None]:
        """F(n). Returns ``(activation, None)`` with the activation to send downstream
        (detached), or on the last stage ``(loss, stats)`` where stats holds the
        micro-batch's loss and what its correct count is computed from (:class:`LossStats`;
        ``stats.as_dict()`` or :func:`summarize` give the numbers)."""
        if n in self._stash or n in self._updates.pending:
            raise ScheduleError(f"stage {self.index}: F{n} runs twice")
        if not self.is_first and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        if self.weight_stashing:
            self._weights.keep(self.version)
        signature = (x.shape, x.dtype, None if target is None else target.shape)
        nbytes = self._stash_nbytes.get(signature)
        with self._rng.own(), _NO_SWAP if torch.is_grad_enabled() else torch.enable_grad():
            if nbytes is None:
                y, stats, nbytes = self._measured_forward(n, x, target)
                self._stash_nbytes[signature] = nbytes
            else:
                y, stats = self._forward(n, x, target)
        self._stash[n] = _Stashed(x, y, self.version, nbytes)
        self._held_bytes += nbytes
        self._note_stash()
        return (y.detach(), stats)

    def _forward(
        self, n: int, x: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, LossStats | None]:
        y = self._run_blocks(x)
        if not self.is_last:
            return y, None
        if target is None:
            raise ScheduleError(f"stage {self.index}: F{n} has no target")
        assert self.loss_fn is not None
        loss = self.loss_fn(y, target)
        classified = y.dim() == 2 and target.dim() == 1 and not target.is_floating_point()
        # the predicted classes, not the logits, are kept: an epoch of logits can be large
        if not classified:
            return loss, LossStats(loss.detach(), len(target))
        return loss, LossStats(loss.detach(), len(target), y.detach(), target)

    def _measured_forward(
        self, n: int, x: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, LossStats | None, int]:
        """:meth:`_forward` with the bytes autograd saves for the backward counted (weights,
        which autograd also saves, are not activations; the input always counts)."""
        weights = self._weight_storages
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.layout == torch.strided:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in weights:
                    saved[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, stats = self._forward(n, x, target)
        saved.setdefault(x.untyped_storage().data_ptr(), x.nbytes)
        return y, stats, sum(saved.values())

    def backward(
        self, n: int, grad: torch.Tensor | None = None, group: tuple[int, ...] | None = None
    ) -> torch.Tensor | None:
        """B(n). ``grad`` is d(loss)/d(output) from the next stage (None on the last stage).
        Returns d(loss)/d(input) to send upstream (None on the first stage).

        ``group``: the micro-batches of the update that will apply this one, when the caller
        knows them (the interpreter reads them from the schedule) and ``n``'s backward comes
        in their order. The digital gradients of a group are then summed as they come, into
        one buffer per parameter, rather than kept per micro-batch and summed at the update:
        the same sum in the same order, without a gradient set per micro-batch held in
        memory (and re-allocated every mini-batch)."""
        stashed = self._stash.pop(n, None)
        if stashed is None:
            raise ScheduleError(f"stage {self.index}: B{n} before F{n}")
        if grad is None and not self.is_last:
            raise ScheduleError(
                f"stage {self.index}: B{n} has no gradient from stage {self.index + 1}"
            )
        summed = self._updates.prepare(n, group)
        delay = self.version - stashed.version
        hist = self.counters.staleness_histogram
        hist[delay] = hist.get(delay, 0) + 1
        self._held_bytes -= stashed.nbytes
        if self.weight_stashing:
            with self._rng.own(), self._weights.swapped_in(stashed.version, self.version):
                run_backward(stashed.output, grad)
        else:
            with self._rng.own():
                run_backward(stashed.output, grad)
        self._held_bytes += self._updates.keep(n, summed)
        if self._weights.snapshots:
            self._weights.release({s.version for s in self._stash.values()})
        self._note_stash()
        if self.is_first or not stashed.inputs.requires_grad:
            return None
        return stashed.inputs.grad

    @torch.no_grad()
    def update(self, microbatches: Sequence[int]) -> None:
        """U(ns): apply the pending updates of ``ns`` as their mean at the stage's lr."""
        missing = [n for n in microbatches if n not in self._updates.pending]
        if missing:
            raise ScheduleError(
                f"stage {self.index}: U applies micro-batch {missing[0]} that has no "
                "completed backward on this stage"
            )
        self._held_bytes -= self._updates.apply(microbatches, self.lr)
        self.version += len(microbatches)
        self.counters.updates_applied += len(microbatches)

    # -- inference and state ---------------------------------------------------------------
    @contextmanager
    def evaluation(self, stream: int) -> Iterator[None]:
        """Evaluation mode on random streams of its own: every tile's generator (IO noise)
        and the stage's torch random state are replaced by ones seeded from ``stream`` and
        restored afterwards, so evaluating — on any data, in any chunks, or not at all —
        never changes what training draws."""
        training = self.modules.training
        try:
            with self._rng.evaluation(self._tiles, stream):
                self.modules.train(False)
                yield
        finally:
            self.modules.train(training)

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without recording anything (on the stage's own random state); use inside
        :meth:`evaluation`."""
        with self._rng.own():
            return self._run_blocks(x)

    @property
    def idle(self) -> bool:
        """No activation or pending update held (the pipeline is drained here)."""
        return not self._stash and not self._updates.pending

    def model_state(self) -> dict[str, Any]:
        """The blocks' state_dict with the keys of the whole model (``"<block>.<key>"``)."""
        out: dict[str, Any] = {}
        for name, module in zip(self.names, self.modules, strict=True):
            for key, value in module.state_dict().items():
                out[f"{name}.{key}"] = value
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: block states (tile RNGs included), the
        stage's random state, version and counters. Only valid when ``idle``."""
        if not self.idle:
            raise ScheduleError(
                f"stage {self.index}: cannot save state with micro-batches in flight"
            )
        return {
            "blocks": {
                name: m.state_dict() for name, m in zip(self.names, self.modules, strict=True)
            },
            "rng_state": self._rng.state.clone(),
            "version": self.version,
            "lr": self.lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, module in zip(self.names, self.modules, strict=True):
            module.load_state_dict(state["blocks"][name])
        self._rng.state = state["rng_state"].clone()
        self.version = int(state["version"])
        self.lr = float(state["lr"])
