"""Bad analog configuration fails at construction, naming the parameter."""

import pytest

from aimcpipe.analog import AnalogConfig, AnalogLinear, DeviceConfig, TikiTakaConfig, UpdateConfig
from aimcpipe.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": -1.0}, "tau"),
        ({"tau": 0.0}, "tau"),
        ({"dw_min": 0.0}, "dw_min"),
        ({"dw_min": -0.1}, "dw_min"),
        ({"w_min": 0.1, "w_max": 1.0}, "w_min/w_max"),
        ({"w_min": -1.0, "w_max": -0.5}, "w_min/w_max"),
        ({"kind": "memristor"}, "unknown device 'memristor'"),
        ({"up_down": 1.5}, "up_down"),
        ({"dw_min_dtod": -0.1}, "dw_min_dtod"),
        ({"write_noise_std": float("nan")}, "write_noise_std"),
        ({"tau": 1.0, "w_max": 3.0}, "tau: set either tau or w_max/w_min"),
    ],
)
def test_bad_device_parameters(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DeviceConfig(**kwargs)


def test_other_bad_parameters():
    with pytest.raises(ConfigError, match="desired_bl"):
        UpdateConfig(desired_bl=0)
    with pytest.raises(ConfigError, match="mode"):
        UpdateConfig(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="transfer_every"):
        TikiTakaConfig(transfer_every=0)
    with pytest.raises(ConfigError, match="transfer_every"):
        TikiTakaConfig(transfer_every=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="transfer_columns"):
        TikiTakaConfig(transfer_columns=True)
    with pytest.raises(ConfigError, match="rule"):
        AnalogConfig(rule="adam")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DeviceConfig(tau="1"), "tau: expected a number or null, got '1'"),
        (lambda: DeviceConfig(tau=True), "tau: expected a number or null, got True"),
        (lambda: DeviceConfig(dw_min="x"), "dw_min: expected a number, got 'x'"),
        (lambda: AnalogConfig(device={"tau": "a"}), "device.tau: expected a number"),
        (lambda: AnalogConfig(device=3), "device: expected a mapping or a DeviceConfig"),
        (lambda: AnalogConfig(update="pulsed"), "update: expected a mapping or an UpdateConfig"),
        (lambda: TikiTakaConfig(transfer_lr="big"), "transfer_lr"),
    ],
)
def test_wrong_types_are_refused_by_name(build, message):
    """The Python API is as strict as a config file: a string where a number belongs, a
    bool where a float belongs, a scalar where a section belongs are refused at once."""
    with pytest.raises(ConfigError, match=message):
        build()


def test_mappings_become_sections():
    config = AnalogConfig(device={"tau": 0.5}, update={"desired_bl": 10})
    assert isinstance(config.device, DeviceConfig) and config.device.w_max == 0.5
    assert isinstance(config.update, UpdateConfig) and config.update.desired_bl == 10


def test_tau_sets_symmetric_bounds():
    cfg = DeviceConfig(tau=2.0)
    assert (cfg.w_min, cfg.w_max) == (-2.0, 2.0)


def test_from_dict_names_the_key_path():
    cfg = AnalogConfig.from_dict(
        {"rule": "tiki-taka", "device": {"tau": 1.5}, "io": "paper", "update": {"mode": "pulsed"}}
    )
    assert cfg.device.w_max == 1.5 and cfg.forward.out_noise == 0.005
    assert cfg.backward == cfg.forward and cfg.update.mode == "pulsed"
    with pytest.raises(ConfigError, match=r"^analog\.device\.tua: unknown key; allowed keys: "):
        AnalogConfig.from_dict({"device": {"tua": 1.0}})
    with pytest.raises(ConfigError, match=r"^analog\.device\.tau: must be a finite number > 0"):
        AnalogConfig.from_dict({"device": {"tau": -2}})
    with pytest.raises(ConfigError, match=r"^analog\.device\.dw_min: expected a number"):
        AnalogConfig.from_dict({"device": {"dw_min": "small"}})
    with pytest.raises(ConfigError, match=r"^analog\.forward: .*unknown 'noisy'"):
        AnalogConfig.from_dict({"forward": "noisy"})
    with pytest.raises(ConfigError, match=r"^analog\.rule: 'sgd' is not allowed"):
        AnalogConfig.from_dict({"rule": "sgd"})
    assert AnalogConfig.from_dict(cfg.to_dict()) == cfg


def test_grouped_convolution_is_refused():
    import torch

    from aimcpipe.analog import convert

    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match=r"^0: grouped convolution"):
        convert(model)
    with pytest.raises(ConfigError, match="exclude: no layer named 'nope'"):
        convert(model, exclude=["nope"])
    assert isinstance(convert(model, exclude=["0"])[0], torch.nn.Conv2d)
    with pytest.raises(ConfigError, match=r"^0: padding: 'same' is not supported"):
        convert(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding="same")))
    assert AnalogLinear(3, 2).weight.shape == (2, 3)
