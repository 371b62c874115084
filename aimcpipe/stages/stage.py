"""A pipeline stage: a contiguous run of model blocks with its tiles, stashes and versions.

A ``Stage`` executes the three actions of docs/design.md §4 for any micro-batch, in whatever
order its schedule gives:

* ``forward(n, x)`` runs the blocks and keeps the autograd graph (the *activation stash*)
  until ``backward(n)``; the last stage also computes the loss against the target.
* ``backward(n, grad)`` back-propagates. Analog layers record their (x, d) pairs and digital
  parameters their gradients; the stage moves both into its *pending update stash* keyed by
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
process's CUDA generator.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aimcpipe.analog.layers import AnalogLayer
from aimcpipe.analog.tile import AnalogTile
from aimcpipe.errors import ScheduleError
from aimcpipe.seeding import derive_seed

__all__ = ["LossFn", "Stage", "StageCounters"]

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


@dataclass
class _Stashed:
    """What F(n) leaves for B(n): the input leaf, the output (or loss) and the version."""

    inputs: torch.Tensor
    output: torch.Tensor
    version: int
    nbytes: int


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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
        self.modules = nn.ModuleList([module for _, module in blocks])
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
        self._stash: dict[int, _Stashed] = {}
        # n -> ([per analog layer: list of (x, d)], [per digital param: grad or None])
        self._pending: dict[int, tuple[list[list[Any]], list[torch.Tensor | None]]] = {}
        self._pending_bytes: dict[int, int] = {}
        self._snapshots: dict[int, list[torch.Tensor]] = {}  # version -> weights (stashing)
        self._seed = seed
        generator = torch.Generator().manual_seed(derive_seed(seed, "stage-rng", index))
        self._rng_state = generator.get_state()

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def held(self) -> int:
        """Micro-batches held from F until the U that applies them (the stash count)."""
        return len(self._stash) + len(self._pending)

    def _note_stash(self) -> None:
        c = self.counters
        c.peak_stash = max(c.peak_stash, self.held)
        nbytes = (
            sum(s.nbytes for s in self._stash.values())
            + sum(self._pending_bytes.values())
            + sum(_nbytes(t) for snap in self._snapshots.values() for t in snap)
        )
        c.peak_stash_bytes = max(c.peak_stash_bytes, nbytes)

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        saved = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(saved)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.modules:
            x = module(x)
        return x

    # -- actions ---------------------------------------------------------------------------
    def forward(
        self, n: int, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float] | None]:
        """F(n). Returns the activation to send downstream (detached), or on the last stage
        ``(loss, stats)`` where stats holds the micro-batch's loss and correct count."""
        if n in self._stash or n in self._pending:
            raise ScheduleError(f"stage {self.index}: F{n} runs twice")
        if not self.is_first and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        if self.weight_stashing and self.version not in self._snapshots:
            self._snapshots[self.version] = [t.detach().clone() for t in self._stashable()]
        # what autograd keeps for the backward is the activation stash's real size (weights,
        # which autograd also saves, are not activations)
        weights = self._weight_storages
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.layout == torch.strided:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in weights:
                    saved[ptr] = t.untyped_storage().nbytes()
            return t

        with (
            self._own_rng(),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            y = self._run_blocks(x)
            stats = None
            if self.is_last:
                if target is None:
                    raise ScheduleError(f"stage {self.index}: F{n} has no target")
                assert self.loss_fn is not None
                loss = self.loss_fn(y, target)
                stats = {"loss": float(loss.detach()), "samples": float(len(target))}
                if y.dim() == 2 and target.dim() == 1 and not target.is_floating_point():
                    correct = (y.detach().argmax(dim=1) == target).sum()
                    stats["correct"] = float(correct)
                y = loss
        saved.setdefault(x.untyped_storage().data_ptr(), _nbytes(x))
        self._stash[n] = _Stashed(x, y, self.version, sum(saved.values()))
        self._note_stash()
        return (y.detach(), stats)

    def backward(self, n: int, grad: torch.Tensor | None = None) -> torch.Tensor | None:
        """B(n). ``grad`` is d(loss)/d(output) from the next stage (None on the last stage).
        Returns d(loss)/d(input) to send upstream (None on the first stage)."""
        stashed = self._stash.pop(n, None)
        if stashed is None:
            raise ScheduleError(f"stage {self.index}: B{n} before F{n}")
        if grad is None and not self.is_last:
            raise ScheduleError(
                f"stage {self.index}: B{n} has no gradient from stage {self.index + 1}"
            )
        delay = self.version - stashed.version
        hist = self.counters.staleness_histogram
        hist[delay] = hist.get(delay, 0) + 1
        for layer in self.analog:
            layer.analog.pending.clear()
        for p in self.digital:
            p.grad = None
        with self._own_rng(), self._weights_of(stashed.version):
            stashed.output.backward(grad)
        records = [list(layer.analog.pending) for layer in self.analog]
        grads = [p.grad for p in self.digital]
        for layer in self.analog:
            layer.analog.pending.clear()
        for p in self.digital:
            p.grad = None
        self._pending[n] = (records, grads)
        self._pending_bytes[n] = sum(
            _nbytes(x) + _nbytes(d) for per_layer in records for x, d in per_layer
        )
        self._release_snapshots()
        self._note_stash()
        if self.is_first or not stashed.inputs.requires_grad:
            return None
        return stashed.inputs.grad

    @torch.no_grad()
    def update(self, microbatches: Sequence[int]) -> None:
        """U(ns): apply the pending updates of ``ns`` as their mean at the stage's lr."""
        missing = [n for n in microbatches if n not in self._pending]
        if missing:
            raise ScheduleError(
                f"stage {self.index}: U applies micro-batch {missing[0]} that has no "
                "completed backward on this stage"
            )
        entries = [self._pending.pop(n) for n in microbatches]
        for n in microbatches:
            del self._pending_bytes[n]
        scale = 1.0 / len(entries)
        for i, layer in enumerate(self.analog):
            layer.analog.pending[:] = [rec for records, _ in entries for rec in records[i]]
            layer.analog.apply_pending(self.lr, scale)
        for j, p in enumerate(self.digital):
            total: torch.Tensor | None = None
            for _, grads in entries:
                g = grads[j]
                if g is None:
                    continue
                total = g.clone() if total is None else total.add_(g)
            if total is not None:
                p.data.add_(total, alpha=-self.lr * scale)
        self.version += len(entries)
        self.counters.updates_applied += len(entries)

    # -- weight stashing -------------------------------------------------------------------
    def _weight_tensors(self) -> list[torch.Tensor]:
        return list(self.modules.parameters()) + list(self.modules.buffers())

    def _stashable(self) -> list[torch.Tensor]:
        """What a backward reads: the tiles' weights and the digital parameters."""
        return [tile.weight for tile in self._tiles] + [p.data for p in self.digital]

    @contextmanager
    def _weights_of(self, version: int) -> Iterator[None]:
        snapshot = self._snapshots.get(version) if self.weight_stashing else None
        if snapshot is None or version == self.version:
            yield
            return
        current = self._stashable()
        saved = [t.clone() for t in current]
        for t, old in zip(current, snapshot, strict=True):
            t.copy_(old)
        try:
            yield
        finally:
            for t, new in zip(current, saved, strict=True):
                t.copy_(new)

    def _release_snapshots(self) -> None:
        if not self._snapshots:
            return
        live = {s.version for s in self._stash.values()}
        for version in list(self._snapshots):
            if version not in live:
                del self._snapshots[version]

    # -- inference and state ---------------------------------------------------------------
    @contextmanager
    def evaluation(self, stream: int) -> Iterator[None]:
        """Evaluation mode on random streams of its own: every tile's generator (IO noise)
        and the stage's torch random state are replaced by ones seeded from ``stream`` and
        restored afterwards, so evaluating — on any data, in any chunks, or not at all —
        never changes what training draws."""
        tiles = self._tiles
        kept = [tile._generator for tile in tiles]
        kept_rng = self._rng_state
        training = self.modules.training
        try:
            for tile in tiles:
                g = torch.Generator(device=tile.weight.device)
                g.manual_seed(derive_seed(tile.seed, "eval", stream))
                tile._generator = g
            self.modules.train(False)
            seed = derive_seed(self._seed, "eval", self.index, stream)
            self._rng_state = torch.Generator().manual_seed(seed).get_state()
            yield
        finally:
            for tile, g in zip(tiles, kept, strict=True):
                tile._generator = g
            self._rng_state = kept_rng
            self.modules.train(training)

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without recording anything (on the stage's own random state); use inside
        :meth:`evaluation`."""
        with self._own_rng():
            return self._run_blocks(x)

    @property
    def idle(self) -> bool:
        """No activation or pending update held (the pipeline is drained here)."""
        return not self._stash and not self._pending

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
            "rng_state": self._rng_state.clone(),
            "version": self.version,
            "lr": self.lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, module in zip(self.names, self.modules, strict=True):
            module.load_state_dict(state["blocks"][name])
        self._rng_state = state["rng_state"].clone()
        self.version = int(state["version"])
        self.lr = float(state["lr"])
