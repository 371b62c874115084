"""Update rules: how an analog layer's weight is stored and trained.

- ``digital-sgd``: a plain weight updated exactly, ``W −= lr·dᵀx`` (the baseline). It is a
  tile with the ideal device, so MVMs still go through the configured IO.
- ``analog-sgd``: one tile; updates go through the device response.
- ``tiki-taka``: TT-v1 (arXiv 2406.12774 §4): gradient updates go to a fast tile A at the
  learning rate β; every ``transfer_every`` updates, columns of A are read through the
  forward IO and written onto the slow tile C at α through C's device. MVMs use C + γA.

Every rule also keeps the *pending* (x, d) pairs that backward recorded until the stage (or
``AnalogSGD``) applies them: docs/design.md §3 requires updates to be explicit actions.
"""

from __future__ import annotations

import torch
from torch import nn

from aimcpipe.analog.config import AnalogConfig, DeviceConfig, UpdateConfig
from aimcpipe.analog.tile import AnalogTile
from aimcpipe.seeding import derive_seed

__all__ = ["AnalogWeight", "SingleTileWeight", "TikiTakaWeight", "build_weight"]


class AnalogWeight(nn.Module):
    """An out × in weight trained by an update rule. Subclasses implement the MVMs, the
    update and the effective weight."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        config: AnalogConfig,
        seed: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.config = config
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._build(seed, device, dtype)

    def _tile(
        self,
        seed: int,
        device: torch.device | str | None,
        dtype: torch.dtype,
        device_config: DeviceConfig | None = None,
        update: UpdateConfig | None = None,
    ) -> AnalogTile:
        """A tile of this weight's shape with the configured IO (and device/update unless
        given)."""
        return AnalogTile(
            self.out_features,
            self.in_features,
            device_config or self.config.device,
            forward_io=self.config.forward,
            backward_io=self.config.backward,
            update=update or self.config.update,
            seed=seed,
            device=device,
            dtype=dtype,
        )

    # to implement ----------------------------------------------------------------------
    def _build(self, seed: int, device: torch.device | str | None, dtype: torch.dtype) -> None:
        """Create the tiles and any state of the rule."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transposed(self, d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, x: torch.Tensor, d: torch.Tensor, lr: float) -> None:
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def set_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    # shared ----------------------------------------------------------------------------
    def record(self, x: torch.Tensor, d: torch.Tensor) -> None:
        """Remember one backward's (inputs, errors) until ``apply_pending``. Copies are kept:
        the caller may reuse its input and gradient buffers before the update is applied."""
        self.pending.append((x.detach().clone(), d.detach().clone()))

    @torch.no_grad()
    def apply_pending(self, lr: float, scale: float = 1.0) -> int:
        """Apply all recorded (x, d) as one update at ``lr·scale`` and forget them; returns
        how many records were applied. ``scale = 1/Bm`` applies the mean of Bm micro-batches'
        requested updates while each sample's magnitude still counts in the asymmetric term."""
        count = len(self.pending)
        if count:
            if count == 1:
                x, d = self.pending[0]
            else:
                x = torch.cat([x for x, _ in self.pending])
                d = torch.cat([d for _, d in self.pending])
            self._apply_update(x, d, lr, scale)
            self.pending.clear()
        return count

    def _apply_update(self, x: torch.Tensor, d: torch.Tensor, lr: float, scale: float) -> None:
        """One update from pending records: the mean request ``lr·scale`` by default."""
        self.update(x, d, lr * scale)

    def discard_pending(self) -> None:
        self.pending.clear()


class SingleTileWeight(AnalogWeight):
    """``analog-sgd`` and ``digital-sgd``: the weight is one tile."""

    def _build(self, seed: int, device: torch.device | str | None, dtype: torch.dtype) -> None:
        if self.config.rule == "digital-sgd":
            ideal = DeviceConfig(kind="ideal")
            exact = UpdateConfig(mode="expected", granularity="batch")
            self.tile = self._tile(seed, device, dtype, ideal, exact)
        else:
            self.tile = self._tile(seed, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tile(x)

    def transposed(self, d: torch.Tensor) -> torch.Tensor:
        return self.tile.transposed(d)

    def update(self, x: torch.Tensor, d: torch.Tensor, lr: float) -> None:
        self.tile.update(x, d, lr)

    def effective_weight(self) -> torch.Tensor:
        return self.tile.weight

    def set_weight(self, weight: torch.Tensor) -> None:
        self.tile.set_weight(weight)


class TikiTakaWeight(AnalogWeight):
    """Tiki-Taka v1 with a fast tile ``fast`` (A) and a slow tile ``slow`` (C)."""

    def _build(self, seed: int, device: torch.device | str | None, dtype: torch.dtype) -> None:
        self.fast = self._tile(derive_seed(seed, "A"), device, dtype)
        self.slow = self._tile(derive_seed(seed, "C"), device, dtype)
        tt = self.config.tiki_taka
        self.transfer_every = tt.transfer_every
        self.transfer_columns = min(tt.transfer_columns or self.in_features, self.in_features)
        self.transfer_lr = tt.transfer_lr
        self.gamma = tt.gamma
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("next_column", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.slow(x)
        if self.gamma:
            y = y + self.gamma * self.fast(x)
        return y

    def transposed(self, d: torch.Tensor) -> torch.Tensor:
        g = self.slow.transposed(d)
        if self.gamma:
            g = g + self.gamma * self.fast.transposed(d)
        return g

    @torch.no_grad()
    def update(
        self, x: torch.Tensor, d: torch.Tensor, lr: float, transfer_lr: float | None = None
    ) -> None:
        """One update of A at ``lr``; every ``transfer_every`` updates a transfer onto C at
        the configured ``transfer_lr``, else at ``transfer_lr`` given here, else at ``lr``."""
        self.fast.update(x, d, lr)
        self.updates += 1
        if int(self.updates) % self.transfer_every == 0:
            if self.transfer_lr is not None:
                transfer_lr = self.transfer_lr
            self.transfer(lr if transfer_lr is None else transfer_lr)

    def _apply_update(self, x: torch.Tensor, d: torch.Tensor, lr: float, scale: float) -> None:
        """A gets the mean of the pending requests (``lr·scale``); the transfer runs at the
        unscaled ``lr``, so α does not shrink with the number of micro-batches an update
        applies (a sync/wop U applies Bm of them, an async U one)."""
        self.update(x, d, lr * scale, transfer_lr=lr)

    @torch.no_grad()
    def transfer(self, lr: float) -> None:
        """Read the next ``transfer_columns`` columns of A through the forward IO and write
        them onto C: ``C[:, j] += lr · A[:, j]`` through C's device response."""
        start = int(self.next_column)
        columns = (
            torch.arange(start, start + self.transfer_columns, device=self.fast.weight.device)
            % self.in_features
        )
        values = self.fast.read_columns(columns)  # k × out
        inputs = values.new_zeros(len(columns), self.in_features)
        inputs[torch.arange(len(columns), device=columns.device), columns] = 1.0
        self.slow.update(inputs, -values, lr)
        self.next_column.fill_((start + self.transfer_columns) % self.in_features)

    def effective_weight(self) -> torch.Tensor:
        if self.gamma:
            return self.slow.weight + self.gamma * self.fast.weight
        return self.slow.weight

    def set_weight(self, weight: torch.Tensor) -> None:
        self.slow.set_weight(weight)
        self.fast.set_weight(torch.zeros_like(weight))


def build_weight(
    config: AnalogConfig,
    out_features: int,
    in_features: int,
    seed: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> AnalogWeight:
    """The ``AnalogWeight`` for ``config.rule``."""
    cls = TikiTakaWeight if config.rule == "tiki-taka" else SingleTileWeight
    return cls(out_features, in_features, config, seed, device=device, dtype=dtype)
