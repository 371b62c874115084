"""One simulated crossbar array: conductance-encoded weights, device state, IO, randomness.

A tile is an ``nn.Module`` whose state lives in buffers (weights, device-to-device
parameters) plus an extra state (its random generator), so ``state_dict()`` /
``load_state_dict()`` round-trip it exactly and ``.to(device)`` moves it. Tile weights are
*not* ``nn.Parameter``: no torch optimizer ever touches them; they change only through
``update`` (the device response), as on hardware.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from aimcpipe.analog.config import DeviceConfig, IOConfig, UpdateConfig
from aimcpipe.analog.devices import (
    DeviceState,
    apply_response,
    cycle_to_cycle_std,
    pulse_counts,
    requested_update,
    response_factors,
    sample_device_state,
)
from aimcpipe.analog.io import analog_mvm
from aimcpipe.seeding import derive_seed

__all__ = ["AnalogTile"]

log = logging.getLogger(__name__)


class AnalogTile(nn.Module):
    """An ``out_features × in_features`` analog array.

    ``forward(x)`` is the MVM ``x Wᵀ`` through the forward IO, ``transposed(d)`` the MVM
    ``d W`` through the backward IO, and ``update(x, d, lr)`` realises ``ΔW = −lr·dᵀx`` through
    the device (expected or pulsed). All randomness (device-to-device draw, pulses, IO noise,
    write noise) comes from one generator seeded with ``seed`` and consumed in call order.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        device_config: DeviceConfig | None = None,
        *,
        forward_io: IOConfig | None = None,
        backward_io: IOConfig | None = None,
        update: UpdateConfig | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.device_config = device_config or DeviceConfig()
        self.forward_io = forward_io or IOConfig()
        self.backward_io = backward_io or IOConfig()
        self.update_config = update or UpdateConfig()
        self.seed = int(seed)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.seed)
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, device=device, dtype=dtype)
        )
        state = sample_device_state(
            self.device_config,
            (out_features, in_features),
            self._generator,
            device=device,
            dtype=dtype,
        )
        for name, value in state.as_dict().items():
            self.register_buffer(name, value)
        if self.device_config.write_noise_std > 0:
            self.register_buffer("hidden_weight", torch.zeros_like(self.weight))

    # -- state ---------------------------------------------------------------------------
    @property
    def device_state(self) -> DeviceState:
        return DeviceState(self.dw_min, self.w_max, self.w_min, self.up_down)

    @property
    def generator(self) -> torch.Generator:
        return self._generator

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Program the array to ``weight`` (clipped to the device bounds)."""
        if weight.shape != self.weight.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} != {tuple(self.weight.shape)}")
        self.weight.copy_(weight)
        if self.device_config.kind != "ideal":
            torch.clamp(self.weight, min=self.w_min, max=self.w_max, out=self.weight)
        if self.device_config.write_noise_std > 0:
            self.hidden_weight.copy_(self.weight)

    def get_extra_state(self) -> dict[str, Any]:
        return {"rng_state": self._generator.get_state(), "rng_device": self._generator.device.type}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["rng_device"] == self._generator.device.type:
            self._generator.set_state(state["rng_state"])
        else:
            log.warning(
                "tile random state saved on %s cannot be restored on %s; reseeding",
                state["rng_device"],
                self._generator.device.type,
            )
            self._generator.manual_seed(derive_seed(self.seed, "moved", self.weight.device.type))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        if self.weight.device != self._generator.device:
            # Generators cannot move between devices: start a new, deterministic stream there.
            self._generator = torch.Generator(device=self.weight.device)
            self._generator.manual_seed(derive_seed(self.seed, "moved", self.weight.device.type))
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.out_features}x{self.in_features}, device={self.device_config.kind}, "
            f"update={self.update_config.mode}/{self.update_config.granularity}, seed={self.seed}"
        )

    # -- MVMs ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return analog_mvm(self.weight, x.to(self.weight.dtype), self.forward_io, self._generator)

    def transposed(self, d: torch.Tensor) -> torch.Tensor:
        return analog_mvm(
            self.weight, d.to(self.weight.dtype), self.backward_io, self._generator, transposed=True
        )

    def read_columns(self, columns: torch.Tensor) -> torch.Tensor:
        """Read columns ``W[:, j]`` through the forward IO by driving one-hot inputs; returns
        ``len(columns) × out``."""
        eye = torch.zeros(
            len(columns), self.in_features, device=self.weight.device, dtype=self.weight.dtype
        )
        eye[torch.arange(len(columns), device=columns.device), columns] = 1.0
        return self.forward(eye)

    # -- update ----------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, x: torch.Tensor, d: torch.Tensor, lr: float) -> None:
        """Realise ``ΔW = −lr · dᵀx`` through the device; ``x`` is b × in, ``d`` is b × out."""
        x = x.to(self.weight.dtype).reshape(-1, self.in_features)
        d = d.to(self.weight.dtype).reshape(-1, self.out_features)
        if x.shape[0] != d.shape[0]:
            raise ValueError(f"update: {x.shape[0]} inputs but {d.shape[0]} errors")
        if not lr >= 0:
            raise ValueError(f"update: lr must be >= 0, got {lr}")
        if x.shape[0] == 0 or lr == 0:
            return
        cfg = self.device_config
        state = self.device_state
        extra = None
        if self.update_config.mode == "pulsed" and cfg.kind != "ideal":
            coincidences, signed = pulse_counts(
                x, d, lr, cfg.dw_min, self.update_config.desired_bl, self._generator
            )
            if cfg.dw_min_std > 0:
                q_up, q_down = response_factors(cfg, self.weight, state)
                std = cycle_to_cycle_std(
                    coincidences, signed, q_up, q_down, state.dw_min, cfg.dw_min_std
                )
                extra = torch.randn(
                    std.shape, generator=self._generator, device=std.device, dtype=std.dtype
                ).mul_(std)
            delta = signed.mul_(state.dw_min)
            magnitude = coincidences.mul_(state.dw_min)
        else:
            delta, magnitude = requested_update(x, d, lr, self.update_config.granularity)
            if cfg.has_dtod:  # per-device step sizes scale the response, as pulses would
                relative = state.dw_min / cfg.dw_min
                delta.mul_(relative)
                magnitude.mul_(relative)
        if cfg.write_noise_std > 0:
            # The device state evolves without write noise; what MVMs read is that state plus
            # a fresh draw of write noise after every update (it does not accumulate).
            apply_response(cfg, self.hidden_weight, state, delta, magnitude, extra=extra)
            noise = torch.randn(
                self.weight.shape,
                generator=self._generator,
                device=self.weight.device,
                dtype=self.weight.dtype,
            )
            noise.mul_(state.dw_min * cfg.write_noise_std)
            torch.add(self.hidden_weight, noise, out=self.weight)
            if cfg.kind != "ideal":
                torch.clamp(self.weight, min=self.w_min, max=self.w_max, out=self.weight)
        else:
            apply_response(cfg, self.weight, state, delta, magnitude, extra=extra)
