"""Configuration of simulated analog tiles: device, IO and update parameters.

Names follow IBM aihwkit's vocabulary (``dw_min``, ``w_max``, ``up_down``, ``desired_bl``,
``inp_res``, ``out_noise`` ...) so an aihwkit ``rpu_config`` translates line by line. Every
dataclass is frozen and validates itself on construction: a bad value raises ``ConfigError``
naming the parameter and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from aimcpipe.dataconf import check_fields, from_dict, to_dict
from aimcpipe.errors import ConfigError

__all__ = [
    "DEVICE_KINDS",
    "RULES",
    "AnalogConfig",
    "DeviceConfig",
    "IOConfig",
    "TikiTakaConfig",
    "UpdateConfig",
    "io_preset",
]

DeviceKind = Literal["ideal", "soft-bounds", "constant-step", "power-step"]
DEVICE_KINDS: tuple[str, ...] = ("ideal", "soft-bounds", "constant-step", "power-step")
Rule = Literal["digital-sgd", "analog-sgd", "tiki-taka"]
RULES: tuple[str, ...] = ("digital-sgd", "analog-sgd", "tiki-taka")


def _nonneg(name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{name}: must be a finite number >= 0, got {value!r}")


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name}: must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class DeviceConfig:
    """How one cross-point responds to an update request.

    Response factors (docs/design.md §3): a requested change ``ΔW = P − N`` (P, N ≥ 0) is realised
    as ``W += P ⊙ q+(W) − N ⊙ q−(W)``, then clipped to ``[w_min, w_max]``.

    - ``ideal``: q± = 1, no bounds.
    - ``soft-bounds`` (asymmetric linear device, ALD): q+ = (1+up_down)(1 − w/w_max),
      q− = (1−up_down)(1 − w/w_min). With ``tau`` set, w_max = tau and w_min = −tau, which gives
      the papers' ``q±(w) = 1 ∓ w/τ``.
    - ``constant-step``: q+ = 1+up_down, q− = 1−up_down, hard bounds.
    - ``power-step``: q+ = (1+up_down)·(2(w_max − w)/(w_max − w_min))^pow_gamma,
      q− = (1−up_down)·(2(w − w_min)/(w_max − w_min))^pow_gamma; with pow_gamma = 1 and
      symmetric bounds it equals soft-bounds.

    The ``*_dtod`` values are device-to-device variation: standard deviations of
    per-cross-point parameters, drawn once per tile from its seed.
    """

    kind: DeviceKind = "soft-bounds"
    """The device model: ``ideal``, ``soft-bounds``, ``constant-step`` or ``power-step``
    (response factors above)."""
    tau: float | None = None
    """Symmetric bounds: with ``tau`` set, w_max = tau and w_min = −tau, which gives the
    papers' ``q±(w) = 1 ∓ w/τ``. An alternative to explicit ``w_max``/``w_min``: give one or
    the other."""
    w_max: float = 1.0
    """The upper bound of a weight (> 0 unless ``kind: ideal``)."""
    w_min: float = -1.0
    """The lower bound of a weight (< 0 unless ``kind: ideal``)."""
    dw_min: float = 0.001
    """The step of one pulse (used by the pulsed update, and as the unit of write noise)."""
    up_down: float = 0.0
    """Up/down asymmetry in (−1, 1): q+ carries a factor 1+up_down, q− a factor
    1−up_down."""
    pow_gamma: float = 1.0
    """The exponent of ``power-step`` (> 0)."""
    dw_min_dtod: float = 0.0
    """Device-to-device variation of ``dw_min``: relative standard deviation."""
    w_max_dtod: float = 0.0
    """Device-to-device variation of ``w_max``: relative standard deviation."""
    w_min_dtod: float = 0.0
    """Device-to-device variation of ``w_min``: relative standard deviation."""
    up_down_dtod: float = 0.0
    """Device-to-device variation of ``up_down``: absolute standard deviation."""
    dw_min_std: float = 0.0
    """The relative cycle-to-cycle noise of each pulse."""
    write_noise_std: float = 0.0
    """Write noise: what MVMs read after each update is the device state plus a fresh
    ``write_noise_std · dw_min · ξ`` (the noise is redrawn, it does not accumulate)."""

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_KINDS:
            raise ConfigError(
                f"kind: unknown device {self.kind!r}; use one of {', '.join(DEVICE_KINDS)}"
            )
        check_fields(self)
        if self.tau is not None:
            _positive("tau", self.tau)
            if (self.w_max, self.w_min) not in ((1.0, -1.0), (self.tau, -self.tau)):
                raise ConfigError("tau: set either tau or w_max/w_min, not both")
            object.__setattr__(self, "w_max", float(self.tau))
            object.__setattr__(self, "w_min", -float(self.tau))
        if self.kind != "ideal" and not (self.w_min < 0 < self.w_max):
            raise ConfigError(
                f"w_min/w_max: bounds must enclose 0 (w_min < 0 < w_max), "
                f"got w_min={self.w_min}, w_max={self.w_max}"
            )
        _positive("dw_min", self.dw_min)
        if not -1 < self.up_down < 1:
            raise ConfigError(f"up_down: must lie in (-1, 1), got {self.up_down!r}")
        _positive("pow_gamma", self.pow_gamma)
        for name in (
            "dw_min_dtod",
            "w_max_dtod",
            "w_min_dtod",
            "up_down_dtod",
            "dw_min_std",
            "write_noise_std",
        ):
            _nonneg(name, getattr(self, name))

    @property
    def has_dtod(self) -> bool:
        return any(
            getattr(self, n) > 0
            for n in ("dw_min_dtod", "w_max_dtod", "w_min_dtod", "up_down_dtod")
        )


@dataclass(frozen=True)
class IOConfig:
    """Non-idealities of one direction of matrix-vector multiplication (forward or backward).

    Order of operations for ``y = W x`` (per sample): noise management divides x by
    ``max|x|`` (``noise_management: abs-max``); inputs are clipped to
    ``[-inp_bound, inp_bound]`` (0: unbounded) and quantised to steps of
    ``inp_res · 2·inp_bound``; the analog MVM; Gaussian ``out_noise`` is added; outputs are
    clipped to ``[-out_bound, out_bound]`` and quantised to steps of ``out_res · 2·out_bound``;
    the noise-management scale is multiplied back. Resolutions are fractions of the full range,
    as in aihwkit (``1/254``: 8 bits); 0 means no quantisation, a bound of 0 means unbounded.
    """

    noise_management: Literal["none", "abs-max"] = "none"
    """``abs-max``: divide each sample's input by its ``max|x|`` before the MVM and multiply
    the output back; ``none``: no scaling."""
    inp_bound: float = 0.0
    """Inputs are clipped to ``[-inp_bound, inp_bound]`` (0: unbounded)."""
    inp_res: float = 0.0
    """Input quantisation step as a fraction of the range ``2·inp_bound`` (``1/254``: 8
    bits; 0: none; needs ``inp_bound`` > 0)."""
    out_noise: float = 0.0
    """Standard deviation of the Gaussian noise added to each output."""
    out_bound: float = 0.0
    """Outputs are clipped to ``[-out_bound, out_bound]`` (0: unbounded)."""
    out_res: float = 0.0
    """Output quantisation step as a fraction of the range ``2·out_bound`` (0: none; needs
    ``out_bound`` > 0)."""

    def __post_init__(self) -> None:
        if self.noise_management not in ("none", "abs-max"):
            raise ConfigError(
                f"noise_management: {self.noise_management!r} is not allowed; "
                "use 'none' or 'abs-max'"
            )
        check_fields(self)
        for name in ("inp_bound", "inp_res", "out_noise", "out_bound", "out_res"):
            _nonneg(name, getattr(self, name))
        if self.out_res > 0 and self.out_bound == 0:
            raise ConfigError("out_res: output quantisation needs out_bound > 0")
        if self.inp_res > 0 and self.inp_bound == 0:
            raise ConfigError("inp_res: input quantisation needs inp_bound > 0")

    @property
    def is_ideal(self) -> bool:
        return (
            self.noise_management == "none"
            and self.inp_bound == 0
            and self.inp_res == 0
            and self.out_noise == 0
            and self.out_bound == 0
        )


_EIGHT_BIT = 1.0 / (2**8 - 2)


def io_preset(name: str) -> IOConfig:
    """Named IO presets: ``ideal`` (exact MVM) and ``paper`` (arXiv 2410.15155: 8-bit input
    and output quantisation, 0.5 % output noise, abs-max noise management)."""
    if name == "ideal":
        return IOConfig()
    if name == "paper":
        return IOConfig(
            noise_management="abs-max",
            inp_bound=1.0,
            inp_res=_EIGHT_BIT,
            out_noise=0.005,
            out_bound=12.0,
            out_res=_EIGHT_BIT,
        )
    raise ConfigError(f"io preset: unknown {name!r}; use 'ideal' or 'paper'")


@dataclass(frozen=True)
class UpdateConfig:
    """How an update request reaches the devices (docs/design.md §3)."""

    mode: Literal["expected", "pulsed"] = "expected"
    """``expected`` applies the expected device response in closed form; ``pulsed`` fires
    stochastic pulse trains of at most ``desired_bl`` bits per sample (aihwkit's
    StochasticCompressed with update bit-length management)."""
    granularity: Literal["sample", "batch"] = "sample"
    """``mode: expected``: whether the asymmetric term uses the magnitude of the summed
    update (``batch``, the papers' ``W ← W − αg − (α/τ)|g|⊙W``) or the sum of per-sample
    magnitudes (``sample``, what pulsed hardware does in expectation)."""
    desired_bl: int = 31
    """``mode: pulsed``: the most pulses (bits) per sample of one update (>= 1)."""

    def __post_init__(self) -> None:
        if self.mode not in ("expected", "pulsed"):
            raise ConfigError(f"mode: {self.mode!r} is not allowed; use 'expected' or 'pulsed'")
        if self.granularity not in ("sample", "batch"):
            raise ConfigError(
                f"granularity: {self.granularity!r} is not allowed; use 'sample' or 'batch'"
            )
        check_fields(self)
        if isinstance(self.desired_bl, bool) or not isinstance(self.desired_bl, int):
            raise ConfigError(f"desired_bl: expected an integer, got {self.desired_bl!r}")
        if self.desired_bl < 1:
            raise ConfigError(f"desired_bl: must be >= 1, got {self.desired_bl}")


@dataclass(frozen=True)
class TikiTakaConfig:
    """Tiki-Taka v1 (arXiv 2406.12774 §4): gradients go to a fast tile A at the optimizer's
    learning rate β; every ``transfer_every`` updates, ``transfer_columns`` columns of A
    (cycling) are read through the forward IO and written onto the slow tile C at
    ``transfer_lr`` α through C's device. Forward and backward MVMs use ``C + gamma·A``.

    "Updates" are updates of A: one per ``U`` action of a pipeline stage, i.e. one per
    mini-batch under wop and sync-1f1b (A gets the mean of Bm micro-batches) and one per
    micro-batch under async. With ``transfer_every: 1`` both transfer after every update of A
    at the same α; to transfer per sample count instead, scale ``transfer_every`` with Bm."""

    transfer_every: int = 1
    """Transfer from A to C every this many updates of A (>= 1)."""
    transfer_columns: int | None = None
    """Columns of A (cycling) transferred each time (>= 1); null: all of them."""
    transfer_lr: float | None = None
    """The transfer learning rate α; null: α = β, following the learning-rate schedule; a
    number is a fixed α (> 0)."""
    gamma: float = 0.0
    """The weight of A in what MVMs read, ``C + gamma·A`` (>= 0)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if (
            not isinstance(self.transfer_every, int)
            or isinstance(self.transfer_every, bool)
            or (self.transfer_every < 1)
        ):
            raise ConfigError(
                f"transfer_every: must be an integer >= 1, got {self.transfer_every!r}"
            )
        if self.transfer_columns is not None and (
            not isinstance(self.transfer_columns, int)
            or isinstance(self.transfer_columns, bool)
            or self.transfer_columns < 1
        ):
            raise ConfigError(
                f"transfer_columns: must be >= 1 or null (all), got {self.transfer_columns!r}"
            )
        if self.transfer_lr is not None:
            _positive("transfer_lr", self.transfer_lr)
        _nonneg("gamma", self.gamma)


@dataclass(frozen=True)
class AnalogConfig:
    """Everything an analog layer needs: the update rule, the device, forward/backward IO and
    the update mechanism."""

    rule: Rule = "analog-sgd"
    """The update rule: ``digital-sgd`` keeps the weights digital (ideal device, no bounds)
    but still runs MVMs through the configured IO; ``analog-sgd`` writes the gradient
    through the device; ``tiki-taka`` uses two tiles (``tiki_taka``)."""
    device: DeviceConfig = field(default_factory=DeviceConfig)
    """How a cross-point responds to an update request."""
    forward: IOConfig = field(default_factory=IOConfig)
    """The IO of forward MVMs, or a preset name: ``ideal`` or ``paper``."""
    backward: IOConfig = field(default_factory=IOConfig)
    """The IO of backward MVMs, or a preset name: ``ideal`` or ``paper``."""
    update: UpdateConfig = field(default_factory=UpdateConfig)
    """How an update request reaches the devices."""
    tiki_taka: TikiTakaConfig = field(default_factory=TikiTakaConfig)
    """The Tiki-Taka settings (``rule: tiki-taka``)."""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"rule: unknown {self.rule!r}; use one of {', '.join(RULES)}")
        for key in ("forward", "backward"):  # a preset name, as in a config file
            if isinstance(getattr(self, key), str):
                try:
                    object.__setattr__(self, key, io_preset(getattr(self, key)))
                except ConfigError as exc:
                    raise ConfigError(f"{key}: {exc}") from None
        check_fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "analog") -> AnalogConfig:
        """Build from plain data. ``forward``/``backward`` (or ``io`` for both) may also be a
        preset name, ``'ideal'`` or ``'paper'``."""
        data = dict(data)
        io = data.pop("io", None)
        for key in ("forward", "backward"):
            value = data.get(key, io)
            if isinstance(value, str):
                try:
                    data[key] = io_preset(value)
                except ConfigError as exc:
                    raise ConfigError(f"{path}.{key}: {exc}") from None
            elif value is not None:
                data[key] = value
        return from_dict(cls, data, path)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def with_rule(self, rule: str) -> AnalogConfig:
        return replace(self, rule=rule)  # type: ignore[arg-type]
