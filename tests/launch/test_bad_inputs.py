"""Bad input from a new user's hands: every case is one line on stderr, exit status 2, and no
work done (or lost) first."""

from __future__ import annotations

import pytest

from aimcpipe.launch.cli import main

CONFIG = "configs/digits-analog.yaml"


def _one_line(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"aimcpipe {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("command", ["train", "speedup"])
def test_config_that_is_binary_a_directory_or_a_device_is_named_for_what_it_is(
    capsys, tmp_path, command
):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 3)
    out = ["--out", str(tmp_path / "out")]
    _one_line(capsys, [command, str(binary), *out], "not a text file")
    _one_line(capsys, [command, str(tmp_path), *out], "is a directory")
    _one_line(capsys, [command, "/dev/null", *out], "not a regular file")
    _one_line(capsys, [command, str(tmp_path / "missing.yaml"), *out], "does not exist")
    assert not (tmp_path / "out").exists()


def test_schedule_file_that_is_binary_or_a_directory_is_one_line(capsys, tmp_path):
    binary = tmp_path / "s.csv"
    binary.write_bytes(bytes(range(128, 256)))
    _one_line(capsys, ["simulate", "--schedule", str(binary)], "not a text file")
    folder = tmp_path / "d.json"
    folder.mkdir()
    _one_line(capsys, ["simulate", "--schedule", str(folder)], "is a directory")


ROOT_CASES = [
    ["simulate", "--stages", "2", "--microbatches", "2"],
    ["lsq"],
    ["train", CONFIG],
    ["speedup", CONFIG],
]


@pytest.mark.parametrize("argv", ROOT_CASES, ids=lambda a: a[0])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(
    capsys, tmp_path, monkeypatch, argv
):
    """A read-only file system (simulated: making anything there fails with EROFS) is found
    before the command computes anything, not when it writes its results."""
    import errno
    import tempfile

    from aimcpipe.launch import outdir

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outdir.tempfile, "mkdtemp", read_only)
    out = tmp_path / "out"
    _one_line(capsys, [*argv, "--out", str(out)], f"--out: cannot write in {tmp_path}",
              "read-only file system")  # fmt: skip
    assert not out.exists()
    monkeypatch.setattr(outdir.tempfile, "mkdtemp", tempfile.mkdtemp)


def test_an_out_in_a_folder_without_write_permission_is_refused(capsys, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; the read-only case above covers the check")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _one_line(capsys, ["lsq", "--out", str(locked / "run")], "--out: cannot write in")
    finally:
        locked.chmod(0o755)


SIZE_CASES = [
    (["simulate", "--stages", "1000000000", "--microbatches", "4"], ["--stages", "memory"]),
    (["simulate", "--stages", "2", "--microbatches", "1000000000"], ["--microbatches", "memory"]),
    (["lsq", "--replicas", "100000000"], ["--replicas", "memory"]),
    (["lsq", "--tau-iterations", "1000000000000"], ["--tau-iterations", "memory"]),
    (["train", CONFIG, "--epochs", "100000000", "--dry-run"], ["--epochs:", "days", "24 h"]),
    (["train", CONFIG, "--cycle-s", "1000", "--dry-run"], ["--cycle-s/epochs:", "days"]),
    (["speedup", CONFIG, "--epochs", "100000000"], ["--epochs:", "days"]),
]


@pytest.mark.parametrize("argv, needles", SIZE_CASES, ids=lambda a: " ".join(a[:3]))
def test_work_that_would_not_fit_or_finish_is_refused_at_once(capsys, tmp_path, argv, needles):
    """Sizes from the user are estimated before anything is allocated or computed: the
    command returns (the test would run out of memory or time otherwise) with one line."""
    out = [] if "--dry-run" in argv else ["--out", str(tmp_path / "out")]
    _one_line(capsys, [*argv, *out], *needles)
    assert not (tmp_path / "out").exists()


def test_a_size_check_leaves_work_that_fits_alone(capsys):
    """The same estimate lets an ordinary (long but feasible) job through."""
    assert main(["simulate", "--stages", "2,4", "--microbatches", "8", "--json"]) == 0
    assert '"async"' in capsys.readouterr().out


def test_too_few_samples_for_a_minibatch_is_named_as_such(capsys):
    argv = ["train", CONFIG, "--set", "pipeline.microbatches=1000000000", "--dry-run"]
    _one_line(capsys, argv, "fewer than one mini-batch", "pipeline.microbatches")


@pytest.mark.parametrize("command", ["train", "speedup", "lsq"])
def test_an_empty_out_is_not_the_current_directory(capsys, command):
    argv = [command] + ([CONFIG] if command != "lsq" else []) + ["--out", ""]
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit, with our one line
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "empty" in err, err


def test_an_empty_simulate_out_is_refused(capsys):
    _one_line(capsys, ["simulate", "--stages", "2", "--microbatches", "2", "--out", " "],
              "--out", "empty")  # fmt: skip


def test_a_name_too_long_for_the_file_system_is_refused_before_any_work(capsys, tmp_path):
    out = tmp_path / ("a" * 250)
    _one_line(capsys, ["lsq", "--out", str(out)], "--out", "250 bytes long")
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "speedup"])
def test_resume_of_a_missing_or_file_path_says_which(capsys, tmp_path, command):
    _one_line(capsys, [command, "--resume", str(tmp_path / "gone")], "--resume", "does not exist")
    afile = tmp_path / "f"
    afile.write_text("x")
    _one_line(capsys, [command, "--resume", str(afile)], "--resume", "is a file")


def test_a_learning_rate_beyond_float32_is_refused(capsys):
    _one_line(capsys, ["train", CONFIG, "--set", "optim.lr=1e39", "--dry-run"], "optim.lr",
              "float32")  # fmt: skip


def test_a_shortcut_flag_is_named_as_typed(capsys):
    _one_line(capsys, ["train", CONFIG, "--stages", "9", "--dry-run"], "--stages: 9 stages")
    _one_line(capsys, ["train", CONFIG, "--epochs", "1.5", "--dry-run"], "--epochs")


# ---- user code that raises: one line naming the callable, --debug for the traceback ----------

USER_MODULE = """
import torch
from torch import nn


def build():
    raise RuntimeError("broken factory")


class Boom(nn.Module):
    def forward(self, x):
        raise ValueError("bad forward")


def boom():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), Boom())


class _BadGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        raise ArithmeticError("bad backward")


class BadBackward(nn.Module):
    def forward(self, x):
        return _BadGradient.apply(x)


def bad_backward():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), BadBackward()
    )
"""


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A folder on sys.path holding user modules; returns a writer of (name, source)."""
    import importlib
    import sys
    import uuid

    folder = tmp_path / "user"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    names = []

    def write(source: str) -> str:
        name = f"umod_{uuid.uuid4().hex[:8]}"  # a fresh module: nothing cached from before
        (folder / f"{name}.py").write_text(source)
        names.append(name)
        importlib.invalidate_caches()
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def _factory_config(tmp_path, factory: str, **sections) -> str:
    import yaml

    data = {"model": {"factory": factory}, "data": {"limit_train": 128, "limit_test": 64}}
    data.update(sections)
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _assert_no_results(out) -> None:
    assert not (out / "results.json").exists()
    assert not (out / "checkpoint.pt").exists()


def test_a_factory_that_raises_is_one_line_naming_it(capsys, tmp_path, user_code):
    mod = user_code(USER_MODULE)
    out = tmp_path / "out"
    err = _one_line(capsys, ["train", _factory_config(tmp_path, f"{mod}:build"), "--out", str(out)])
    assert err.endswith(f"model.factory: {mod}:build raised RuntimeError: broken factory"), err
    _assert_no_results(out)


@pytest.mark.parametrize(
    "source, needles",
    [
        ("def build(:\n    pass\n", ["has a syntax error", "line 1"]),
        ("raise KeyError('at import')\n", ["importing", "raised KeyError: 'at import'"]),
        ("import no_such_dependency_zz\n", ["importing", "No module named 'no_such_dependency"]),
    ],
    ids=["syntax-error", "raises-on-import", "missing-dependency"],
)
def test_a_factory_module_that_cannot_be_imported_is_one_line(
    capsys, tmp_path, user_code, source, needles
):
    mod = user_code(source)
    out = tmp_path / "out"
    _one_line(capsys, ["train", _factory_config(tmp_path, f"{mod}:build"), "--out", str(out)],
              "model.factory", mod, *needles)  # fmt: skip
    assert not out.exists()


def test_a_missing_factory_module_is_still_told_apart_from_a_broken_one(capsys, tmp_path):
    _one_line(capsys, ["train", _factory_config(tmp_path, "no_such_module_zz:build")],
              "cannot import module 'no_such_module_zz'")  # fmt: skip


def test_a_user_module_whose_forward_raises_is_named_by_stage(capsys, tmp_path, user_code):
    mod = user_code(USER_MODULE)
    cfg = _factory_config(tmp_path, f"{mod}:boom", pipeline={"stages": 2})
    out = tmp_path / "out"
    _one_line(capsys, ["train", cfg, "--out", str(out)], "stage 1", "ValueError: bad forward")
    _assert_no_results(out)


@pytest.mark.parametrize("backend", ["local", "torch"])
def test_a_user_module_whose_backward_raises_is_named_by_stage_and_action(
    capsys, tmp_path, user_code, backend
):
    mod = user_code(USER_MODULE)
    cfg = _factory_config(tmp_path, f"{mod}:bad_backward", pipeline={"stages": 2})
    out = tmp_path / "out"
    argv = ["train", cfg, "--backend", backend, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("aimcpipe train: error: stage 1: 1B"), err
    assert err[-1].endswith("failed: ArithmeticError: bad backward"), err
    assert not any(line.startswith("Traceback") for line in err), err
    _assert_no_results(out)


@pytest.mark.parametrize("how", ["flag-after", "flag-before", "env"])
def test_debug_shows_the_user_code_traceback(capsys, tmp_path, user_code, monkeypatch, how):
    mod = user_code(USER_MODULE)
    argv = ["train", _factory_config(tmp_path, f"{mod}:build"), "--out", str(tmp_path / "o")]
    if how == "flag-after":
        argv.append("--debug")
    elif how == "flag-before":
        argv.insert(0, "--debug")
    else:
        monkeypatch.setenv("AIMCPIPE_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err, err
    assert 'raise RuntimeError("broken factory")' in err, err  # the user's own line
    assert err.strip().splitlines()[-1].endswith("raised RuntimeError: broken factory"), err


def test_debug_shows_the_traceback_a_stage_process_sent(capsys, tmp_path, user_code):
    mod = user_code(USER_MODULE)
    cfg = _factory_config(tmp_path, f"{mod}:bad_backward", pipeline={"stages": 2})
    argv = ["--debug", "train", cfg, "--backend", "torch", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "traceback of stage 1" in err, err
    assert 'raise ArithmeticError("bad backward")' in err, err


# ---- YAML: a key given twice is refused, naming it and both lines ----------------------------


@pytest.mark.parametrize(
    "text, needles",
    [
        ("model: {name: digits-fcn}\nseed: 1\nepochs: 1\nseed: 2\n", ["seed", "lines 2 and 4"]),
        (
            "model: {name: digits-fcn}\npipeline:\n  stages: 2\n  policy: wop\n  stages: 3\n",
            ["pipeline.stages", "lines 3 and 5"],
        ),
        ("model: {name: digits-fcn, name: lsq}\n", ["model.name", "both on line 1"]),
        (
            "model: {name: digits-fcn}\ncost:\n  forward: [1, 2]\nanalog:\n  device:\n"
            "    tau: 0.5\n  device:\n    tau: 0.7\n",
            ["analog.device", "lines 5 and 7"],
        ),
    ],
    ids=["top", "nested", "flow", "section"],
)
def test_a_duplicate_yaml_key_is_refused_naming_its_path_and_lines(capsys, tmp_path, text, needles):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    _one_line(capsys, ["train", str(path), "--out", str(out)], "given twice", *needles)
    assert not out.exists()


def test_a_yaml_merge_key_is_not_a_duplicate(tmp_path):
    from aimcpipe.launch.train_config import load_config

    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {lr: 0.1, lr_schedule: {kind: step}}\noptim:\n  <<: *b\n  lr: 0.2\n")
    assert load_config(path)["optim"]["lr"] == 0.2


def test_a_duplicate_key_in_a_set_value_is_refused(capsys):
    _one_line(capsys, ["train", CONFIG, "--set", "optim={lr: 1, lr: 2}"], "--set", "lr", "twice")


# ---- Ray cluster addresses: read before anything starts, reached in bounded time -------------


@pytest.mark.parametrize(
    "address, needle",
    [
        ("no such host", "has no port"),
        ("10.0.0.5", "has no port"),
        ("10.0.0.5:0", "port must be a number from 1 to 65535"),
        ("10.0.0.5:http", "port must be a number"),
        ("ray://10.0.0.5:10001", "Ray Client address"),
        ("http://10.0.0.5:6379", "has a scheme"),
        ("::1:6379", "IPv6 host in brackets"),
        ("[not-v6]:6379", "not an IPv6 address"),
        ("bad_host!:6379", "not a host name or IP address"),
    ],
)
@pytest.mark.parametrize("command", ["train", "speedup"])
def test_a_malformed_ray_address_is_refused_before_anything_starts(
    capsys, tmp_path, command, address, needle
):
    out = tmp_path / "out"
    argv = [command, CONFIG, "--backend", "ray", "--ray-address", address, "--out", str(out)]
    _one_line(capsys, argv, "--ray-address", needle)
    assert not out.exists()


def test_a_ray_address_in_the_config_is_checked_with_its_key(capsys, tmp_path):
    _one_line(capsys, ["train", CONFIG, "--set", "ray.address=somewhere"], "ray.address", "port")


# ---- found by trying: shapes, damaged checkpoints, links, --force across commands ----------

TUPLE_MODULE = """
from torch import nn


class Pair(nn.Module):
    def forward(self, x):
        return x, x


def tuple_out():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), Pair())


def tuple_mid():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), Pair(), nn.Linear(16, 10))
"""


@pytest.mark.parametrize("factory, stages", [("tuple_out", 1), ("tuple_mid", 3)])
def test_a_stage_that_returns_no_tensor_is_named(capsys, tmp_path, user_code, factory, stages):
    mod = user_code(TUPLE_MODULE)
    cfg = _factory_config(tmp_path, f"{mod}:{factory}", pipeline={"stages": stages})
    _one_line(capsys, ["train", cfg, "--out", str(tmp_path / "o")], "returns a tuple, not a tensor",
              "every stage must return one tensor")  # fmt: skip


SMALL = ["--set", "data.limit_train=128", "--set", "data.limit_test=64", "--epochs", "1"]


@pytest.mark.parametrize(
    "damage, needles",
    [
        (lambda st: st.update(metrics="junk"), ["its metrics are damaged"]),
        (lambda st: st["metrics"].update(bogus=1), ["its metrics are damaged"]),
        (lambda st: st["stages"][0].update(rng_state="junk"), ["stage 0's state is damaged"]),
        (lambda st: st["stages"][0].update(lr="x"), ["stage 0's state is damaged"]),
        (lambda st: st.update(epoch=-3), ["its epoch must be an integer >= 0"]),
    ],
    ids=["metrics-str", "metrics-key", "rng", "lr", "epoch"],
)
def test_a_damaged_checkpoint_is_refused_on_resume(capsys, tmp_path, damage, needles):
    import torch

    run = tmp_path / "run"
    assert main(["train", CONFIG, *SMALL, "--out", str(run)]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    damage(state)
    torch.save(state, run / "checkpoint.pt")
    capsys.readouterr()
    _one_line(capsys, ["train", "--resume", str(run), "--epochs", "2"], *needles)


def test_an_out_in_a_symlink_loop_is_one_line(capsys, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    _one_line(capsys, ["simulate", "--stages", "2", "--microbatches", "2", "--out",
                       str(tmp_path / "a")], "--out", "Symlink loop")  # fmt: skip
    _one_line(capsys, ["lsq", "--out", str(tmp_path / "a" / "sub")], "--out", "Symlink loop")


@pytest.mark.parametrize("value", ["0", "false", "No", "off", ""])
def test_debug_env_values_that_mean_off(capsys, tmp_path, user_code, monkeypatch, value):
    monkeypatch.setenv("AIMCPIPE_DEBUG", value)
    mod = user_code(USER_MODULE)
    _one_line(capsys, ["train", _factory_config(tmp_path, f"{mod}:build")], "broken factory")


def test_a_base_60_number_is_not_read_as_an_integer(capsys):
    """YAML 1.1 reads 1:30 as 90; here it stays a string and is refused where a number
    belongs."""
    _one_line(capsys, ["train", CONFIG, "--set", "pipeline.microbatches=1:30"],
              "pipeline.microbatches", "'1:30'")  # fmt: skip


def test_force_does_not_replace_another_commands_resumable_work(capsys, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    _one_line(capsys, ["train", CONFIG, "--out", str(sweep), "--force"], "speedup sweep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    _one_line(capsys, ["simulate", "--stages", "2", "--microbatches", "2", "--out", str(run),
                       "--force"], "train run")  # fmt: skip
    assert (sweep / "sweep.json").exists() and (run / "checkpoint.pt").exists()
