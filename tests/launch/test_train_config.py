"""The train config schema: YAML reading, --set overrides, validation messages."""

from __future__ import annotations

import pytest

from aimcpipe.errors import ConfigError
from aimcpipe.launch.train_config import (
    TrainConfig,
    apply_overrides,
    load_config,
    parse_overrides,
)


def test_exponent_numbers_are_floats_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: lsq}\noptim: {lr: 1e-3}\n")
    data = load_config(path)
    assert data["optim"]["lr"] == 0.001
    apply_overrides(data, parse_overrides(["optim.lr=3E-2", "epochs=7", "data.name=lsq"]))
    cfg = TrainConfig.from_dict(data)
    assert (cfg.optim.lr, cfg.epochs, cfg.data.name) == (0.03, 7, "lsq")


def test_yaml_objects_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_overrides_create_and_replace_nested_keys():
    data = {"model": {"name": "fcn"}}
    apply_overrides(data, parse_overrides(["pipeline.partition=[fc2, fc3]", "analog=null"]))
    assert data["pipeline"]["partition"] == ["fc2", "fc3"] and data["analog"] is None
    with pytest.raises(ConfigError, match=r"model\.name is .fcn., not a mapping"):
        apply_overrides(data, parse_overrides(["model.name.x=1"]))
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        parse_overrides(["epochs"])


def test_resolved_config_round_trips():
    cfg = TrainConfig.from_dict(
        {"model": {"name": "digits-fcn"}, "analog": {"rule": "tiki-taka", "forward": "paper"}}
    )
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.analog_config() == cfg.analog_config()
    assert again.to_dict() == cfg.to_dict()
    assert cfg.to_dict()["analog"]["forward"]["out_noise"] == 0.005  # the preset is expanded
