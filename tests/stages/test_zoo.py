"""Model zoo: block structure, shapes, seeded initialisation, user factories, errors."""

import pytest
import torch
from torch import nn

from aimcpipe.errors import ConfigError
from aimcpipe.stages import MODELS, build_model, resolve_factory
from aimcpipe.stages.zoo import BasicBlock

# (name, kwargs, input shape, output shape)
CASES = [
    ("lsq", {}, (3, 40), (3, 1)),
    ("fcn", {}, (3, 1, 28, 28), (3, 10)),
    ("digits-fcn", {}, (3, 1, 8, 8), (3, 10)),
    ("lenet", {}, (3, 1, 28, 28), (3, 10)),
    ("lenet", {"in_channels": 3, "image_size": 32, "num_classes": 4}, (2, 3, 32, 32), (2, 4)),
    ("resnet10", {"width": 8}, (2, 3, 32, 32), (2, 10)),
    ("resnet18", {"width": 8, "num_classes": 5}, (2, 3, 32, 32), (2, 5)),
]
BLOCKS = {
    "lsq": ["linear"],
    "fcn": ["fc1", "fc2", "fc3"],
    "digits-fcn": ["fc1", "fc2", "fc3", "fc4"],
    "lenet": ["conv1", "conv2", "fc1", "fc2"],
    "resnet10": ["stem", "layer1_0", "layer2_0", "layer3_0", "layer4_0", "head"],
    "resnet18": ["stem"] + [f"layer{i}_{j}" for i in range(1, 5) for j in range(2)] + ["head"],
}


def test_registry_names():
    assert list(MODELS) == ["lsq", "fcn", "digits-fcn", "lenet", "resnet10", "resnet18"]


@pytest.mark.parametrize(("name", "kwargs", "in_shape", "out_shape"), CASES)
def test_output_shape_and_blocks_in_order(name, kwargs, in_shape, out_shape):
    model = build_model(name, kwargs, seed=1)
    assert isinstance(model, nn.Sequential)
    assert [n for n, _ in model.named_children()] == BLOCKS[name]
    x = torch.randn(in_shape, generator=torch.Generator().manual_seed(0))
    model.eval()  # BatchNorm: use running statistics so the two passes are comparable
    with torch.no_grad():
        y = model(x)
        z = x
        for block in model.children():
            z = block(z)
    assert y.shape == out_shape
    assert torch.equal(y, z)
    assert all("." not in n for n, _ in model.named_children())


def test_seeded_initialisation_leaves_global_rng_alone():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a = build_model("lenet", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model("lenet", seed=3)
    c = build_model("lenet", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["fc1.linear.weight"], sc["fc1.linear.weight"])
    # a user factory that draws from the global RNG is seeded too, and leaves it alone
    u1 = build_model("tests.stages.user_models:draws_from_global_rng", seed=2)
    u2 = build_model("tests.stages.user_models:draws_from_global_rng", seed=2)
    assert torch.equal(u1.weight, u2.weight)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_fcn_parameter_count_and_activation():
    model = build_model("fcn")
    expected = 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected
    assert isinstance(model.fc1.act, nn.Sigmoid) and isinstance(model.fc3, nn.Linear)
    relu = build_model("fcn", {"activation": "relu", "hidden": [32]})
    assert [n for n, _ in relu.named_children()] == ["fc1", "fc2"]
    assert isinstance(relu.fc1.act, nn.ReLU) and relu.fc1.linear.out_features == 32
    single = build_model("fcn", {"hidden": [], "in_features": 6, "num_classes": 2})
    assert single(torch.zeros(4, 2, 3)).shape == (4, 2)
    assert isinstance(build_model("digits-fcn").fc1.act, nn.Tanh)


def test_lenet_fc1_input_follows_image_size():
    assert build_model("lenet").fc1.linear.in_features == 512
    assert build_model("lenet", {"image_size": 32}).fc1.linear.in_features == 32 * 5 * 5
    with pytest.raises(ConfigError, match=r"^model\.kwargs\.image_size: must be >= 16"):
        build_model("lenet", {"image_size": 12})


def test_lsq_starts_at_zero():
    model = build_model("lsq", {"in_features": 5}, seed=9)
    assert isinstance(model.linear, nn.Linear) and model.linear.bias is None
    assert torch.count_nonzero(model.linear.weight) == 0 and model.linear.weight.shape == (1, 5)


def test_resnet_blocks_and_shortcuts():
    model = build_model("resnet10", {"width": 4})
    assert isinstance(model.layer1_0, BasicBlock) and isinstance(
        model.layer1_0.shortcut, nn.Identity
    )
    assert model.layer2_0.conv1.stride == (2, 2) and model.layer2_0.conv1.out_channels == 8
    assert isinstance(model.layer2_0.shortcut.conv, nn.Conv2d)
    assert model.head.linear.in_features == 32
    deep = build_model("resnet18", {"width": 4})
    assert isinstance(deep.layer3_1.shortcut, nn.Identity) and deep.layer3_1.conv1.stride == (1, 1)
    grey = build_model("resnet10", {"width": 4, "in_channels": 1})
    assert grey(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_name_must_be_a_string():
    with pytest.raises(ConfigError, match=r"^model\.name: expected a string, got 3$"):
        build_model(3)  # type: ignore[arg-type]


def test_user_factory_by_import_path():
    model = build_model("tests.stages.user_models:build", {"hidden": 5}, seed=0)
    assert model(torch.zeros(3, 8)).shape == (3, 2) and model.hidden[0].out_features == 5
    assert resolve_factory("tests.stages.user_models:build").__name__ == "build"


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        (
            "vgg",
            None,
            r"^model\.name: 'vgg' is not a zoo model; allowed: lsq, fcn, digits-fcn, lenet, "
            r"resnet10, resnet18 \(or a factory 'pkg\.module:function'\)$",
        ),
        ("no_such_pkg.models:build", None, r"^model\.factory: cannot import module 'no_such_pkg"),
        ("tests.stages.user_models:nothing", None, r"^model\.factory: module .* no attribute"),
        ("tests.stages.user_models:NOT_CALLABLE", None, r"^model\.factory: .* is not callable$"),
        ("tests.stages.user_models:", None, r"^model\.factory: .* not of the form"),
        (
            "tests.stages.user_models:not_a_module",
            None,
            r"^model\.factory: .* returned dict, not a torch\.nn\.Module$",
        ),
        (
            "tests.stages.user_models:build",
            {"width": 3},
            r"^model\.kwargs\.width: not a parameter of .*; allowed: hidden$",
        ),
        (
            "tests.stages.user_models:needs_width",
            {},
            r"^model\.kwargs\.width: required by .*; allowed: width$",
        ),
        (
            "fcn",
            {"hiden": [3]},
            r"^model\.kwargs\.hiden: not a parameter of 'fcn'; "
            r"allowed: in_features, hidden, num_classes, activation$",
        ),
        ("fcn", {"activation": "gelu"}, r"^model\.kwargs\.activation: 'gelu' is not allowed"),
        ("fcn", {"hidden": [8, 0]}, r"^model\.kwargs\.hidden\[1\]: must be an integer >= 1"),
        ("fcn", {"hidden": "64"}, r"^model\.kwargs\.hidden: must be a list of integers"),
        ("resnet10", {"width": 0}, r"^model\.kwargs\.width: must be an integer >= 1, got 0$"),
        ("lsq", ["in_features"], r"^model\.kwargs: expected a mapping"),
        ("lsq", {1: 2}, r"^model\.kwargs: keys must be strings, got 1$"),
        (
            "tests.stages.user_models:build",
            {"hidden": "x"},
            r"^model\.kwargs: 'tests\.stages\.user_models:build' failed with hidden='x': ",
        ),
    ],
)
def test_errors_are_one_line_and_name_the_key(name, kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_model(name, kwargs)
    assert "\n" not in str(info.value)
