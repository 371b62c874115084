"""partition: built-in methods against known optimal splits, explicit splits, counting of
parameters and crossbar tiles (digital and analog layers), errors, and the Partition value."""

import copy
import importlib
import itertools
import json
import random

import pytest
import torch
from torch import nn

from aimcpipe.analog import AnalogConfig, analog_layers, convert
from aimcpipe.errors import ConfigError
from aimcpipe.stages import PARTITIONERS, Partition, partition, register_partitioner
from aimcpipe.stages.partition import balance, block_layers, block_params, block_tiles

# the package exports the function `partition`, which hides the module of the same name
partition_module = importlib.import_module("aimcpipe.stages.partition")


def weighted(*params: int) -> list[tuple[str, nn.Module]]:
    """Blocks named b0, b1, ... holding exactly the given numbers of parameters."""
    return [(f"b{i}", nn.Linear(1, p, bias=False)) for i, p in enumerate(params)]


def named_model(*names: str) -> nn.Sequential:
    model = nn.Sequential()
    for name in names:
        model.add_module(name, nn.Linear(2, 2))
    return model


def brute_force(costs: list[int], stages: int) -> list[int]:
    """The documented choice by exhaustive search: least bottleneck, then least Σ load², then
    least Σ count², then earlier stages larger."""
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *cuts, n]
        counts = [b - a for a, b in itertools.pairwise(bounds)]
        loads = [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]
        key = (max(loads), sum(x * x for x in loads), sum(c * c for c in counts))
        key = (*key, [-c for c in counts])
        if best is None or key < best[0]:
            best = (key, counts)
    return best[1]


# --- deciding -----------------------------------------------------------------------------------


def test_balance_matches_exhaustive_search_including_its_tie_breaks():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 7)
        costs = [rng.randint(0, 5) for _ in range(n)]
        stages = rng.randint(1, n)
        assert balance(costs, stages) == brute_force(costs, stages), (costs, stages)


def test_params_finds_the_optimum_where_greedy_filling_does_not():
    # Filling stage 0 up to the mean (50) stops after 30: [30 | 30, 40] has bottleneck 70.
    # The optimum [30, 30 | 40] has bottleneck 60.
    result = partition(weighted(30, 30, 40), 2, "params")
    assert result.counts() == (2, 1)
    assert result.params == (60, 40)
    assert result.method == "params"


def test_params_known_optimum_with_three_stages():
    # total 45; the best bottleneck is 17: [1..5]=15 | [6,7]=13 | [8,9]=17
    result = partition(weighted(1, 2, 3, 4, 5, 6, 7, 8, 9), 3, "params")
    assert max(result.params) == 17
    assert result.counts() == (5, 2, 2)


def test_one_heavy_block_gets_a_stage_of_its_own_and_the_rest_is_balanced():
    result = partition(weighted(1, 1, 1, 100, 1, 1, 1, 1), 3, "params")
    assert result.params[1] == 100
    assert result.counts() == (3, 1, 4)


@pytest.mark.parametrize(
    ("blocks", "stages", "counts"),
    [(8, 3, (3, 3, 2)), (10, 4, (3, 3, 2, 2)), (7, 7, (1,) * 7), (5, 1, (5,)), (6, 2, (3, 3))],
)
def test_uniform_gives_first_stages_the_extra_blocks(blocks, stages, counts):
    result = partition(weighted(*[7] * blocks), stages)
    assert result.method == "uniform"
    assert result.counts() == counts
    assert result.bounds[0] == 0 and result.bounds[-1] == blocks


@pytest.mark.parametrize("method", ["params", "tiles"])
def test_balanced_methods_with_equal_costs_agree_with_uniform(method):
    for blocks, stages in [(8, 3), (10, 4), (5, 2)]:
        equal = weighted(*[9] * blocks)
        assert partition(equal, stages, method).counts() == partition(equal, stages).counts()


@pytest.mark.parametrize("method", ["uniform", "params", "tiles"])
def test_one_stage_and_one_stage_per_block(method):
    blocks = weighted(5, 1, 8, 2)
    assert partition(blocks, 1, method).counts() == (4,)
    assert partition(blocks, 1, method).params == (16,)
    assert partition(blocks, 4, method).counts() == (1, 1, 1, 1)
    assert partition(blocks, 4, method).params == (5, 1, 8, 2)


def test_tiles_balances_tile_counts_not_parameters():
    # tile 4: Linear(4, 4) is 16 parameters on 1 tile; Linear(5, 1) is 5 parameters on 2
    # tiles (a 1x5 matrix spans two tile columns)
    blocks = [
        ("a", nn.Linear(4, 4, bias=False)),
        ("b", nn.Linear(4, 4, bias=False)),
        ("c", nn.Linear(5, 1, bias=False)),
        ("d", nn.Linear(5, 1, bias=False)),
    ]
    by_tiles = partition(blocks, 2, "tiles", tile_size=4)
    # tile costs 1, 1, 2, 2: [1, 1 | 2, 2] and [1, 1, 2 | 2] both have bottleneck 4 and equal
    # Σ load²; the more even block counts win
    assert by_tiles.counts() == (2, 2)
    assert by_tiles.tiles == (2, 4)
    by_params = partition(blocks, 2, "params", tile_size=4)
    assert by_params.counts() == (1, 3)
    assert by_params.params == (16, 26)


def test_time_balances_measured_costs(monkeypatch):
    seen = {}

    def fake(blocks, example_input, repeats):
        seen.update(n=len(blocks), x=example_input, repeats=repeats)
        return [0.25, 0.5, 0.5, 1.0]  # exact in binary: no float ties

    monkeypatch.setattr(partition_module, "measure_block_times", fake)
    # splits: [.25 | 2.0], [.75 | 1.5], [1.25 | 1.0]: the last has the least bottleneck
    result = partition(weighted(1, 1, 1, 1), 2, "time", example_input="batch", repeats=5)
    assert seen == {"n": 4, "x": "batch", "repeats": 5}
    assert result.method == "time"
    assert result.counts() == (3, 1)
    assert result.times == (1.25, 1.0)
    assert "time ms" in result.describe()
    assert json.loads(json.dumps(result.to_dict()))["times"] == [1.25, 1.0]


def test_time_smoke_run_measures_without_touching_the_model():
    torch.manual_seed(0)
    model = convert(
        nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2)
        ),
        AnalogConfig(),
    )
    before = copy.deepcopy(model.state_dict())
    example = torch.randn(3, 4)
    rng_before = torch.random.get_rng_state()
    result = partition(model, 3, "time", example_input=example, repeats=2)
    assert result.num_stages == 3 and sum(result.counts()) == 5
    assert all(c >= 1 for c in result.counts())
    assert result.times is not None and all(t > 0 for t in result.times)
    # measured on a copy: no gradients, pending analog updates, changed state or random stream
    assert all(p.grad is None for p in model.parameters())
    assert all(not layer.pending for layer in analog_layers(model))
    after = model.state_dict()
    for key, value in before.items():
        if isinstance(value, dict):  # a tile's extra state: its random generator
            assert torch.equal(after[key]["rng_state"], value["rng_state"]), key
        else:
            assert torch.equal(after[key], value), key
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_time_without_example_input_is_a_config_error():
    with pytest.raises(ConfigError, match="'time' needs example_input"):
        partition(weighted(1, 2), 2, "time")


# --- explicit splits ----------------------------------------------------------------------------


def test_explicit_counts_with_and_without_num_stages():
    blocks = weighted(*range(1, 9))
    result = partition(blocks, None, [3, 2, 2, 1])
    assert result.method == "explicit"
    assert result.counts() == (3, 2, 2, 1)
    assert result.stage_blocks(1) == ("b3", "b4")
    assert partition(blocks, 4, (3, 2, 2, 1)).bounds == (0, 3, 5, 7, 8)


def test_split_names_mark_the_first_block_of_each_later_stage():
    model = named_model("stem", "layer1_0", "layer1_1", "layer2_0", "layer2_1", "head")
    result = partition(model, None, ["layer2_0", "head"])
    assert result.method == "names"
    assert result.counts() == (3, 2, 1)
    assert result.stage_blocks(0) == ("stem", "layer1_0", "layer1_1")
    assert partition(model, 3, ["layer2_0", "head"]).counts() == (3, 2, 1)
    assert partition(model, None, []).counts() == (6,)


def test_callable_gets_the_blocks_and_the_stage_count():
    calls = []

    def last_alone(blocks, num_stages):
        calls.append(([name for name, _ in blocks], num_stages))
        return [len(blocks) - 1, 1]

    result = partition(named_model("a", "b", "c"), 2, last_alone)
    assert calls == [(["a", "b", "c"], 2)]
    assert result.method == "callable"
    assert result.counts() == (2, 1)


def test_registered_partitioner_receives_the_context_and_its_options():
    def every_other(blocks, num_stages, *, tile_size, first=1):
        assert tile_size == 64
        return [first, len(blocks) - first]

    register_partitioner("test-first", every_other)
    try:
        assert "test-first" in PARTITIONERS
        result = partition(weighted(1, 1, 1, 1), 2, "test-first", tile_size=64, first=3)
        assert result.method == "test-first"
        assert result.counts() == (3, 1)
        with pytest.raises(ConfigError, match="already registered"):
            register_partitioner("test-first", every_other)
        register_partitioner("test-first", lambda blocks, s: [1] * s, replace=True)
        assert partition(weighted(1, 1), 2, "test-first").counts() == (1, 1)
        with pytest.raises(ConfigError, match="takes no option 'nope'; its options: none"):
            partition(weighted(1, 1), 2, "test-first", nope=1)
    finally:
        PARTITIONERS.pop("test-first", None)


# --- counting -----------------------------------------------------------------------------------


def small_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))


def test_analog_layers_count_their_tile_weights_as_parameters_and_tiles():
    plain = small_net()
    analog = convert(plain, AnalogConfig())
    assert not any(isinstance(p, nn.Parameter) and p.numel() == 54 for p in analog.parameters())
    # conv: 3x(2*3*3) weights + 3 bias; linear: 4x12 + 4; the analog anchors add nothing
    assert [block_params(m) for m in analog] == [57, 0, 0, 52]
    # tile 4: conv is 3 x 18 -> 1 * 5 tiles; linear is 4 x 12 -> 1 * 3 tiles
    assert [block_tiles(m, 4) for m in analog] == [5, 0, 0, 3]
    # planning before conversion counts the same
    assert [block_params(m) for m in plain] == [57, 0, 0, 52]
    assert [block_tiles(m, 4) for m in plain] == [5, 0, 0, 3]
    result = partition(analog, 2, "params", tile_size=4)
    assert result.params == (57, 52) and result.tiles == (5, 3)
    assert partition(analog, 1, tile_size=512).tiles == (2,)


def test_tiki_taka_weights_take_two_arrays_per_tile():
    analog = convert(small_net(), AnalogConfig(rule="tiki-taka"))
    assert [block_tiles(m, 4) for m in analog] == [10, 0, 0, 6]
    assert [block_params(m) for m in analog] == [57, 0, 0, 52]  # logical weights, once


def test_frozen_parameters_do_not_count_and_grouped_convolutions_count_per_group():
    frozen = nn.Linear(3, 3)
    frozen.requires_grad_(False)
    assert block_params(nn.Sequential(frozen, nn.Linear(3, 1))) == 4
    # 2 groups of (2 out x 2*3*3 in): 2 * ceil(2/4) * ceil(18/4) = 10
    assert block_tiles(nn.Conv2d(4, 4, 3, groups=2, bias=False), 4) == 10


# --- errors -------------------------------------------------------------------------------------


def raises(match: str, *args, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        partition(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("partition: ") and "\n" not in message
    return message


FOUR = ("fc1", "fc2", "fc3", "fc4")


def test_stage_count_errors():
    model = named_model(*FOUR)
    raises(">= 1, got 0", model, 0)
    raises(">= 1, got None", model, None)
    message = raises("5 stages", model, 5)
    assert message == "partition: 5 stages but the model has only 4 blocks (fc1, fc2, fc3, fc4)"
    raises("5 stages but the model has only 4 blocks", model, None, [1, 1, 1, 1, 0])


def test_explicit_count_errors():
    model = named_model(*[f"b{i}" for i in range(8)])
    raises(r"stage 1 would be empty \(count 0\)", model, None, [4, 0, 4])
    raises(r"stage 2 would be empty \(count -1\)", model, None, [5, 4, -1])
    raises("3 block counts for 4 stages", model, 4, [3, 3, 2])
    message = raises("blocks not covered", model, None, [3, 2, 2])
    assert "counts sum to 7, the model has 8 blocks" in message
    raises("only integers .* or only block names", model, None, [3, "b5"])


def test_split_name_errors():
    model = named_model(*FOUR)
    message = raises("'fc9' is not a block", model, None, ["fc9"])
    assert "fc1, fc2, fc3, fc4" in message
    raises("'fc3' comes before 'fc4'", model, None, ["fc4", "fc3"])
    raises("'fc2' is given more than once", model, None, ["fc2", "fc2"])
    raises("'fc1' is the first block", model, None, ["fc1", "fc3"])
    raises("3 stages need 2 split names", model, 3, ["fc3"])


def test_method_errors_list_what_is_allowed():
    model = named_model(*FOUR)
    message = raises("unknown method 'greedy'", model, 2, "greedy")
    for allowed in ("uniform", "params", "tiles", "time", "list of blocks per stage", "callable"):
        assert allowed in message
    raises("method 3 is not understood", model, 2, 3)
    raises("tile_size must be an integer >= 1, got 0", model, 2, tile_size=0)
    raises("repeats must be an integer >= 1", model, 2, "time", repeats=0)
    raises("takes no option 'depth'", model, 2, "uniform", depth=2)
    raises("apply only to named methods", model, None, [2, 2], depth=2)


def test_blocks_must_be_a_model_or_named_pairs():
    raises(r"list of \(name, module\) pairs, got an entry Linear", [nn.Linear(2, 2)], 1)
    raises("no blocks to split", [], 1)


def test_callable_failures_are_wrapped_and_named():
    def broken(blocks, num_stages):
        raise RuntimeError("boom\nsecond line")

    def too_few(blocks, num_stages):
        return [1, 1]

    model = named_model(*FOUR)
    raises(r"callable .*broken raised RuntimeError: boom second line", model, 2, broken)
    message = raises(r"callable .*too_few returned \[1, 1\], which is invalid", model, 2, too_few)
    assert "counts sum to 2, the model has 4 blocks" in message
    raises("expected a list of blocks per stage, got NoneType", model, 2, lambda b, s: None)


def test_registration_errors():
    with pytest.raises(ConfigError, match="cannot register a partitioner named 'explicit'"):
        register_partitioner("explicit", lambda b, s: [len(b)])
    with pytest.raises(ConfigError, match="must be callable"):
        register_partitioner("test-x", 3)
    with pytest.raises(ConfigError, match="already registered"):
        register_partitioner("uniform", lambda b, s: [len(b)])


# --- the Partition value ------------------------------------------------------------------------


def test_describe_has_a_row_per_stage_with_its_block_range():
    result = partition(named_model("stem", "l1", "l2", "l3", "head"), 3)
    lines = result.describe().splitlines()
    assert "3 stages" in lines[0]
    assert lines[1].split() == ["stage", "blocks", "#blocks", "params", "tiles", "layers"]
    rows = [line.split() for line in lines[2:]]
    assert [row[:3] for row in rows] == [
        ["0", "stem..l1", "2"],
        ["1", "l2..l3", "2"],
        ["2", "head", "1"],
    ]
    assert len({len(line) for line in lines[1:]}) == 1  # right-aligned last column
    assert [row[-1] for row in rows] == [str(n) for n in result.layers]


def test_layers_count_linear_and_conv_layers_analog_or_not():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)),
        nn.Flatten(),
        nn.Linear(8, 4),
        nn.Linear(4, 2),
    )
    assert [block_layers(m) for m in model] == [2, 0, 1, 1]
    assert partition(model, 2).layers == (2, 2)
    analog = convert(copy.deepcopy(model), AnalogConfig())
    assert [block_layers(m) for m in analog] == [2, 0, 1, 1]


def test_to_dict_round_trips_through_json():
    result = partition(weighted(4, 1, 1, 3, 2), 3, "params", tile_size=8)
    data = json.loads(json.dumps(result.to_dict()))
    assert data == result.to_dict()
    assert data["stages"] == [list(result.stage_blocks(s)) for s in range(3)]
    assert data["counts"] == list(result.counts())
    assert Partition.from_dict(data) == result


def test_partition_checks_its_own_consistency():
    with pytest.raises(ConfigError, match="rise strictly"):
        Partition("explicit", (0, 2, 2, 3), ("a", "b", "c"), (1, 0, 1), (0, 0, 0), 512)
    with pytest.raises(ConfigError, match="params has 2 entries for 3 stages"):
        Partition("explicit", (0, 1, 2, 3), ("a", "b", "c"), (1, 1), (0, 0, 0), 512)
    with pytest.raises(IndexError):
        partition(weighted(1, 1), 2).stage_blocks(2)
