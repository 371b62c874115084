"""Cycle cost model and optional hardware (time, energy) model (docs/design.md §4).

Costs are in *cycles* of the accelerator clock:

* ``forward`` / ``backward``: cycles of one F / B of one micro-batch on a stage;
* ``update``: cycles a U spends *per micro-batch it applies* (a U of Bm micro-batches costs
  ``Bm * update``: the AIMC outer-product update is one pulse train per (x, d) pair);
* ``latency``: cycles a message (activation s -> s+1 after F, gradient s+1 -> s after B)
  spends in flight; it delays the consumer but does not occupy either stage.

``per`` says what F, B and U are counted for:

* ``"stage"``: each is a number (all stages alike) or one number per stage, so an unbalanced
  partition can be modelled by hand: the slowest stage then sets the steady-state rate;
* ``"layer"``: each is a number *per layer* (Linear / Conv2d, analog or digital). An analog
  layer's MVM takes about one fixed time whatever its size (its tiles work in parallel) and a
  stage runs its layers one after another, so a stage's action costs the per-layer number times
  the layers it holds. Cutting a fixed model into more stages then shortens each stage's
  actions, and an unbalanced partition shows its slowest stage as the bottleneck. A model is
  needed to count layers: :meth:`CostModel.for_layers` turns it into per-stage numbers (the
  training pipeline does this for its partition; the simulator alone knows no model).

The default AIMC model is F = B = U = 1 per micro-batch, no latency. Values may be floats: the
"fixed model" mode of arXiv 2410.15155 divides a whole model's costs by S
(:meth:`CostModel.split`).

The hardware model turns cycles into nanoseconds and counts energy in **picojoules (pJ)**:
per micro-batch for F, B and U on one stage, per message, and per idle stage-cycle (static
power burnt in bubbles). pJ suits single crossbar tiles (an MVM on a 256x256 tile is tens to
hundreds of pJ); totals are reported as ``energy_pj``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from aimcpipe.errors import ConfigError

__all__ = [
    "COST_PER",
    "CostModel",
    "HardwareModel",
    "parse_cost_spec",
    "parse_energy_spec",
]

Number = int | float
PerStage = Number | tuple[Number, ...]
COST_PER = ("layer", "stage")  # what F, B and U are counted for


def _check_number(name: str, value: object, *, positive: bool = False) -> Number:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{name}: must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def _check_per_stage(name: str, value: object) -> PerStage:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise ConfigError(f"{name}: per-stage list is empty")
        return tuple(_check_number(f"{name}[{i}]", v) for i, v in enumerate(value))
    return _check_number(name, value)


@dataclass(frozen=True)
class CostModel:
    """Cycles per action: F and B per micro-batch, U per micro-batch applied, latency per
    message. With ``per="stage"`` F, B, U are a number or a per-stage tuple; with
    ``per="layer"`` each is a number per layer, made per-stage by :meth:`for_layers`."""

    forward: PerStage = 1
    backward: PerStage = 1
    update: PerStage = 1
    latency: Number = 0
    per: str = "stage"

    def __post_init__(self) -> None:
        for name in ("forward", "backward", "update"):
            object.__setattr__(self, name, _check_per_stage(name, getattr(self, name)))
        _check_number("latency", self.latency)
        if self.per not in COST_PER:
            raise ConfigError(f"per: {self.per!r} is not allowed; use one of {', '.join(COST_PER)}")
        if self.per == "layer" and self.is_per_stage:
            raise ConfigError(
                "per: per-stage lists need per: stage (with per: layer a stage's cost is the "
                "per-layer number times the layers it holds)"
            )

    def for_layers(self, layers: Sequence[int]) -> CostModel:
        """Per-stage costs for stages holding ``layers[s]`` layers each (``per="layer"``);
        a per-stage model is returned unchanged."""
        if self.per == "stage":
            return self
        if not layers or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in layers
        ):
            raise ConfigError(f"layers: expected a count >= 0 per stage, got {list(layers)!r}")
        if not any(layers):
            raise ConfigError(
                "per: layer: the model has no Linear or Conv2d layer to count; use per: stage"
            )
        return replace(
            self,
            forward=tuple(self.forward * n for n in layers),  # type: ignore[operator]
            backward=tuple(self.backward * n for n in layers),  # type: ignore[operator]
            update=tuple(self.update * n for n in layers),  # type: ignore[operator]
            per="stage",
        )

    def per_stage(self, num_stages: int) -> tuple[tuple[Number, ...], ...]:
        """``(F, B, U)``, each a tuple of ``num_stages`` values."""
        if self.per == "layer":
            raise ConfigError(
                "per: layer: a stage's cost depends on the layers it holds; turn the model "
                "into per-stage costs with CostModel.for_layers(layers per stage)"
            )
        out = []
        for name in ("forward", "backward", "update"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                if len(value) != num_stages:
                    raise ConfigError(
                        f"{name}: {len(value)} per-stage values but the schedule has "
                        f"{num_stages} stages"
                    )
                out.append(value)
            else:
                out.append((value,) * num_stages)
        return tuple(out)

    @property
    def is_per_stage(self) -> bool:
        return any(isinstance(getattr(self, n), tuple) for n in ("forward", "backward", "update"))

    def split(self, num_stages: int) -> CostModel:
        """Fixed-model mode: these are the *whole model's* costs; each of ``num_stages``
        equal stages holds 1/S of the layers, so F, B and U per stage are divided by S.
        Latency is per message and is not divided."""
        if self.is_per_stage or self.per == "layer":
            raise ConfigError(
                "fixed-model mode needs whole-model costs, not per-stage lists or per-layer costs"
            )
        return replace(
            self,
            forward=self.forward / num_stages,
            backward=self.backward / num_stages,
            update=self.update / num_stages,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }


@dataclass(frozen=True)
class HardwareModel:
    """Cycle time (ns) and energies (pJ) to report hardware time and energy with cycles.

    Energies: ``forward_pj``/``backward_pj`` per micro-batch F/B on one stage, ``update_pj``
    per micro-batch a U applies, ``message_pj`` per activation/gradient message,
    ``idle_pj_per_cycle`` per stage per idle cycle (bubbles cost static energy).
    """

    cycle_ns: float = 1.0
    forward_pj: float = 0.0
    backward_pj: float = 0.0
    update_pj: float = 0.0
    message_pj: float = 0.0
    idle_pj_per_cycle: float = 0.0

    def __post_init__(self) -> None:
        _check_number("cycle_ns", self.cycle_ns, positive=True)
        for f in fields(self)[1:]:
            _check_number(f.name, getattr(self, f.name))

    def split(self, num_stages: int) -> HardwareModel:
        """Fixed-model mode: a stage holds 1/S of the model, so its F/B/U energy is 1/S."""
        return replace(
            self,
            forward_pj=self.forward_pj / num_stages,
            backward_pj=self.backward_pj / num_stages,
            update_pj=self.update_pj / num_stages,
        )

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_COST_KEYS = {"F": "forward", "B": "backward", "U": "update"}
_ENERGY_KEYS = {
    "F": "forward_pj",
    "B": "backward_pj",
    "U": "update_pj",
    "M": "message_pj",
    "IDLE": "idle_pj_per_cycle",
}


def _parse_value(flag: str, key: str, text: str) -> Number:
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(
                f"{flag}: {key}={text!r} is not a number (write comma-separated KEY=NUMBER)"
            ) from None
    return value


def _parse_pairs(
    flag: str, spec: str, keys: dict[str, str], example: str
) -> dict[str, tuple[str, str]]:
    """``"F=1,B=2"`` -> ``{"forward": ("F", "1"), ...}`` (field name -> (key, text))."""
    out: dict[str, tuple[str, str]] = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().upper()
        if not eq or key not in keys or not value.strip():
            raise ConfigError(
                f"{flag}: cannot read {item.strip()!r}; write comma-separated KEY=VALUE with "
                f"KEY in {', '.join(keys)} (e.g. {example})"
            )
        if keys[key] in out:
            raise ConfigError(f"{flag}: {key} given twice")
        out[keys[key]] = (key, value.strip())
    return out


def parse_cost_spec(spec: str, latency: Number = 0, flag: str = "--cost") -> CostModel:
    """``"F=1,B=2,U=0"`` -> CostModel; omitted keys keep the AIMC default 1. A value may be a
    per-stage list joined by ``:`` (``"F=1:2:1:1"``) to model an unbalanced partition."""
    pairs = _parse_pairs(flag, spec, _COST_KEYS, "F=1,B=1,U=0 or F=1:2:1")
    kwargs: dict[str, PerStage] = {}
    for name, (key, text) in pairs.items():
        parts = [_parse_value(flag, key, p.strip()) for p in text.split(":")]
        kwargs[name] = parts[0] if len(parts) == 1 else tuple(parts)
    try:
        return CostModel(**kwargs, latency=latency)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def parse_energy_spec(spec: str, cycle_ns: float = 1.0, flag: str = "--energy") -> HardwareModel:
    """``"F=50,B=100,U=20,M=5,idle=0.1"`` (pJ) -> HardwareModel with ``cycle_ns``."""
    pairs = _parse_pairs(flag, spec, _ENERGY_KEYS, "F=50,B=100,U=20,M=5,idle=0.1") if spec else {}
    kwargs = {name: float(_parse_value(flag, key, text)) for name, (key, text) in pairs.items()}
    try:
        return HardwareModel(cycle_ns=cycle_ns, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
