"""Datasets as in-memory tensors, and the deterministic order in which an epoch visits them.

The central scheduler owns the data (docs/design.md §5): it loads a whole split once, then streams
micro-batches to stage 0 (inputs) and to the last stage (targets). Every split fits in memory
for the experiments this package reproduces, so a dataset is just two tensors.

- ``lsq``: the least-squares problem of arXiv 2406.12774 (D = 40 features, N = 100 samples).
- ``digits``: scikit-learn's 8×8 handwritten digits (bundled with scikit-learn, offline).
- ``mnist``: the four IDX files from the MNIST page, plain or gzipped, in ``root``.
- ``cifar10``: the CIFAR-10 "python version" pickles in ``root``.

Nothing is downloaded: files are read from the folder the user names. Shuffling comes from
``epoch_order``, a permutation that depends only on the run seed and the epoch, so every
backend and every process sees the same micro-batches.
"""

from __future__ import annotations

import gzip
import logging
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from aimcpipe.dataconf import check_int
from aimcpipe.errors import ConfigError
from aimcpipe.seeding import derive_seed

__all__ = ["DATASETS", "Dataset", "epoch_order", "load_dataset"]

log = logging.getLogger(__name__)

Task = Literal["classification", "regression"]
DATASETS: tuple[str, ...] = ("lsq", "digits", "mnist", "cifar10")

# Options each dataset accepts beyond name/root/seed/limits, with their defaults.
_OPTIONS: dict[str, dict[str, Any]] = {
    "lsq": {"features": 40, "samples": 100, "noise": 0.0},
    "digits": {"test_fraction": 0.2},
    "mnist": {},
    "cifar10": {},
}

MNIST_FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801


@dataclass(frozen=True)
class Dataset:
    """One split: inputs ``x`` (float32; images N×C×H×W) and targets ``y``.

    Classification targets are int64 class indices of shape N; regression targets are
    float32 of shape N×k. ``num_classes`` is None for regression.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    task: Task
    num_classes: int | None

    def __post_init__(self) -> None:
        where = f"dataset {self.name!r}"
        for key in ("x", "y"):
            value = getattr(self, key)
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                raise ConfigError(
                    f"{where}: {key} must be a torch.Tensor with one row per sample, "
                    f"got {type(value).__name__}"
                )
        if self.task not in ("classification", "regression"):
            raise ConfigError(
                f"{where}: task must be 'classification' or 'regression', got {self.task!r}"
            )
        if self.x.shape[0] != self.y.shape[0]:
            raise ConfigError(f"{where}: {self.x.shape[0]} inputs but {self.y.shape[0]} targets")
        if (self.task == "classification") != (self.num_classes is not None):
            raise ConfigError(f"{where}: num_classes must be set for classification only")
        if self.num_classes is not None and (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 1
        ):
            raise ConfigError(
                f"{where}: num_classes must be an integer >= 1, got {self.num_classes!r}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, indices: torch.Tensor) -> Dataset:
        """The samples at ``indices`` (a 1-D index tensor), in that order."""
        return Dataset(self.name, self.x[indices], self.y[indices], self.task, self.num_classes)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits ``num_samples`` samples (int64, length N).

    A permutation drawn from a generator seeded with ``derive_seed(seed, "shuffle", epoch)``:
    it depends on nothing else, so every call, process and backend gets the same order.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ConfigError(f"num_samples: must be an integer >= 0, got {num_samples!r}")
    if not shuffle:
        return torch.arange(num_samples, dtype=torch.int64)
    gen = torch.Generator().manual_seed(derive_seed(seed, "shuffle", epoch))
    return torch.randperm(num_samples, generator=gen, dtype=torch.int64)


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    **options: Any,
) -> tuple[Dataset, Dataset]:
    """Load dataset ``name`` and return its ``(train, test)`` splits.

    ``root`` is the folder holding the files (mnist, cifar10; ignored by lsq and digits).
    ``seed`` draws the lsq problem and the digits split. ``limit_train``/``limit_test`` keep
    the first k samples of a split for quick runs. Other keyword arguments are the dataset's
    options (lsq: ``features``, ``samples``, ``noise``; digits: ``test_fraction``).
    Bad input raises ``ConfigError`` naming the ``data.*`` key.
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ConfigError(f"data.name: {name!r} is not a dataset; allowed: {', '.join(DATASETS)}")
    allowed = _OPTIONS[name]
    for key in options:
        if key not in allowed:
            choices = ", ".join(allowed) if allowed else "none"
            raise ConfigError(f"data.{key}: not an option of {name!r}; allowed: {choices}")
    opts = {**allowed, **options}
    loader: Callable[..., tuple[Dataset, Dataset]] = _LOADERS[name]
    if name in ("mnist", "cifar10"):
        train, test = loader(_folder(root, name), **opts)
    else:
        train, test = loader(seed, **opts)
    return _limit(train, limit_train, "limit_train"), _limit(test, limit_test, "limit_test")


# --- option checks ---------------------------------------------------------------------------


def _int_option(key: str, value: Any, minimum: int) -> int:
    return check_int(f"data.{key}", value, minimum)


def _limit(ds: Dataset, limit: int | None, key: str) -> Dataset:
    if limit is None:
        return ds
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= len(ds):
        raise ConfigError(
            f"data.{key}: must be an integer from 1 to {len(ds)} (the split's size), got {limit!r}"
        )
    return ds.subset(torch.arange(limit))


def _folder(root: str | Path | None, name: str) -> Path:
    if root is None or root == "":
        raise ConfigError(f"data.root: required for {name}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(f"data.root: {path} is not a folder")
    return path


# --- lsq -------------------------------------------------------------------------------------


def lsq_problem(
    gen: torch.Generator, samples: int, features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = randn(N, D)/2`` and ``x* = 0.3·randn(D)`` drawn from ``gen`` (shared with
    ``aimcpipe lsq``, so the same seed gives the same problem there and in ``train``)."""
    a = torch.randn(samples, features, generator=gen) / 2
    x_star = 0.3 * torch.randn(features, generator=gen)
    return a, x_star


def _load_lsq(seed: int, features: Any, samples: Any, noise: Any) -> tuple[Dataset, Dataset]:
    """arXiv 2406.12774's least squares: ``A = randn(N, D)/2``, ``x* = 0.3·randn(D)``,
    ``b = A x*`` (so the optimum loss is 0). The training targets get optional label noise
    ``noise·randn``; the test targets are exact. Targets are N×1."""
    d = _int_option("features", features, 1)
    n = _int_option("samples", samples, 1)
    if isinstance(noise, bool) or not isinstance(noise, int | float):
        raise ConfigError(f"data.noise: must be a finite number >= 0, got {noise!r}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ConfigError(f"data.noise: must be a finite number >= 0, got {noise!r}")
    gen = torch.Generator().manual_seed(derive_seed(seed, "lsq-problem"))
    a, x_star = lsq_problem(gen, n, d)
    b = (a @ x_star).unsqueeze(1)
    b_train = b + noise * torch.randn(b.shape, generator=gen) if noise > 0 else b.clone()
    train = Dataset("lsq", a, b_train, "regression", None)
    test = Dataset("lsq", a.clone(), b, "regression", None)
    return train, test


# --- digits ----------------------------------------------------------------------------------


def _load_digits(seed: int, test_fraction: Any) -> tuple[Dataset, Dataset]:
    """scikit-learn's digits (1797 images, 8×8, 16 grey levels) as N×1×8×8 in [0, 1], then
    standardised with the training split's scalar mean and std. The split is a permutation
    seeded by ``derive_seed(seed, "digits-split")``: the test split is its first
    ``round(test_fraction·N)`` samples."""
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, int | float)
        or not 0 < test_fraction < 1
    ):
        raise ConfigError(
            f"data.test_fraction: must be a number between 0 and 1 (exclusive), "
            f"got {test_fraction!r}"
        )
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(
            "data.name: 'digits' needs scikit-learn; pip install scikit-learn"
        ) from None
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    n = len(y)
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    gen = torch.Generator().manual_seed(derive_seed(seed, "digits-split"))
    perm = torch.randperm(n, generator=gen)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    x_train, x_test = x[train_idx], x[test_idx]
    mean, std = x_train.mean(), x_train.std()
    train = Dataset("digits", (x_train - mean) / std, y[train_idx], "classification", 10)
    test = Dataset("digits", (x_test - mean) / std, y[test_idx], "classification", 10)
    return train, test


# --- mnist -----------------------------------------------------------------------------------


def _read_maybe_gzipped(folder: Path, stem: str) -> tuple[Path, bytes]:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            try:
                if path.suffix == ".gz":
                    with gzip.open(path, "rb") as f:
                        return path, f.read()
                return path, path.read_bytes()
            except (OSError, EOFError) as exc:
                raise ConfigError(f"data.root: cannot read {path}: {exc}") from None
    raise ConfigError(
        f"data.root: {folder} has no MNIST file {stem}(.gz); download the four IDX files "
        "from the MNIST page into that folder"
    )


def _parse_idx(path: Path, data: bytes, magic: int) -> np.ndarray:
    """An IDX array of unsigned bytes: a big-endian header ``0x0000 08 ndim``, ``ndim``
    big-endian uint32 sizes, then the values in row-major order."""
    if len(data) < 4:
        raise ConfigError(f"data.root: {path} is truncated: no IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        kind = "images" if magic == _IDX_IMAGES else "labels"
        raise ConfigError(
            f"data.root: {path} has magic 0x{found:08x}, expected 0x{magic:08x} (IDX {kind})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"data.root: {path} is truncated: IDX header needs {header} bytes")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims)
    if len(data) - header != expected:
        raise ConfigError(
            f"data.root: {path} holds {len(data) - header} data bytes but its header "
            f"({'×'.join(map(str, dims))}) needs {expected}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _mnist_split(folder: Path, split: str) -> Dataset:
    img_path, img_bytes = _read_maybe_gzipped(folder, MNIST_FILES[f"{split}-images"])
    lab_path, lab_bytes = _read_maybe_gzipped(folder, MNIST_FILES[f"{split}-labels"])
    images = _parse_idx(img_path, img_bytes, _IDX_IMAGES)
    labels = _parse_idx(lab_path, lab_bytes, _IDX_LABELS)
    if len(images) != len(labels):
        raise ConfigError(
            f"data.root: {img_path} has {len(images)} images but {lab_path} has "
            f"{len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise ConfigError(f"data.root: {lab_path} has label {labels.max()}; MNIST labels are 0-9")
    x = images.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    x = (x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset("mnist", torch.from_numpy(x), y, "classification", 10)


def _load_mnist(folder: Path) -> tuple[Dataset, Dataset]:
    """MNIST from its IDX files; pixels scaled to [0, 1], then ``(x − 0.1307)/0.3081``."""
    return _mnist_split(folder, "train"), _mnist_split(folder, "test")


# --- cifar10 ---------------------------------------------------------------------------------


def _read_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # a broken pickle can fail in many ways
        raise ConfigError(
            f"data.root: {path} is not a CIFAR-10 python pickle ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(batch, dict):
        raise ConfigError(f"data.root: {path} holds a {type(batch).__name__}, not a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ConfigError(f"data.root: {path} has no b'data' and b'labels' entries")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ConfigError(
            f"data.root: {path} data is {data.dtype} {data.shape}, expected uint8 N×3072"
        )
    if labels.shape != (data.shape[0],):
        raise ConfigError(f"data.root: {path} has {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ConfigError(f"data.root: {path} has labels outside 0-9")
    return data, labels


def _cifar_dataset(parts: list[tuple[np.ndarray, np.ndarray]]) -> Dataset:
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR10_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    x = (x - mean) / std
    return Dataset("cifar10", torch.from_numpy(x), torch.from_numpy(labels), "classification", 10)


def _load_cifar10(folder: Path) -> tuple[Dataset, Dataset]:
    """CIFAR-10 from the "python version" pickles (``data_batch_1`` … ``data_batch_5`` and
    ``test_batch``) in ``folder`` or ``folder/cifar-10-batches-py``. Each row of ``b"data"``
    holds the red, green and blue 32×32 planes; pixels are scaled to [0, 1] and normalised
    per channel.

    Security: unpickling can run arbitrary code, so only load files from a trusted source
    (the CIFAR-10 page).

    Training batches are read from ``data_batch_1`` upwards while they exist (fewer than five
    is accepted, with a warning, for small test sets); a gap in the numbering is an error.
    """
    nested = folder / "cifar-10-batches-py"
    if not (folder / "data_batch_1").is_file() and nested.is_dir():
        folder = nested
    present = [i for i in range(1, 6) if (folder / f"data_batch_{i}").is_file()]
    if not present or not (folder / "test_batch").is_file():
        missing = "data_batch_1" if not present else "test_batch"
        raise ConfigError(
            f"data.root: {folder} has no CIFAR-10 file {missing}; extract the CIFAR-10 python "
            "version (cifar-10-python.tar.gz) into that folder"
        )
    if present != list(range(1, len(present) + 1)):
        gap = next(i for i in range(1, 6) if i not in present)
        raise ConfigError(f"data.root: {folder} has no CIFAR-10 file data_batch_{gap}")
    if len(present) < 5:
        log.warning("cifar10: %s has only data_batch_1..%d of 5", folder, len(present))
    train = _cifar_dataset([_read_cifar_pickle(folder / f"data_batch_{i}") for i in present])
    test = _cifar_dataset([_read_cifar_pickle(folder / "test_batch")])
    return train, test


_LOADERS: dict[str, Callable[..., tuple[Dataset, Dataset]]] = {
    "lsq": _load_lsq,
    "digits": _load_digits,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
}
