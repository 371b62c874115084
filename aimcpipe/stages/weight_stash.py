"""Weight stashing (PipeDream): a backward runs on the weights its forward saw.

With ``weight_stashing`` a stage copies what a backward reads — its tiles' weights and its
digital parameters — once per weight version that a forward ran on, swaps the copy in for
the backwards of that version while newer updates have changed the weights in place, and
lets the copy go once no forward of that version waits for its backward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from aimcpipe.analog.tile import AnalogTile

__all__ = ["WeightSnapshots"]


class WeightSnapshots:
    """Copies of the weights of ``tiles`` and ``digital`` parameters, by weight version."""

    def __init__(self, tiles: Sequence[AnalogTile], digital: Sequence[nn.Parameter]) -> None:
        self._tiles = tiles
        self._digital = digital
        self.snapshots: dict[int, list[torch.Tensor]] = {}  # version -> weights
        self.nbytes = 0

    def stashable(self) -> list[torch.Tensor]:
        """What a backward reads: the tiles' weights and the digital parameters."""
        return [tile.weight for tile in self._tiles] + [p.data for p in self._digital]

    def keep(self, version: int) -> None:
        """Copy the weights as they are now, as those of ``version`` (once per version)."""
        if version not in self.snapshots:
            self.snapshots[version] = [t.detach().clone() for t in self.stashable()]
            self.nbytes = sum(t.nbytes for v in self.snapshots.values() for t in v)

    @contextmanager
    def swapped_in(self, version: int, current: int) -> Iterator[None]:
        """The weights of ``version`` in place of those of ``current`` (the stage's version
        now) while inside; nothing to do where they are the same or no copy was kept."""
        snapshot = self.snapshots.get(version)
        if snapshot is None or version == current:
            yield
            return
        now = self.stashable()
        saved = [t.clone() for t in now]
        for t, old in zip(now, snapshot, strict=True):
            t.copy_(old)
        try:
            yield
        finally:
            for t, new in zip(now, saved, strict=True):
                t.copy_(new)

    def release(self, live: set[int]) -> None:
        """Let go of the copies of every version not in ``live`` (versions whose forwards
        still wait for their backwards)."""
        for version in list(self.snapshots):
            if version not in live:
                del self.snapshots[version]
        self.nbytes = sum(t.nbytes for v in self.snapshots.values() for t in v)
