"""Split a model's blocks into contiguous pipeline stages.

Measuring and deciding are kept apart (as in torchgpipe's ``balance_by_time`` / ``balance``):
``block_params``, ``block_tiles`` and ``measure_block_times`` give one cost per block, and
``balance`` turns any list of costs into blocks per stage. A *partitioner* is a named function
``fn(blocks, num_stages, **context) -> blocks per stage`` in ``PARTITIONERS``; users add their
own with ``register_partitioner``. ``partition`` runs one (or takes an explicit split) and
returns a ``Partition``, a plain value that prints as a table and saves as JSON.

The pipeline runs at the pace of its slowest stage, so the balanced methods minimise the
*maximum* per-stage cost (the bottleneck), exactly, by dynamic programming over contiguous
splits (O(S·N²) for N blocks and S stages).
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from aimcpipe.analog.layers import AnalogLayer
from aimcpipe.analog.rules import TikiTakaWeight
from aimcpipe.errors import ConfigError, user_code_error
from aimcpipe.stages.blocks import pipeline_blocks

__all__ = [
    "PARTITIONERS",
    "Partition",
    "Split",
    "balance",
    "block_layers",
    "block_params",
    "block_tiles",
    "measure_block_times",
    "partition",
    "register_partitioner",
]

Blocks = Sequence[tuple[str, nn.Module]]
Partitioner = Callable[..., Any]

# Partition.method labels of splits that do not come from a named partitioner.
_LIST_METHODS = ("explicit", "names", "callable")


@dataclass(frozen=True)
class Partition:
    """Which blocks each pipeline stage holds: stage ``s`` is
    ``block_names[bounds[s]:bounds[s + 1]]``. ``params`` and ``tiles`` are per stage (see
    ``block_params`` / ``block_tiles``); ``times`` is the measured forward+backward seconds per
    stage when the split was made from timings, else ``None``; ``layers`` counts each stage's
    Linear/Conv2d layers (``block_layers``; what ``cost.per: layer`` charges for)."""

    method: str
    bounds: tuple[int, ...]
    block_names: tuple[str, ...]
    params: tuple[int, ...]
    tiles: tuple[int, ...]
    tile_size: int
    times: tuple[float, ...] | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        b, n = self.bounds, len(self.block_names)
        if len(b) < 2 or b[0] != 0 or b[-1] != n or any(x >= y for x, y in pairwise(b)):
            raise ConfigError(
                f"partition: bounds {list(b)} must rise strictly from 0 to {n} (the number of "
                "blocks) so every stage is a non-empty run of blocks"
            )
        stages = len(b) - 1
        for key in ("params", "tiles", "times", "layers"):
            value = getattr(self, key)
            if value is not None and len(value) != stages:
                raise ConfigError(
                    f"partition: {key} has {len(value)} entries for {stages} stages; "
                    "give one per stage"
                )

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    def stage_blocks(self, s: int) -> tuple[str, ...]:
        """Names of the blocks of stage ``s`` (0-indexed)."""
        if not 0 <= s < self.num_stages:
            raise IndexError(f"stage {s} out of range 0..{self.num_stages - 1}")
        return self.block_names[self.bounds[s] : self.bounds[s + 1]]

    def counts(self) -> tuple[int, ...]:
        """Blocks per stage."""
        return tuple(y - x for x, y in pairwise(self.bounds))

    def describe(self) -> str:
        """An aligned table, one row per stage."""
        header = ["stage", "blocks", "#blocks", "params", "tiles"]
        if self.layers is not None:
            header.append("layers")
        if self.times is not None:
            header.append("time ms")
        rows = []
        for s in range(self.num_stages):
            names = self.stage_blocks(s)
            span = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
            row = [str(s), span, str(len(names)), f"{self.params[s]:,}", str(self.tiles[s])]
            if self.layers is not None:
                row.append(str(self.layers[s]))
            if self.times is not None:
                row.append(f"{self.times[s] * 1e3:.3f}")
            rows.append(row)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            # the block span is text (left-aligned); everything else is a number
            out = [
                c.ljust(w) if i == 1 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return "  ".join(out).rstrip()

        stages = f"{self.num_stages} stage" + ("s" if self.num_stages != 1 else "")
        title = f"partition: {stages}, method {self.method}, tile {self.tile_size}"
        return "\n".join([title, line(header), *(line(r) for r in rows)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists instead of tuples, plus the derived ``num_stages``, ``counts`` and
        ``stages`` (block names per stage) for readers of the run directory."""
        data: dict[str, Any] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
        }
        data["num_stages"] = self.num_stages
        data["counts"] = list(self.counts())
        data["stages"] = [list(self.stage_blocks(s)) for s in range(self.num_stages)]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        """Inverse of ``to_dict`` (derived keys are ignored)."""
        times = data.get("times")
        layers = data.get("layers")
        return cls(
            method=str(data["method"]),
            bounds=tuple(int(x) for x in data["bounds"]),
            block_names=tuple(str(x) for x in data["block_names"]),
            params=tuple(int(x) for x in data["params"]),
            tiles=tuple(int(x) for x in data["tiles"]),
            tile_size=int(data["tile_size"]),
            times=None if times is None else tuple(float(x) for x in times),
            layers=None if layers is None else tuple(int(x) for x in layers),
        )


@dataclass(frozen=True)
class Split:
    """What a partitioner may return instead of a bare list of blocks per stage, to pass on
    the per-block seconds it measured (shown by ``Partition.describe``)."""

    counts: tuple[int, ...]
    block_times: tuple[float, ...] | None = None


# ---------------------------------------------------------------------------------------------
# costs per block


def block_params(module: nn.Module) -> int:
    """Trainable parameters of ``module``, counting each analog layer's weight matrix
    (``out × in``, held as tile buffers rather than parameters) once. The analog layers'
    zero-size ``anchor`` parameters add nothing."""
    total = sum(p.numel() for p in module.parameters() if p.requires_grad)
    for layer in module.modules():
        if isinstance(layer, AnalogLayer):
            total += layer.analog.out_features * layer.analog.in_features
    return total


def block_layers(module: nn.Module) -> int:
    """Matrix layers of ``module``: its analog layers and plain ``nn.Linear``/``nn.Conv2d``
    (counted alike, so stages can be planned before conversion). Each takes one MVM per
    micro-batch in F and B and one outer-product update per micro-batch in U."""
    return sum(isinstance(m, AnalogLayer | nn.Linear | nn.Conv2d) for m in module.modules())


def _grid(rows: int, cols: int, tile_size: int) -> int:
    return math.ceil(rows / tile_size) * math.ceil(cols / tile_size)


def block_tiles(module: nn.Module, tile_size: int = 512) -> int:
    """Crossbar tiles of ``tile_size × tile_size`` that ``module`` occupies: each weight matrix
    (``out × in``; for a convolution ``in = in_channels·kh·kw``) takes
    ``ceil(out/tile) · ceil(in/tile)`` tiles. A Tiki-Taka weight holds two arrays (fast A and
    slow C), so it takes twice that. Plain ``nn.Linear``/``nn.Conv2d`` layers are counted as
    they would be after ``aimcpipe.analog.convert``, so stages can be planned before
    conversion; a grouped convolution counts one matrix per group."""
    total = 0
    for layer in module.modules():
        if isinstance(layer, AnalogLayer):
            copies = 2 if isinstance(layer.analog, TikiTakaWeight) else 1
            total += copies * _grid(layer.analog.out_features, layer.analog.in_features, tile_size)
        elif isinstance(layer, nn.Linear):
            total += _grid(layer.out_features, layer.in_features, tile_size)
        elif isinstance(layer, nn.Conv2d):
            g = layer.groups
            fan_in = layer.in_channels // g * layer.kernel_size[0] * layer.kernel_size[1]
            total += g * _grid(layer.out_channels // g, fan_in, tile_size)
    return total


def _backward(output: Any) -> None:
    tensors = [output] if isinstance(output, torch.Tensor) else list(output)
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    if tensors:
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])


def _detach(output: Any) -> Any:
    """The next block's input: cut from the previous block's graph, a leaf that wants a
    gradient if it is floating point (so the next block's backward runs as in the pipeline)."""
    if isinstance(output, torch.Tensor):
        t = output.detach()
        return t.requires_grad_() if t.is_floating_point() else t
    if isinstance(output, tuple | list):
        return type(output)(_detach(t) for t in output)
    return output


def measure_block_times(blocks: Blocks, example_input: Any, repeats: int = 3) -> list[float]:
    """Median forward+backward seconds of each block over ``repeats`` runs of
    ``example_input`` through the blocks in order (each block's output feeds the next; the
    backward of a block starts from a gradient of ones on its output).

    Runs on a deep copy of the blocks and restores torch's CPU random state, so measuring
    leaves no trace on the model: no parameter gradients, no pending analog updates, no
    batch-norm statistics, no consumed tile or dropout random numbers."""
    modules = copy.deepcopy([module for _, module in blocks])
    samples: list[list[float]] = [[] for _ in modules]
    on_gpu = any(t.is_cuda for m in modules for t in m.parameters()) or (
        isinstance(example_input, torch.Tensor) and example_input.is_cuda
    )
    with torch.random.fork_rng(devices=[]):
        for _ in range(repeats):
            x = _detach(example_input)
            for k, module in enumerate(modules):
                start = time.perf_counter()
                y = module(x)
                _backward(y)
                if on_gpu:  # kernels run asynchronously: wait for them before reading the clock
                    torch.cuda.synchronize()
                samples[k].append(time.perf_counter() - start)
                x = _detach(y)
    return [statistics.median(s) for s in samples]


# ---------------------------------------------------------------------------------------------
# deciding


def balance(costs: Sequence[float], num_stages: int) -> list[int]:
    """Blocks per stage for a contiguous split of ``costs`` into ``num_stages`` non-empty
    stages that minimises the largest stage cost (exact, not greedy).

    Ties are broken deterministically, in this order: smallest sum of squared stage costs
    (the most balanced split), then smallest sum of squared block counts, then earlier stages
    larger. With equal costs this gives the ``uniform`` split."""
    n, stages = len(costs), num_stages
    if not 1 <= stages <= n:
        raise ConfigError(f"partition: cannot split {n} blocks into {stages} non-empty stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def load(i: int, j: int) -> float:  # the same expression everywhere, so floats compare exactly
        return prefix[j] - prefix[i]

    inf = math.inf
    # worst[k][i]: least bottleneck of blocks i..n-1 in k stages
    worst = [[inf] * (n + 1) for _ in range(stages + 1)]
    worst[0][n] = 0
    for k in range(1, stages + 1):
        for i in range(n - k + 1):
            worst[k][i] = min(max(load(i, e), worst[k - 1][e]) for e in range(i + 1, n - k + 2))
    bottleneck = worst[stages][0]

    # among splits with that bottleneck: least (Σ load², Σ count²); the first stage as long as
    # possible among equals (`<=` while scanning ends upwards keeps the last, longest one)
    best: list[list[tuple[float, int] | None]] = [[None] * (n + 1) for _ in range(stages + 1)]
    end = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][n] = (0, 0)
    for k in range(1, stages + 1):
        for i in range(n - k + 1):
            for e in range(i + 1, n - k + 2):
                rest = best[k - 1][e]
                if rest is None or load(i, e) > bottleneck:
                    continue
                score = (load(i, e) ** 2 + rest[0], (e - i) ** 2 + rest[1])
                current = best[k][i]
                if current is None or score <= current:
                    best[k][i], end[k][i] = score, e
    counts, i = [], 0
    for k in range(stages, 0, -1):
        counts.append(end[k][i] - i)
        i = end[k][i]
    return counts


def _uniform(blocks: Blocks, num_stages: int) -> list[int]:
    """Equal block counts; the first ``N mod S`` stages get one block more."""
    base, extra = divmod(len(blocks), num_stages)
    return [base + (s < extra) for s in range(num_stages)]


def _by_params(blocks: Blocks, num_stages: int) -> list[int]:
    return balance([block_params(m) for _, m in blocks], num_stages)


def _by_tiles(blocks: Blocks, num_stages: int, *, tile_size: int = 512) -> list[int]:
    return balance([block_tiles(m, tile_size) for _, m in blocks], num_stages)


def _by_time(
    blocks: Blocks, num_stages: int, *, example_input: Any = None, repeats: int = 3
) -> Split:
    if example_input is None:
        raise ConfigError(
            "partition: method 'time' needs example_input (a batch for the first block) to "
            "measure each block; pass it or use method 'params' or 'tiles'"
        )
    times = measure_block_times(blocks, example_input, repeats)
    return Split(tuple(balance(times, num_stages)), tuple(times))


PARTITIONERS: dict[str, Partitioner] = {
    "uniform": _uniform,
    "params": _by_params,
    "tiles": _by_tiles,
    "time": _by_time,
}


def register_partitioner(name: str, fn: Partitioner, *, replace: bool = False) -> None:
    """Make ``fn(blocks, num_stages, **context)`` available as ``partition(..., method=name)``.

    ``blocks`` is the list of ``(name, module)`` pairs, and ``fn`` returns blocks per stage (a
    list of ints, or a ``Split``). Of the context keywords ``tile_size``, ``example_input``,
    ``repeats`` and any extra options given to ``partition``, ``fn`` receives those its
    signature names (all of them if it takes ``**kwargs``)."""
    if not isinstance(name, str) or not name or name in _LIST_METHODS:
        raise ConfigError(
            f"partition: cannot register a partitioner named {name!r}; use a non-empty name "
            f"other than {', '.join(_LIST_METHODS)}"
        )
    if not callable(fn):
        raise ConfigError(f"partition: partitioner {name!r} must be callable, got {fn!r}")
    if name in PARTITIONERS and not replace:
        raise ConfigError(
            f"partition: a partitioner named {name!r} is already registered; pass replace=True "
            "to override it"
        )
    PARTITIONERS[name] = fn


# ---------------------------------------------------------------------------------------------
# checking and assembling


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_num_stages(num_stages: Any, names: Sequence[str]) -> int:
    stages = _as_int(num_stages)
    if stages is None or stages < 1:
        raise ConfigError(f"partition: num_stages must be an integer >= 1, got {num_stages!r}")
    if stages > len(names):
        raise ConfigError(
            f"partition: {stages} stages but the model has only {len(names)} blocks "
            f"({', '.join(names)})"
        )
    return stages


def _counts_problem(counts: Any, num_stages: int, num_blocks: int) -> str | None:
    """Why ``counts`` is not a valid blocks-per-stage list, or None if it is."""
    if isinstance(counts, str | bytes) or not isinstance(counts, Sequence):
        return f"expected a list of blocks per stage, got {type(counts).__name__}"
    ints = [_as_int(c) for c in counts]
    if any(c is None for c in ints):
        return f"blocks per stage must be integers, got {list(counts)!r}"
    if len(ints) != num_stages:
        return f"{len(ints)} block counts for {num_stages} stages; give one count per stage"
    for s, c in enumerate(ints):
        if c < 1:  # type: ignore[operator]
            return f"stage {s} would be empty (count {c}); every count must be >= 1"
    if sum(ints) != num_blocks:  # type: ignore[arg-type]
        return (
            f"blocks not covered: counts sum to {sum(ints)}, "  # type: ignore[arg-type]
            f"the model has {num_blocks} blocks"
        )
    return None


def _counts_from_names(
    split: Sequence[str], num_stages: int | None, names: Sequence[str]
) -> list[int]:
    if num_stages is not None and _check_num_stages(num_stages, names) != len(split) + 1:
        raise ConfigError(
            f"partition: {num_stages} stages need {num_stages - 1} split names (the first block "
            f"of stages 1..{num_stages - 1}), got {len(split)}"
        )
    index = {name: i for i, name in enumerate(names)}
    starts = [0]
    for name in split:
        if name not in index:
            raise ConfigError(
                f"partition: split name {name!r} is not a block; blocks are {', '.join(names)}"
            )
        if index[name] == 0:
            raise ConfigError(
                f"partition: split name {name!r} is the first block; split names are the first "
                "blocks of stages 1..S-1"
            )
        if split.count(name) > 1:
            raise ConfigError(f"partition: split name {name!r} is given more than once")
        if index[name] < starts[-1]:
            raise ConfigError(
                f"partition: split names out of order: {name!r} comes before "
                f"{names[starts[-1]]!r} in the model; list them in block order"
            )
        starts.append(index[name])
    starts.append(len(names))
    return [y - x for x, y in pairwise(starts)]


def _call(
    fn: Partitioner,
    blocks: Blocks,
    num_stages: int,
    context: dict[str, Any],
    options: dict[str, Any],
    label: str,
) -> Any:
    """Call ``fn`` with the context keywords its signature accepts and every option (an
    option it does not accept is an error, not silently dropped)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: give them everything
        parameters = None
    if parameters is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        kwargs = {**context, **options}
    else:
        accepted = {p.name for p in parameters[2:]}
        unknown = sorted(set(options) - accepted)
        if unknown:
            takes = ", ".join(sorted(accepted - set(context))) or "none"
            raise ConfigError(
                f"partition: {label} takes no option {unknown[0]!r}; its options: {takes}"
            )
        kwargs = {k: v for k, v in {**context, **options}.items() if k in accepted}
    try:
        return fn(list(blocks), num_stages, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        raise user_code_error("partition", label, exc) from exc


def partition(
    blocks: nn.Module | Blocks,
    num_stages: int | None = None,
    method: str | Sequence[int] | Sequence[str] | Callable[..., Any] = "uniform",
    *,
    tile_size: int = 512,
    example_input: Any = None,
    repeats: int = 3,
    **options: Any,
) -> Partition:
    """Split ``blocks`` (a model, see ``pipeline_blocks``, or its ``(name, module)`` list) into
    ``num_stages`` contiguous non-empty stages.

    ``method`` is the name of a partitioner in ``PARTITIONERS`` (``uniform``, ``params``,
    ``tiles``, ``time`` or a registered one; ``options`` go to it), a list of blocks per stage
    (``[3, 2, 2, 1]``), a list of split names (the first block of stages 1..S-1), or a callable
    ``fn(blocks, num_stages) -> blocks per stage``. With a list, ``num_stages`` may be None.
    ``tile_size`` sets the crossbar size for tile counts; ``example_input`` and ``repeats``
    drive the ``time`` method."""
    if not isinstance(blocks, nn.Module | Sequence):
        raise ConfigError(
            f"partition: blocks must be a model or a list of (name, module) pairs, got "
            f"{type(blocks).__name__}"
        )
    named = pipeline_blocks(blocks) if isinstance(blocks, nn.Module) else list(blocks)
    for item in named:
        if not (
            isinstance(item, tuple | list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], nn.Module)
        ):
            raise ConfigError(
                f"partition: blocks must be a model or a list of (name, module) pairs, got an "
                f"entry {type(item).__name__}; use pipeline_blocks(model) to get the pairs"
            )
    if not named:
        raise ConfigError("partition: no blocks to split; a pipeline needs >= 1 block")
    names = tuple(name for name, _ in named)
    size = _as_int(tile_size)
    if size is None or size < 1:
        raise ConfigError(f"partition: tile_size must be an integer >= 1, got {tile_size!r}")
    reps = _as_int(repeats)
    if reps is None or reps < 1:
        raise ConfigError(f"partition: repeats must be an integer >= 1, got {repeats!r}")

    allowed = (
        f"use one of {', '.join(PARTITIONERS)}, a list of blocks per stage, a list of split "
        "names or a callable"
    )
    if isinstance(method, str):
        if method not in PARTITIONERS:
            raise ConfigError(f"partition: unknown method {method!r}; {allowed}")
        stages = _check_num_stages(num_stages, names)
        context = {"tile_size": size, "example_input": example_input, "repeats": reps}
        result = _call(PARTITIONERS[method], named, stages, context, options, f"method {method!r}")
        label, source = method, f"method {method!r}"
    elif callable(method):
        if options:
            raise ConfigError(
                f"partition: options {sorted(options)} apply only to named methods, not to a "
                "callable"
            )
        stages = _check_num_stages(num_stages, names)
        source = f"callable {getattr(method, '__qualname__', repr(method))}"
        result = _call(method, named, stages, {}, {}, source)
        label = "callable"
    elif isinstance(method, Sequence) and not isinstance(method, bytes):
        if options:
            raise ConfigError(
                f"partition: options {sorted(options)} apply only to named methods, not to an "
                "explicit split"
            )
        items = list(method)
        if all(isinstance(x, str) for x in items):
            result = _counts_from_names(items, num_stages, names)
            stages, label = len(items) + 1, "names"
        elif all(_as_int(x) is not None for x in items):
            stages = _check_num_stages(len(items) if num_stages is None else num_stages, names)
            result, label = items, "explicit"
        else:
            raise ConfigError(
                f"partition: a method list must hold only integers (blocks per stage) or only "
                f"block names (split points), got {items!r}"
            )
        source = ""
    else:
        raise ConfigError(f"partition: method {method!r} is not understood; {allowed}")

    counts, block_times = (
        (result.counts, result.block_times) if isinstance(result, Split) else (result, None)
    )
    problem = _counts_problem(counts, stages, len(names))
    if problem is not None:
        where = f"{source} returned {counts!r}, which is invalid: " if source else ""
        raise ConfigError(f"partition: {where}{problem}")
    if block_times is not None and len(block_times) != len(names):
        raise ConfigError(
            f"partition: {source} returned {len(block_times)} block times for {len(names)} blocks"
        )

    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + int(c))
    per_block_params = [block_params(m) for _, m in named]
    per_block_tiles = [block_tiles(m, size) for _, m in named]
    per_block_layers = [block_layers(m) for _, m in named]
    spans = list(pairwise(bounds))
    return Partition(
        method=label,
        bounds=tuple(bounds),
        block_names=names,
        params=tuple(sum(per_block_params[a:b]) for a, b in spans),
        tiles=tuple(sum(per_block_tiles[a:b]) for a, b in spans),
        tile_size=size,
        times=None
        if block_times is None
        else tuple(float(sum(block_times[a:b])) for a, b in spans),
        layers=tuple(sum(per_block_layers[a:b]) for a, b in spans),
    )
