"""Typed configs: one source of defaults, YAML and dotted overrides on top, errors that name the field."""

import pytest
import yaml

from trainers.config import TrainConfig, load_train_config, save_config
from trainers.config_base import ConfigError, parse_overrides


def test_defaults_come_from_the_typed_config():
    cfg = load_train_config()
    assert cfg == TrainConfig()
    assert cfg.guidance.method == "asd" and cfg.guidance.eta == 0.1


def test_yaml_then_dotted_overrides_with_yaml_typed_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"prompt": "a blue sphere", "guidance": {"eta": 0.3, "cfg_scale": 10}}))
    cfg = load_train_config(path, ["guidance.eta=0.2", "camera.elevation_range=[0, 30]", "max_steps=7"])
    assert cfg.prompt == "a blue sphere"
    assert cfg.guidance.eta == 0.2 and cfg.guidance.cfg_scale == 10
    assert tuple(cfg.camera.elevation_range) == (0, 30)
    assert cfg.max_steps == 7


def test_mapping_overrides_are_accepted_for_orchestrators():
    cfg = load_train_config({"prompt": "x"}, {"guidance.t_min": 0.1, "optimizer.lr_network": 0.01})
    assert cfg.guidance.t_min == 0.1 and cfg.optimizer.lr_network == 0.01


def test_unknown_key_names_the_key_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"'guidance\.etaa'.*did you mean 'guidance\.eta'"):
        load_train_config(None, ["guidance.etaa=0.2"])
    with pytest.raises(ConfigError, match=r"did you mean 'max_steps'"):
        load_train_config({"max_step": 3})


def test_wrong_type_names_the_dotted_field():
    with pytest.raises(ConfigError, match=r"guidance\.cfg_scale"):
        load_train_config(None, ["guidance.cfg_scale=lots"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("prompt=''", "prompt"),
        ("guidance.t_min=0.99", "t_min"),
        ("guidance.eta=-1", "eta"),
        ("guidance.cfg_scale=-2", "cfg_scale"),
        ("resolution=33", "resolution"),
        ("max_steps=0", "max_steps"),
    ],
)
def test_bad_values_are_refused_before_any_work(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_train_config(None, [override])


def test_malformed_override_says_how_to_write_one():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["guidance.eta"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_train_config(None, ["prompt=a green torus", "guidance.t_max=[0.98, 0.5, 0, 100]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_train_config(tmp_path / "c.yaml") == cfg
