"""``aimcpipe train``: the CLI contract of docs/design.md §6.

The run directory and its files, ``--json`` and the flags that override the config, one-line
errors with exit status 2 and no run directory, exact resume, and a user model by import path.
Everything runs in-process through ``aimcpipe.launch.cli.main`` on scikit-learn's digits.
"""

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from aimcpipe.analog.config import AnalogConfig
from aimcpipe.analog.convert import convert
from aimcpipe.launch.cli import main
from aimcpipe.launch.train import resolve_config
from aimcpipe.stages.zoo import build_model

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "configs" / "digits-analog.yaml")
QUICK = ["--no-progress", "--set", "data.limit_test=120"]

PER_STAGE = ("staleness", "peak_stash")


def cli(argv):
    """Exit status of ``aimcpipe ARGV`` in-process (argparse's own errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def run_cli(argv):
    """``cli(argv)`` with stdout and stderr captured (usable in module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli(argv)
    return rc, out.getvalue(), err.getvalue()


def train_argv(*extra, config=DIGITS):
    return ["train", config, *QUICK, *extra]


def load_model(path):
    return torch.load(path, weights_only=True)


def flat(state, prefix=""):
    """Every tensor of a state_dict, nested ``_extra_state`` dicts (tile RNG state) included."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Two epochs of the digits config with every flag set: 2 stages, sync-1f1b, --json."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    argv = train_argv(
        "--epochs",
        "2",
        "--stages",
        "2",
        "--policy",
        "sync-1f1b",
        "--set",
        "pipeline.microbatches=3",
        "--set",
        "analog.device.tau=0.8",
        "--json",
        "--out",
        str(out),
    )
    rc, stdout, stderr = run_cli(argv)
    assert rc == 0, stderr
    return out, stdout


# --- the run directory ----------------------------------------------------------------------


def test_run_directory_holds_every_file(digits_run):
    out, _ = digits_run
    names = {p.name for p in out.iterdir()}
    expected = {"config.yaml", "metrics.json", "history.jsonl", "trace.json", "model.pt"}
    expected |= {"partition.json", "checkpoint.pt"}
    assert expected <= names
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_json_has_the_design_keys_per_stage(digits_run):
    out, _ = digits_run
    m = json.loads((out / "metrics.json").read_text())
    assert (m["policy"], m["backend"], m["stages"], m["microbatches"]) == (
        "sync-1f1b",
        "local",
        2,
        3,
    )
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert math.isfinite(m["final"][key]), key
    assert 0 <= m["final"]["test_accuracy"] <= 1
    assert m["cycles"]["makespan"] > 0
    assert m["measured"]["wall_s"] > 0 and m["samples_per_s"] > 0
    for values in (m["cycles"]["utilization"], m["measured"]["utilization"]):
        assert len(values) == 2 and all(0 <= u <= 1 for u in values)
    for key in PER_STAGE:
        assert len(m[key]) == 2, key
    assert m["staleness"] == [0, 0]  # sync-1f1b flushes: no stale weights


def test_json_flag_prints_the_metrics_object(digits_run):
    out, stdout = digits_run
    assert json.loads(stdout) == json.loads((out / "metrics.json").read_text())


def test_history_has_one_line_per_epoch(digits_run):
    out, _ = digits_run
    lines = (out / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_trace_has_one_track_per_stage(digits_run):
    out, _ = digits_run
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    tracks = {e["tid"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    assert len(tracks) == 2
    assert {e["tid"] for e in events if e.get("ph") == "X"} == tracks


def test_partition_json_matches_the_stage_count(digits_run):
    out, _ = digits_run
    part = json.loads((out / "partition.json").read_text())
    assert part["num_stages"] == 2 and part["bounds"][-1] == len(part["block_names"])


def test_model_pt_has_the_models_state_dict_keys(digits_run):
    out, _ = digits_run
    cfg = resolve_config(out / "config.yaml")
    model = build_model(cfg.model.target, cfg.model.kwargs, seed=cfg.seed)
    model = convert(model, AnalogConfig.from_dict(cfg.analog))
    reference = model.state_dict()
    saved = load_model(out / "model.pt")
    assert set(saved) == set(reference)
    assert any(key.endswith("analog.tile.weight") for key in saved)
    reference, tensors = flat(reference), flat(saved)
    assert set(tensors) == set(reference)
    for key, tensor in reference.items():
        assert tensors[key].shape == tensor.shape, key
    model.load_state_dict(saved)  # and it loads back into the model


def test_config_yaml_is_resolved_and_records_the_flags(digits_run):
    out, _ = digits_run
    data = yaml.safe_load((out / "config.yaml").read_text())
    assert data["epochs"] == 2
    p = data["pipeline"]
    assert (p["stages"], p["policy"], p["microbatches"]) == (2, "sync-1f1b", 3)
    assert data["analog"]["device"]["tau"] == 0.8
    assert data["data"]["limit_test"] == 120
    assert resolve_config(out / "config.yaml").to_dict() == data


def test_rerunning_the_saved_config_reproduces_the_model(digits_run, tmp_path):
    out, _ = digits_run
    again = tmp_path / "again"
    rc, _, err = run_cli(["train", str(out / "config.yaml"), "--no-progress", "--out", str(again)])
    assert rc == 0, err
    first, second = flat(load_model(out / "model.pt")), flat(load_model(again / "model.pt"))
    assert set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_summary_lines_without_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(train_argv("--epochs", "1", "--policy", "wop", "--out", str(out))) == 0
    stdout = capsys.readouterr().out
    assert "wop on 4 stage(s), 1 epoch(s)" in stdout and "test accuracy" in stdout
    assert f"run directory: {out}" in stdout


def test_no_out_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(train_argv("--epochs", "1")) == 0
    assert list(tmp_path.iterdir()) == []
    assert "run directory" not in capsys.readouterr().out


def test_force_replaces_a_previous_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (out / "config.yaml").write_text("seed: 0\n")
    assert cli(train_argv("--epochs", "1", "--out", str(out), "--force")) == 2
    assert "'stale.txt', which aimcpipe did not write" in capsys.readouterr().err
    assert (out / "stale.txt").exists()
    (out / "stale.txt").unlink()
    (out / "checkpoint.pt").write_text("an earlier, interrupted run")
    assert cli(train_argv("--epochs", "1", "--out", str(out), "--force")) == 0
    assert (out / "metrics.json").is_file() and (out / "config.yaml").read_text() != "seed: 0\n"


# --- errors: one line, exit status 2, no run directory --------------------------------------

BAD_SETTINGS = [
    # (extra argv, words the one-line message must contain: the key and what is allowed)
    (["--set", "bogus=1"], ["bogus", "allowed keys", "pipeline"]),
    (["--set", "pipeline.microbatchez=3"], ["pipeline.microbatchez", "microbatches"]),
    (["--set", "epochs=abc"], ["epochs", "integer"]),
    (["--set", "pipeline.microbatches=0"], ["pipeline.microbatches", ">= 1"]),
    (["--policy", "foo"], ["--policy", "async"]),
    (["--stages", "two"], ["--stages", "int"]),
    (["--set", "pipeline.policy=foo"], ["pipeline.policy", "async"]),
    (["--set", "model.name=nope"], ["model.name", "digits-fcn"]),
    (
        ["--set", "model.name=null", "--set", "model.factory=tests.launch.nope:build"],
        ["model.factory", "tests.launch.nope"],
    ),
    (["--set", "model.name=null", "--set", "model.factory=nocolon"], ["model.factory", ":"]),
    (
        ["--set", "model.name=null", "--set", "model.factory=tests.launch.user_pkg:nope"],
        ["model.factory", "nope"],
    ),
    (["--stages", "9"], ["--stages", "4 blocks"]),
    (["--set", "pipeline.partition=[1,1]"], ["pipeline.partition", "4 stages"]),
    (["--set", "pipeline.partition=[1,1,1,2]"], ["pipeline.partition", "4 blocks"]),
    (["--set", "pipeline.partition=[fc2,fc9,fc4]"], ["pipeline.partition", "fc9", "fc1"]),
    (["--set", "data.name=mnist", "--set", "data.options={}"], ["data.root", "mnist"]),
    (["--set", "data.options.bogus=1"], ["data.options.bogus", "test_fraction"]),
    (["--set", "data.limit_train=5"], ["data", "mini-batch"]),
    (["--set", "model.kwargs.bogus=1"], ["model.kwargs.bogus", "hidden"]),
    (["--set", "model.analog_exclude=[nope]"], ["model.analog_exclude", "nope"]),
    (["--set", "foo"], ["--set", "key.path=value"]),
    (["--set", "pipeline.weight_stashing=true"], ["pipeline.weight_stashing", "async"]),
    (["--set", "analog.device.tau=-1"], ["analog.device.tau", "> 0"]),
    (["--set", "analog.rule=bogus"], ["analog.rule", "tiki-taka"]),
    (["--set", "optim.lr=0"], ["optim.lr", "> 0"]),
    (["--epochs", "0"], ["epochs", ">= 1"]),
    (["--backend", "mpi"], ["--backend", "torch", "ray"]),
    (["--set", "pipeline.backend=mpi"], ["pipeline.backend", "'torch'", "'ray'"]),
    (["--set", "runtime.threads=0"], ["runtime.threads", "integer > 0"]),
    (["--set", "runtime.threads=1.5"], ["runtime.threads", "integer"]),
    (["--set", "runtime.timeout_s=-1"], ["runtime.timeout_s", "> 0"]),
    (["--set", "runtime.dist_backend=mpi"], ["runtime.dist_backend", "'gloo'", "'nccl'"]),
    (["--set", "runtime.device=tpu"], ["runtime.device", "'cuda'"]),
    (["--set", "runtime.bogus=1"], ["runtime.bogus", "allowed keys", "timeout_s"]),
    (["--cycle-s", "0"], ["--cycle-s", "> 0"]),
    (["--cycle-s", "inf"], ["--cycle-s", "finite"]),
    (["--cycle-s", "abc"], ["--cycle-s", "not a number"]),
    (["--set", "device_time.cycles=1"], ["device_time.cycles", "cycle_s"]),
    (["--set", "ray.num_cpus=-1"], ["ray.num_cpus", ">= 0"]),
    (["--set", "ray.num_gpus=x"], ["ray.num_gpus", "number"]),
    (["--ray-address", ""], ["--ray-address", "cluster address"]),
    (["--set", "ray.address=3"], ["ray.address", "str"]),
    (
        ["--backend", "torch", "--policy", "gpipe", "--cycle-s", "10"],
        ["runtime.timeout_s", "--cycle-s 10", "waits 60 s"],
    ),
]


def assert_one_line_error(rc, stderr, words):
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("aimcpipe train: error: ")
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize(
    ("extra", "words"), BAD_SETTINGS, ids=[" ".join(e) for e, _ in BAD_SETTINGS]
)
def test_bad_settings_are_one_line_errors_and_leave_no_directory(tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    # wop keeps the weight_stashing case about the policy; the others do not depend on it
    policy = ["--policy", "sync-1f1b"] if "pipeline.weight_stashing=true" in extra else []
    rc = cli(train_argv(*policy, *extra, "--out", str(out)))
    captured = capsys.readouterr()
    assert_one_line_error(rc, captured.err, words)
    assert captured.out == ""
    assert not out.exists()


def test_error_from_a_real_process_is_one_line(tmp_path):
    """Out of process, with the CLI's own logging set up: still one line on stderr."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "aimcpipe", *train_argv("--stages", "9", "--out", str(out))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert_one_line_error(proc.returncode, proc.stderr, ["--stages", "4 blocks"])
    assert not out.exists()


def test_non_empty_out_needs_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = cli(train_argv("--out", str(out)))
    assert_one_line_error(rc, capsys.readouterr().err, ["--out", "--force"])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    rc, _, err = run_cli(train_argv("--epochs", "1", "--out", str(out)))
    assert rc == 0, err
    return out


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--set", "seed=3"], ["seed", "epochs"]),
        (["--policy", "wop"], ["--policy", "epochs"]),
        (["--stages", "2"], ["--stages", "epochs"]),
        (["--set", "optim.lr=0.5"], ["optim.lr", "checkpoint_every"]),
        (["--set", "runtime.threads=2"], ["runtime.threads", "pipeline.backend"]),
        (["--set", "runtime.device=cpu"], ["runtime.device", "device_time.cycle_s"]),
    ],
)
def test_resume_refuses_to_change_the_run(finished_run, capsys, extra, words):
    before = {p.name: p.read_bytes() for p in finished_run.iterdir()}
    rc = cli(["train", "--resume", str(finished_run), "--no-progress", *extra])
    assert_one_line_error(rc, capsys.readouterr().err, words)
    assert {p.name: p.read_bytes() for p in finished_run.iterdir()} == before


def test_resume_with_a_config_is_an_error(finished_run, capsys):
    rc = cli(["train", DIGITS, "--resume", str(finished_run), "--no-progress"])
    assert_one_line_error(rc, capsys.readouterr().err, ["--resume", "config.yaml"])


@pytest.mark.parametrize("kind", ["empty", "config-only", "missing"])
def test_resume_needs_a_checkpoint(finished_run, tmp_path, capsys, kind):
    run = tmp_path / "run"
    if kind != "missing":
        run.mkdir()
    if kind == "config-only":
        (run / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    rc = cli(["train", "--resume", str(run), "--no-progress"])
    assert_one_line_error(rc, capsys.readouterr().err, ["--resume", str(run)])
    if kind == "config-only":
        assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda c: c["analog"]["device"].update(tau=2.0), ["analog.device.tau", "2.0", "1.0"]),
        (lambda c: c["model"]["kwargs"].update(hidden=[64, 48, 16]), ["model.kwargs.hidden"]),
        (lambda c: c.update(seed=5), ["seed", "5"]),
    ],
)
def test_resume_refuses_an_edited_config_yaml(finished_run, tmp_path, capsys, edit, words):
    """config.yaml edited by hand after the run: a setting that changes the numbers differs
    from the one the checkpoint was written with."""
    run = _copy_run(finished_run, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    edit(cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    rc = cli(["train", "--resume", str(run), "--no-progress", "--set", "epochs=2"])
    assert_one_line_error(rc, capsys.readouterr().err, ["--resume", *words])
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_refuses_a_checkpoint_of_another_run(finished_run, tmp_path, capsys):
    other = tmp_path / "other"
    rc, _, err = run_cli(train_argv("--epochs", "1", "--set", "seed=7", "--out", str(other)))
    assert rc == 0, err
    run = _copy_run(finished_run, tmp_path / "run")
    (run / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    rc = cli(["train", "--resume", str(run), "--no-progress", "--set", "epochs=2"])
    assert_one_line_error(rc, capsys.readouterr().err, ["--resume", "seed"])


def test_a_checkpoint_of_another_model_is_refused_by_the_api(finished_run):
    """Pipeline.load_checkpoint checks the blocks and their shapes before anything changes."""
    from aimcpipe.errors import ConfigError
    from aimcpipe.runtime import Pipeline

    stages = yaml.safe_load((finished_run / "config.yaml").read_text())["pipeline"]["stages"]
    model = build_model("digits-fcn", {"hidden": [64, 48, 16], "activation": "tanh"})
    pipe = Pipeline(model, stages=stages, progress=False)
    with pytest.raises(ConfigError, match="another model"):
        pipe.load_checkpoint(finished_run)
    assert pipe.epoch == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickle"])
def test_a_damaged_checkpoint_is_one_line(finished_run, tmp_path, capsys, damage):
    run = _copy_run(finished_run, tmp_path / "run")
    ckpt = run / "checkpoint.pt"
    if damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    else:
        torch.save({"stages": [object()], "epoch": 1}, ckpt)  # needs arbitrary unpickling
    rc = cli(["train", "--resume", str(run), "--no-progress", "--set", "epochs=2"])
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, ["--resume", "checkpoint.pt", "not a readable"])
    assert "weights_only" not in err and "arbitrary code" not in err


def test_the_not_empty_error_suggests_resume_only_where_there_is_a_checkpoint(
    finished_run, tmp_path, capsys
):
    rc = cli(train_argv("--out", str(finished_run)))
    assert_one_line_error(rc, capsys.readouterr().err, ["--force", "--resume"])
    stopped = tmp_path / "stopped"  # stopped before its first checkpoint
    stopped.mkdir()
    (stopped / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    rc = cli(train_argv("--out", str(stopped)))
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, ["--force"])
    assert "--resume" not in err


# --- resume -----------------------------------------------------------------------------------


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, capsys):
    common = ["--set", "checkpoint_every=1", "--set", "data.limit_train=600"]
    short, full = tmp_path / "short", tmp_path / "full"
    assert cli(train_argv(*common, "--epochs", "2", "--out", str(short))) == 0
    assert cli(["train", "--resume", str(short), "--no-progress", "--set", "epochs=3"]) == 0
    assert cli(train_argv(*common, "--epochs", "3", "--out", str(full))) == 0
    capsys.readouterr()
    resumed, straight = flat(load_model(short / "model.pt")), flat(load_model(full / "model.pt"))
    assert set(resumed) == set(straight)
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    history = [json.loads(line) for line in (short / "history.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (full / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for got, want in zip(history, expected, strict=True):
        assert (got["train_loss"], got["test_loss"]) == (want["train_loss"], want["test_loss"])
    resumed_m = json.loads((short / "metrics.json").read_text())
    straight_m = json.loads((full / "metrics.json").read_text())
    assert resumed_m["final"] == straight_m["final"]
    assert resumed_m["epochs"] == 3
    assert yaml.safe_load((short / "config.yaml").read_text())["epochs"] == 3


# --- a user model by import path --------------------------------------------------------------


def test_user_factory_trains_from_the_cli(tmp_path, capsys):
    config = {
        "seed": 1,
        "epochs": 4,
        "model": {"factory": "tests.launch.user_pkg:build", "kwargs": {"hidden": 32}},
        "data": {"name": "digits"},
        "analog": {"rule": "analog-sgd", "device": {"kind": "soft-bounds", "tau": 1.0}},
        "pipeline": {"policy": "async", "stages": 2, "microbatches": 4, "microbatch_size": 8},
        "optim": {"lr": 0.1},
    }
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert cli(["train", str(path), "--no-progress", "--json", "--out", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["stages"] == 2 and metrics["policy"] == "async"
    assert metrics["final"]["test_accuracy"] > 0.5  # chance is 0.1: it learned
    saved = load_model(out / "model.pt")
    assert any(key.startswith("hidden.") for key in saved) and any(
        key.startswith("out.") for key in saved
    )


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["train", DIGITS, "--dry-run", "--stages", "2", "--policy", "sync-1f1b"]) == 0
    out = capsys.readouterr().out
    assert "partition: 2 stages" in out and "policy sync-1f1b" in out
    assert "cycles per epoch" in out and "staleness [0, 0]" in out
    assert list(tmp_path.iterdir()) == []
    assert cli(["train", DIGITS, "--dry-run", "--out", str(tmp_path / "x")]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_a_model_that_does_not_fit_the_data_fails_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv("--set", "model={name: lsq}", "--stages", "1", "--out", str(out))
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aimcpipe train: error: model: stage 0 (linear) cannot take the data")
    assert "\n" not in err
    assert not out.exists()


def test_a_measured_partition_is_kept_for_resume(tmp_path):
    out = tmp_path / "run"
    argv = train_argv("--stages", "2", "--set", "pipeline.partition=time", "--out", str(out))
    assert cli([*argv, "--epochs", "1"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())["pipeline"]["partition"]
    assert isinstance(saved, list) and sum(saved) == 4 and len(saved) == 2
    assert json.loads((out / "partition.json").read_text())["method"] == "time"
    assert cli(["train", "--resume", str(out), "--set", "epochs=2", "--no-progress"]) == 0


def test_an_interrupted_run_says_how_to_continue(tmp_path, capsys, monkeypatch):
    import aimcpipe.launch.train_cmd as train_cmd

    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "train", interrupted)
    assert cli(train_argv("--out", str(out))) == 130
    assert f"continue with: aimcpipe train --resume {out}" in capsys.readouterr().err


def test_the_ray_backend_without_ray_is_one_line_saying_how_to_install_it(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    rc = cli(train_argv("--backend", "ray", "--out", str(tmp_path / "run")))
    assert_one_line_error(rc, capsys.readouterr().err, ["--backend", "pip install"])
    assert not (tmp_path / "run").exists()


def test_cuda_where_there_is_none_is_one_line_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    rc = cli(train_argv("--set", "runtime.device=cuda", "--out", str(tmp_path / "run")))
    assert_one_line_error(rc, capsys.readouterr().err, ["runtime.device", "CUDA"])
    assert not (tmp_path / "run").exists()
