"""Cost and hardware models, and their command-line spec strings."""

import pytest

from aimcpipe.errors import ConfigError
from aimcpipe.scheduler import CostModel, HardwareModel, parse_cost_spec, parse_energy_spec


def test_default_is_the_aimc_model() -> None:
    assert CostModel().per_stage(3) == ((1, 1, 1), (1, 1, 1), (1, 1, 1))
    assert CostModel().latency == 0


def test_parse_cost_spec() -> None:
    c = parse_cost_spec("F=1,B=2,U=0", latency=3)
    assert (c.forward, c.backward, c.update, c.latency) == (1, 2, 0, 3)
    assert parse_cost_spec("b=0.5").backward == 0.5  # keys are case-insensitive
    assert parse_cost_spec("B=2").forward == 1  # omitted keys keep the default
    per = parse_cost_spec("F=1:2:1,B=2")
    assert per.per_stage(3) == ((1, 2, 1), (2, 2, 2), (1, 1, 1))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("F=x", "--cost: F"),
        ("G=1", "KEY in F, B, U"),
        ("F1", "KEY=VALUE"),
        ("F=-1", "forward: must be >= 0"),
        ("F=1,F=2", "F given twice"),
        ("F=", "cannot read"),
        ("F=nan", "finite"),
    ],
)
def test_bad_cost_specs_name_the_flag(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="--cost") as info:
        parse_cost_spec(spec)
    assert fragment in str(info.value)


def test_per_stage_length_must_match() -> None:
    with pytest.raises(ConfigError, match="3 per-stage values but the schedule has 2 stages"):
        CostModel(forward=(1, 2, 3)).per_stage(2)


def test_fixed_model_split_divides_compute_not_latency() -> None:
    c = CostModel(forward=2, backward=4, update=1, latency=5).split(4)
    assert (c.forward, c.backward, c.update, c.latency) == (0.5, 1.0, 0.25, 5)
    with pytest.raises(ConfigError, match="whole-model"):
        CostModel(forward=(1, 2)).split(2)


def test_per_layer_costs_scale_with_the_layers_of_each_stage() -> None:
    spec = CostModel(forward=1, backward=2, update=0.5, latency=3, per="layer")
    c = spec.for_layers([3, 1, 0])
    assert c.per == "stage"
    assert c.per_stage(3) == ((3, 1, 0), (6, 2, 0), (1.5, 0.5, 0.0))
    assert c.latency == 3  # per message, not per layer
    assert CostModel(forward=2).for_layers([5, 5]) == CostModel(forward=2)  # per stage: as is


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: CostModel(per="block"), "per: 'block' is not allowed; use one of layer, stage"),
        (lambda: CostModel(forward=(1, 2), per="layer"), "per-stage lists need per: stage"),
        (lambda: CostModel(per="layer").per_stage(2), "for_layers"),
        (lambda: CostModel(per="layer").for_layers([0, 0]), "no Linear or Conv2d layer"),
        (lambda: CostModel(per="layer").for_layers([1, -1]), "a count >= 0 per stage"),
        (lambda: CostModel(per="layer").split(2), "whole-model"),
    ],
)
def test_per_layer_misuse_is_refused(make, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert fragment in str(info.value)


def test_hardware_model() -> None:
    hw = parse_energy_spec("F=10,B=20,U=5,M=1,idle=0.5", cycle_ns=2.0)
    assert hw == HardwareModel(2.0, 10.0, 20.0, 5.0, 1.0, 0.5)
    assert hw.split(2).forward_pj == 5.0 and hw.split(2).message_pj == 1.0
    assert parse_energy_spec("", cycle_ns=3.0) == HardwareModel(cycle_ns=3.0)
    with pytest.raises(ConfigError, match="cycle_ns"):
        HardwareModel(cycle_ns=0)
    with pytest.raises(ConfigError, match="--energy"):
        parse_energy_spec("Q=1")
