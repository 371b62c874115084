"""Datasets: tiny files in the real MNIST/CIFAR-10 formats, lsq, digits, epoch order, errors."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from aimcpipe.errors import ConfigError
from aimcpipe.runtime import DATASETS, Dataset, epoch_order, load_dataset
from aimcpipe.runtime.datasets import CIFAR10_MEAN, CIFAR10_STD, MNIST_FILES

# --- writers for the real file formats ---------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_file(path, payload: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def mnist_arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def write_mnist(folder, gz: bool = False, n_train: int = 5, n_test: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    train, test = mnist_arrays(n_train, 1), mnist_arrays(n_test, 2)
    for split, (images, labels) in (("train", train), ("test", test)):
        write_file(folder / MNIST_FILES[f"{split}-images"], idx_bytes(images), gz)
        write_file(folder / MNIST_FILES[f"{split}-labels"], idx_bytes(labels), gz)
    return train, test


def cifar_batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return {b"batch_label": b"test", b"data": data, b"labels": labels}


def write_cifar(folder, train_batches: int = 2, n: int = 6):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(n, i) for i in range(1, train_batches + 1)}
    batches["test_batch"] = cifar_batch(4, 99)
    for name, batch in batches.items():
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)
    return batches


# --- mnist -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_shapes_values_and_labels(tmp_path, gz):
    (train_images, train_labels), (test_images, test_labels) = write_mnist(tmp_path, gz=gz)
    train, test = load_dataset("mnist", tmp_path)
    assert (len(train), len(test)) == (5, 3)
    assert train.x.shape == (5, 1, 28, 28) and train.x.dtype == torch.float32
    assert test.x.shape == (3, 1, 28, 28)
    assert train.y.dtype == torch.int64 and train.y.tolist() == train_labels.tolist()
    assert test.y.tolist() == test_labels.tolist()
    assert train.task == "classification" and train.num_classes == 10
    pixel = int(train_images[2, 7, 11])
    assert train.x[2, 0, 7, 11].item() == pytest.approx((pixel / 255 - 0.1307) / 0.3081, abs=1e-5)
    assert test.x[0, 0, 0, 0].item() == pytest.approx(
        (int(test_images[0, 0, 0]) / 255 - 0.1307) / 0.3081, abs=1e-5
    )


def test_mnist_missing_file_names_it(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match=r"^data\.root: .* no MNIST file t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def test_mnist_bad_magic_and_truncation(tmp_path):
    write_mnist(tmp_path)
    images, labels = mnist_arrays(5, 1)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(labels, magic=0x00000803))
    with pytest.raises(ConfigError, match=r"train-labels-idx1-ubyte has magic 0x00000803"):
        load_dataset("mnist", tmp_path)
    path.write_bytes(idx_bytes(labels))
    img = tmp_path / "train-images-idx3-ubyte"
    img.write_bytes(idx_bytes(images)[:-10])
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte holds .* truncated"):
        load_dataset("mnist", tmp_path)
    img.write_bytes(b"\x00\x00")
    with pytest.raises(ConfigError, match=r"truncated: no IDX header"):
        load_dataset("mnist", tmp_path)
    img.write_bytes(idx_bytes(images[:4]))
    with pytest.raises(ConfigError, match=r"has 4 images but .* has 5 labels"):
        load_dataset("mnist", tmp_path)


def test_mnist_broken_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ConfigError, match=r"^data\.root: cannot read .*t10k-images"):
        load_dataset("mnist", tmp_path)


def test_root_required_and_must_be_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.root: required for mnist$"):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match=r"^data\.root: required for cifar10$"):
        load_dataset("cifar10", None)
    with pytest.raises(ConfigError, match=r"^data\.root: .*nowhere is not a folder$"):
        load_dataset("mnist", tmp_path / "nowhere")


# --- cifar10 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_shapes_values_and_labels(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = write_cifar(folder)
    train, test = load_dataset("cifar10", tmp_path)
    assert train.x.shape == (12, 3, 32, 32) and train.x.dtype == torch.float32
    assert test.x.shape == (4, 3, 32, 32)
    expected = batches["data_batch_1"][b"labels"] + batches["data_batch_2"][b"labels"]
    assert train.y.dtype == torch.int64 and train.y.tolist() == expected
    assert test.y.tolist() == batches["test_batch"][b"labels"]
    # sample 7 is row 1 of data_batch_2; row-major planes: channel c, row r, column k
    row = batches["data_batch_2"][b"data"][1]
    for c, r, k in [(0, 0, 0), (1, 5, 9), (2, 31, 30)]:
        value = (int(row[c * 1024 + r * 32 + k]) / 255 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert train.x[7, c, r, k].item() == pytest.approx(value, abs=1e-5)


def test_cifar10_errors(tmp_path):
    write_cifar(tmp_path, train_batches=3)
    (tmp_path / "data_batch_2").unlink()
    with pytest.raises(ConfigError, match=r"no CIFAR-10 file data_batch_2$"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match=r"data_batch_2 is not a CIFAR-10 python pickle"):
        load_dataset("cifar10", tmp_path)
    with (tmp_path / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ConfigError, match=r"data_batch_2 data is uint8 \(2, 100\)"):
        load_dataset("cifar10", tmp_path)
    with (tmp_path / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0]}, f)
    with pytest.raises(ConfigError, match=r"has 2 images but 1 labels"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(ConfigError, match=r"no CIFAR-10 file test_batch; extract"):
        load_dataset("cifar10", tmp_path)


# --- lsq ---------------------------------------------------------------------------------------


def test_lsq_problem_is_reproducible_and_exact():
    train, test = load_dataset("lsq", seed=3)
    assert train.x.shape == (100, 40) and train.y.shape == (100, 1)
    assert train.task == "regression" and train.num_classes is None
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.float32
    again, _ = load_dataset("lsq", seed=3)
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    other, _ = load_dataset("lsq", seed=4)
    assert not torch.equal(train.x, other.x)
    # b = A x* has an exact solution: least squares reaches zero loss up to float32 rounding
    solution = torch.linalg.lstsq(test.x.double(), test.y.double()).solution
    assert (test.x.double() @ solution - test.y.double()).abs().max() < 1e-5
    assert torch.equal(train.y, test.y)  # noise 0 by default
    assert train.x.std().item() == pytest.approx(0.5, rel=0.1)


def test_lsq_options_and_noise():
    train, test = load_dataset("lsq", seed=0, features=5, samples=7, noise=0.1)
    assert train.x.shape == (7, 5) and test.y.shape == (7, 1)
    assert torch.equal(train.x, test.x)
    assert 0 < (train.y - test.y).abs().max() < 1.0
    with pytest.raises(ConfigError, match=r"^data\.features: must be an integer >= 1, got 0$"):
        load_dataset("lsq", features=0)
    with pytest.raises(ConfigError, match=r"^data\.noise: must be a finite number >= 0"):
        load_dataset("lsq", noise=-1.0)


# --- digits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return load_dataset("digits", seed=0)


def test_digits_split_sizes_and_standardisation(digits):
    train, test = digits
    assert (len(train), len(test)) == (1797 - 359, 359)
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64 and set(train.y.tolist()) == set(range(10))
    assert train.x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train.x.std().item() == pytest.approx(1.0, abs=1e-4)
    assert train.num_classes == 10


def test_digits_split_is_deterministic_per_seed(digits):
    train, test = digits
    again_train, again_test = load_dataset("digits", seed=0)
    assert torch.equal(train.x, again_train.x) and torch.equal(test.y, again_test.y)
    other_train, other_test = load_dataset("digits", seed=1, test_fraction=0.5)
    assert len(other_test) == round(0.5 * 1797) and len(other_train) + len(other_test) == 1797
    with pytest.raises(ConfigError, match=r"^data\.test_fraction: must be a number between"):
        load_dataset("digits", test_fraction=1.0)


def test_digits_without_sklearn(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r"^data\.name: 'digits' needs scikit-learn; pip"):
        load_dataset("digits")


# --- limits, names, options --------------------------------------------------------------------


def test_limits_take_the_first_samples(tmp_path):
    write_mnist(tmp_path)
    full_train, full_test = load_dataset("mnist", tmp_path)
    train, test = load_dataset("mnist", tmp_path, limit_train=2, limit_test=3)
    assert (len(train), len(test)) == (2, 3)
    assert torch.equal(train.x, full_train.x[:2]) and torch.equal(train.y, full_train.y[:2])
    assert torch.equal(test.x, full_test.x)
    for bad in (0, 6, -1, 2.0, True):
        with pytest.raises(
            ConfigError, match=r"^data\.limit_train: must be an integer from 1 to 5"
        ):
            load_dataset("mnist", tmp_path, limit_train=bad)
    with pytest.raises(ConfigError, match=r"^data\.limit_test: .* from 1 to 100 .* got 101$"):
        load_dataset("lsq", limit_test=101)


def test_unknown_name_and_options():
    assert DATASETS == ("lsq", "digits", "mnist", "cifar10")
    with pytest.raises(
        ConfigError,
        match=r"^data\.name: 'foo' is not a dataset; allowed: lsq, digits, mnist, cifar10$",
    ):
        load_dataset("foo")
    with pytest.raises(
        ConfigError, match=r"^data\.features: not an option of 'digits'; allowed: test_fraction$"
    ):
        load_dataset("digits", features=3)
    with pytest.raises(
        ConfigError, match=r"^data\.noise: not an option of 'mnist'; allowed: none$"
    ):
        load_dataset("mnist", "/unused", noise=0.1)


# --- Dataset and epoch order -------------------------------------------------------------------


def test_dataset_subset_and_checks():
    ds = Dataset("t", torch.arange(12.0).reshape(6, 2), torch.arange(6), "classification", 6)
    sub = ds.subset(torch.tensor([4, 1]))
    assert len(sub) == 2 and sub.y.tolist() == [4, 1] and sub.x[0].tolist() == [8.0, 9.0]
    assert sub.task == "classification" and sub.num_classes == 6 and sub.name == "t"
    with pytest.raises(ValueError, match="6 inputs but 5 targets"):
        Dataset("t", torch.zeros(6, 2), torch.zeros(5), "classification", 2)
    with pytest.raises(ValueError, match="num_classes"):
        Dataset("t", torch.zeros(6, 2), torch.zeros(6, 1), "regression", 2)


def test_epoch_order_is_deterministic_and_changes_per_epoch():
    first = epoch_order(50, seed=7, epoch=0)
    assert first.dtype == torch.int64 and sorted(first.tolist()) == list(range(50))
    assert torch.equal(first, epoch_order(50, seed=7, epoch=0))
    assert not torch.equal(first, epoch_order(50, seed=7, epoch=1))
    assert not torch.equal(first, epoch_order(50, seed=8, epoch=0))
    assert torch.equal(epoch_order(5, seed=7, epoch=3, shuffle=False), torch.arange(5))
    assert epoch_order(0, seed=1, epoch=0).numel() == 0
    # independent of the global RNG
    torch.manual_seed(123)
    a = epoch_order(20, seed=1, epoch=2)
    torch.manual_seed(456)
    assert torch.equal(a, epoch_order(20, seed=1, epoch=2))
    with pytest.raises(ConfigError, match="num_samples"):
        epoch_order(-1, seed=0, epoch=0)
