"""Model zoo: the papers' models as ``nn.Sequential``\\ s of coarse pipeline blocks.

Contract: every zoo model is an ``nn.Sequential`` whose children are the *blocks* a pipeline
partitioner cuts between (a layer with its activation and pooling), with readable names and
no dots in them, so ``model(x)`` equals applying the children in order and a stage is simply
a contiguous run of children. A block of one layer is that layer; a block of several is an
``nn.Sequential`` with named parts (``fc1.linear.weight``), so parameter paths read well in
checkpoints and in the seeds of analog tiles.

- ``lsq``: the linear model of arXiv 2406.12774's least-squares problem, started at zero.
- ``fcn``: arXiv 2406.12774's MNIST fully connected network (784-256-128-10, sigmoid).
- ``digits-fcn``: a small FCN for scikit-learn's 8×8 digits.
- ``lenet``: LeNet-5-style CNN (two conv+tanh+max-pool blocks, two linear blocks).
- ``resnet10`` / ``resnet18``: CIFAR ResNets (3×3 stem, no max-pool); arXiv 2410.15155
  trains ResNet10 on CIFAR-10.

``build_model`` also accepts a user factory by import path (``"my_pkg.models:build"``).
"""

from __future__ import annotations

import importlib
import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aimcpipe.errors import AimcpipeError, ConfigError, UserCodeError, user_code_error
from aimcpipe.seeding import derive_seed

__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "BasicBlock",
    "build_model",
    "digits_fcn",
    "fcn",
    "lenet",
    "lsq",
    "resnet10",
    "resnet18",
    "resolve_factory",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


# --- argument checks (builders are called directly too, so they check their own kwargs) ------


def _pos_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.kwargs.{key}: must be an integer >= 1, got {value!r}")
    return value


def _widths(key: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"model.kwargs.{key}: must be a list of integers >= 1, got {value!r}")
    return tuple(_pos_int(f"{key}[{i}]", v) for i, v in enumerate(value))


def _activation(value: Any) -> nn.Module:
    if value not in ACTIVATIONS:
        raise ConfigError(
            f"model.kwargs.activation: {value!r} is not allowed; use one of "
            f"{', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[value]()


def _seq(**parts: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(parts))


# --- fully connected -------------------------------------------------------------------------


def lsq(in_features: int = 40, out_features: int = 1) -> nn.Sequential:
    """One block ``linear``: ``y = W x`` without bias, W = 0 at start (as in arXiv 2406.12774)."""
    linear = nn.Linear(
        _pos_int("in_features", in_features), _pos_int("out_features", out_features), bias=False
    )
    nn.init.zeros_(linear.weight)
    return _seq(linear=linear)


def fcn(
    in_features: int = 784,
    hidden: Sequence[int] = (256, 128),
    num_classes: int = 10,
    activation: str = "sigmoid",
) -> nn.Sequential:
    """Fully connected classifier, blocks ``fc1`` … ``fc{len(hidden)+1}``.

    ``fc1`` flattens the input (any N×… shape with ``in_features`` values per sample); every
    hidden block is Linear + activation; the last block is a bare Linear to the class logits.
    The default is arXiv 2406.12774's MNIST network 784-256-128-10 with sigmoid.
    """
    widths = (_pos_int("in_features", in_features), *_widths("hidden", hidden))
    classes = _pos_int("num_classes", num_classes)
    _activation(activation)  # check before building anything
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (w_in, w_out) in enumerate(pairwise(widths), start=1):
        parts = {"flatten": nn.Flatten()} if i == 1 else {}
        blocks[f"fc{i}"] = _seq(**parts, linear=nn.Linear(w_in, w_out), act=_activation(activation))
    last = nn.Linear(widths[-1], classes)
    name = f"fc{len(widths)}"
    blocks[name] = _seq(flatten=nn.Flatten(), linear=last) if len(widths) == 1 else last
    return nn.Sequential(blocks)


def digits_fcn(
    in_features: int = 64,
    hidden: Sequence[int] = (64, 48, 32),
    num_classes: int = 10,
    activation: str = "tanh",
) -> nn.Sequential:
    """A small FCN for scikit-learn's 8×8 digits: 64-64-48-32-10 with tanh (four blocks)."""
    return fcn(in_features, hidden, num_classes, activation)


# --- convolutional ---------------------------------------------------------------------------


def lenet(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """LeNet-5-style CNN with tanh: blocks ``conv1``, ``conv2``, ``fc1``, ``fc2``.

    Each 5×5 convolution (no padding) shrinks the side by 4 and each 2×2 max-pool halves it,
    so ``fc1`` takes ``32·s·s`` inputs with ``s = ((image_size − 4)//2 − 4)//2`` (512 for 28).
    """
    in_channels = _pos_int("in_channels", in_channels)
    classes = _pos_int("num_classes", num_classes)
    size = _pos_int("image_size", image_size)
    side = ((size - 4) // 2 - 4) // 2
    if size < 16 or side < 1:
        raise ConfigError(f"model.kwargs.image_size: must be >= 16 for lenet, got {size}")
    return _seq(
        conv1=_seq(conv=nn.Conv2d(in_channels, 16, 5), act=nn.Tanh(), pool=nn.MaxPool2d(2)),
        conv2=_seq(
            conv=nn.Conv2d(16, 32, 5), act=nn.Tanh(), pool=nn.MaxPool2d(2), flatten=nn.Flatten()
        ),
        fc1=_seq(linear=nn.Linear(32 * side * side, 128), act=nn.Tanh()),
        fc2=nn.Linear(128, classes),
    )


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): ``relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x))``.

    Both convolutions are 3×3 without bias; the first carries the stride. The shortcut ``s``
    is the identity, or a 1×1 convolution + BatchNorm where the stride or the channel count
    changes (so the two branches have the same shape).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _seq(
                conv=nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                bn=nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _resnet(depth: Sequence[int], num_classes: int, in_channels: int, width: int) -> nn.Sequential:
    classes = _pos_int("num_classes", num_classes)
    channels = _pos_int("in_channels", in_channels)
    w = _pos_int("width", width)
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    blocks["stem"] = _seq(
        conv=nn.Conv2d(channels, w, 3, 1, padding=1, bias=False),
        bn=nn.BatchNorm2d(w),
        act=nn.ReLU(),
    )
    c_in = w
    for layer, count in enumerate(depth, start=1):
        c_out = w * 2 ** (layer - 1)
        for j in range(count):
            stride = 2 if layer > 1 and j == 0 else 1
            blocks[f"layer{layer}_{j}"] = BasicBlock(c_in, c_out, stride)
            c_in = c_out
    blocks["head"] = _seq(
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), linear=nn.Linear(c_in, classes)
    )
    model = nn.Sequential(blocks)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


def resnet10(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Sequential:
    """CIFAR ResNet-10: stem, one BasicBlock per stage (widths w, 2w, 4w, 8w), head."""
    return _resnet((1, 1, 1, 1), num_classes, in_channels, width)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Sequential:
    """CIFAR ResNet-18: stem, two BasicBlocks per stage (widths w, 2w, 4w, 8w), head."""
    return _resnet((2, 2, 2, 2), num_classes, in_channels, width)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lsq": lsq,
    "fcn": fcn,
    "digits-fcn": digits_fcn,
    "lenet": lenet,
    "resnet10": resnet10,
    "resnet18": resnet18,
}


# --- building --------------------------------------------------------------------------------


def resolve_factory(path: str) -> Callable[..., nn.Module]:
    """The callable named by ``"pkg.module:function"`` (the attribute may be dotted)."""
    module_name, sep, attr = path.partition(":") if isinstance(path, str) else ("", "", "")
    if not sep or not module_name or not attr or ":" in attr:
        raise ConfigError(f"model.factory: {path!r} is not of the form 'pkg.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or ""
        if missing != module_name and not module_name.startswith(missing + "."):
            # the module exists but an import inside it failed: that is the user's code
            raise user_code_error("model.factory", f"importing {module_name}", exc) from exc
        raise ConfigError(f"model.factory: cannot import module {module_name!r} ({exc})") from None
    except SyntaxError as exc:
        where = f" ({exc.filename}, line {exc.lineno})" if exc.filename else ""
        raise UserCodeError(
            f"model.factory: module {module_name!r} has a syntax error{where}: {exc.msg}"
        ) from exc
    except Exception as exc:  # the module raised while it was imported
        raise user_code_error("model.factory", f"importing {module_name}", exc) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.factory: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model.factory: {path!r} is not callable")
    return obj


def _check_kwargs(builder: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Match ``kwargs`` against the builder's signature before calling it, so a typo is
    reported as the key it is (and a TypeError inside the builder is not mistaken for one)."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # some builtins have no signature: let the call decide
        return
    params = signature.parameters
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p.name for p in params.values() if p.kind in keyword]
    allowed = ", ".join(named) if named else "none"
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if not takes_any and key not in named:
            raise ConfigError(f"model.kwargs.{key}: not a parameter of {what}; allowed: {allowed}")
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        missing = [
            p.name
            for p in params.values()
            if p.kind in keyword and p.default is p.empty and p.name not in kwargs
        ]
        if missing:
            raise ConfigError(
                f"model.kwargs.{missing[0]}: required by {what}; allowed: {allowed}"
            ) from None
        raise ConfigError(f"model.kwargs: cannot call {what} with keywords only ({exc})") from None


def build_model(
    name_or_factory: str, kwargs: Mapping[str, Any] | None = None, *, seed: int = 0
) -> nn.Module:
    """Build a zoo model (``"resnet10"``) or a user factory's (``"my_pkg.models:build"``).

    The builder runs inside ``torch.random.fork_rng()`` after
    ``torch.manual_seed(derive_seed(seed, "model"))``: initialisation depends only on the seed
    and the caller's global RNG state is left as it was.
    """
    if not isinstance(name_or_factory, str):
        raise ConfigError(f"model.name: expected a string, got {name_or_factory!r}")
    if ":" in name_or_factory:
        builder = resolve_factory(name_or_factory)
        key, what = "model.factory", repr(name_or_factory)
    elif name_or_factory in MODELS:
        builder = MODELS[name_or_factory]
        key, what = "model.name", repr(name_or_factory)
    else:
        raise ConfigError(
            f"model.name: {name_or_factory!r} is not a zoo model; allowed: "
            f"{', '.join(MODELS)} (or a factory 'pkg.module:function')"
        )
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"model.kwargs: expected a mapping, got {kwargs!r}")
    for k in kwargs:
        if not isinstance(k, str):
            raise ConfigError(f"model.kwargs: keys must be strings, got {k!r}")
    kwargs = dict(kwargs)
    _check_kwargs(builder, kwargs, what)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model"))
        try:
            model = builder(**kwargs)
        except TypeError as exc:  # a value of the wrong type reached the builder
            args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            message = f"model.kwargs: {what} failed with {args or 'no kwargs'}: {exc}"
            raise UserCodeError(" ".join(message.split())) from exc
        except AimcpipeError:
            raise
        except Exception as exc:
            raise user_code_error(key, what.strip("'"), exc) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key}: {what} returned {type(model).__name__}, not a torch.nn.Module")
    return model
