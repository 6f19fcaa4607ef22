"""Config: YAML → frozen dataclasses, --set overrides, one-line errors naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from retrieval.config import Config, load_config, save_config
from retrieval.errors import ConfigError


def test_defaults_without_file():
    config = load_config()
    assert config == Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 3  # type: ignore[misc]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 1\nloss:\n  name: triplet\n")
    config = load_config(path, ["train.epochs=3", "loss.params={k: 2}", "train.ks=[1, 3]", "text.vectors_path=null"])
    assert config.train.epochs == 3
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.loss.params == {"k": 2}
    assert config.train.ks == (1, 3)
    assert config.text.vectors_path is None


@pytest.mark.parametrize("override, field", [
    ("train.epochs=abc", "train.epochs"),
    ("train.nope=1", "nope"),
    ("nosection.x=1", "nosection"),
    ("train.epochs", "train.epochs"),
])
def test_bad_override_names_the_field(override, field):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    message = str(error.value)
    assert field in message and "\n" not in message


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["train.epochs=9", "loss.negatives=soft"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_source_options_are_typed_per_source_and_round_trip(tmp_path):
    from retrieval.config import DataConfig
    from retrieval.data import FashionMnistSource
    from retrieval.data.sources import CocoSource, Img2datasetSource, JsonlSource

    assert Config().data.source_options == JsonlSource()
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  source: fashion-mnist\n  split_by: split\n"
                    "  source_options: {limit_per_class: 3, zero_shot_classes: [bag]}\n")
    config = load_config(path, ["data.source_options.limit_per_class=4"])
    assert config.data.source_options == FashionMnistSource(limit_per_class=4, zero_shot_classes=("bag",))
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config
    assert "source_options:\n    limit_per_class: 4\n    zero_shot_classes:\n    - bag\n" in (
        tmp_path / "saved.yaml").read_text()  # only what differs from the source's defaults
    coco = load_config(None, ["data.source=coco", "data.source_options.image_root=val2017"])
    assert coco.data.source_options == CocoSource(image_root="val2017")
    assert load_config(None, ["data.source=img2dataset"]).data.source_options == Img2datasetSource()  # no mapping
    with pytest.raises(ConfigError, match="source 'img2dataset' takes no option image_root; valid: none"):
        load_config(None, ["data.source=img2dataset", "data.source_options.image_root=x"])
    with pytest.raises(ConfigError, match=r"data.source: unknown source kind 'parquet'; choose one of: coco, csv"):
        load_config(None, ["data.source=parquet"])
    with pytest.raises(ConfigError, match=r"c.yaml.data.source_options.limit_per_class: 'many' is not a valid int"):
        load_config(path, ["data.source_options.limit_per_class=many"])
    with pytest.raises(ConfigError, match="data.source_options: JsonlSource are not the options of source 'coco'"):
        DataConfig(source="coco", source_options=JsonlSource())
