"""A stage's pending update stash: what each backward leaves for the update that applies it.

``B(n)`` leaves, per micro-batch, the (x, d) pairs that each analog layer and each digital
``nn.Linear`` (:mod:`~aimcpipe.stages.deferred_linear`) recorded, and the gradients of the
other digital parameters; ``U(ns)`` applies those of ``ns`` as one update at their mean.
When the caller names the update group of a backward that comes in the group's order, the
digital gradients of the group are summed as they come, into one buffer per parameter
(:meth:`PendingUpdates.prepare`), instead of one gradient set per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from aimcpipe.analog.layers import AnalogLayer
from aimcpipe.stages.deferred_linear import DeferredLinear, apply_pending

__all__ = ["GroupSum", "PendingUpdates"]

# an update group's running sum: (micro-batches summed so far, per digital param: their sum)
GroupSum = tuple[list[int], list[torch.Tensor | None]]


class PendingUpdates:
    """The pending updates of a stage's ``analog`` layers, deferred ``linears`` and other
    ``digital`` parameters, by micro-batch."""

    def __init__(
        self,
        analog: Sequence[AnalogLayer],
        linears: Sequence[DeferredLinear],
        digital: Sequence[nn.Parameter],
    ) -> None:
        self._analog = analog
        self._linears = linears
        self._digital = digital
        # each analog layer's list of recorded (x, d), read without nn.Module lookups
        self._records_of = [layer.analog.pending for layer in analog]
        self._records_of += [layer.pending for layer in linears]
        # n -> ([per analog layer: list of (x, d)], [per digital param: grad or None], or
        # None where n's gradients went into its group's running sum)
        self.pending: dict[int, tuple[list[list[Any]], list[torch.Tensor | None] | None]] = {}
        self.sums: dict[tuple[int, ...], GroupSum] = {}  # update group -> its running sum
        self.pending_bytes: dict[int, int] = {}

    def prepare(self, n: int, group: tuple[int, ...] | None) -> GroupSum | None:
        """Before B(n) back-propagates: the layers' records emptied and every digital
        parameter's ``.grad`` set to what autograd adds B(n)'s gradient to — the running sum
        of ``group`` that B(n) joins (returned), or nothing (None returned)."""
        summed = self._summed_into(n, group)
        for pending in self._records_of:
            pending.clear()
        if summed is None:
            for p in self._digital:
                p.grad = None
        else:  # autograd adds this micro-batch's gradient to the group's sum so far
            for p, total in zip(self._digital, summed[1], strict=True):
                p.grad = total
        return summed

    def keep(self, n: int, summed: GroupSum | None) -> int:
        """After B(n) back-propagated: what it recorded, and its digital gradients (or the
        group's sum ``summed`` they went into), moved into the stash; returns the bytes kept
        for ``n``."""
        records_of = self._records_of
        records = [pending[:] for pending in records_of]
        grads: list[torch.Tensor | None] | None = [p.grad for p in self._digital]
        for pending in records_of:
            pending.clear()
        for p in self._digital:
            p.grad = None  # the gradient is now only ours (update may add into it)
        if summed is not None:
            summed[0].append(n)
            summed[1][:] = grads  # type: ignore[index]
            grads = None  # in the group's sum
        self.pending[n] = (records, grads)
        nbytes = sum(x.nbytes + d.nbytes for per_layer in records for x, d in per_layer)
        self.pending_bytes[n] = nbytes
        return nbytes

    def apply(self, microbatches: Sequence[int], lr: float) -> int:
        """Apply the pending updates of ``microbatches`` (all in the stash) as their mean at
        ``lr``; returns the bytes let go. Call under ``torch.no_grad()``."""
        entries = [self.pending.pop(n) for n in microbatches]
        freed = 0
        for n in microbatches:
            freed += self.pending_bytes.pop(n)
        scale = 1.0 / len(entries)
        for i, layer in enumerate(self._analog):
            layer.analog.pending[:] = [rec for records, _ in entries for rec in records[i]]
            layer.analog.apply_pending(lr, scale)
        for i, linear in enumerate(self._linears, start=len(self._analog)):
            apply_pending(
                linear, [rec for records, _ in entries for rec in records[i]], -lr * scale
            )
        # the group's running sum (all or some of its micro-batches), then any kept apart
        summed = self.sums.pop(tuple(microbatches), None)
        for j, p in enumerate(self._digital):
            total: torch.Tensor | None = None if summed is None else summed[1][j]
            for _, grads in entries:
                g = None if grads is None else grads[j]
                if g is None:
                    continue
                total = g if total is None else total.add_(g)  # backward handed them over
            if total is not None:
                p.data.add_(total, alpha=-lr * scale)
        return freed

    def _summed_into(self, n: int, group: tuple[int, ...] | None) -> GroupSum | None:
        """The running sum (members so far, per-parameter sums) that B(n) adds to, or None
        to keep n's gradients apart: without a group, or when n does not come next in it."""
        if group is None or not self._digital:
            return None
        summed = self.sums.get(group)
        if summed is None:
            if n != group[0]:
                return None
            summed = self.sums[group] = ([], [None] * len(self._digital))
        members = summed[0]
        if len(members) >= len(group) or group[len(members)] != n:
            return None
        return summed
