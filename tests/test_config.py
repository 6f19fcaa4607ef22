"""Config: YAML → frozen dataclasses, --set overrides, one-line errors naming the field."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from retrieval.config import (
    Config,
    LossConfig,
    build_dataclass,
    check_ranges,
    config_from_dict,
    config_to_dict,
    load_config,
    ranged,
    save_config,
)
from retrieval.errors import ConfigError
from retrieval.train import fit
from tests.conftest import PROJECT_ROOT


def test_defaults_without_file():
    config = load_config()
    assert config == Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 3  # type: ignore[misc]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 1\nloss:\n  name: triplet\n")
    config = load_config(path, ["train.epochs=3", "loss.margin=2", "train.ks=[1, 3]", "text.vectors_path=null"])
    assert config.train.epochs == 3
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.loss == LossConfig("triplet", {"margin": 2.0}) and isinstance(config.loss.settings["margin"], float)
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
    config = load_config(None, ["train.epochs=9", "loss.negatives=far-random"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    offline = load_config(None, ["loss={name: triplet-offline, margin: 0.3, pool_size: 64, squared: true}"])
    save_config(offline, tmp_path / "offline.yaml")
    saved = yaml.safe_load((tmp_path / "offline.yaml").read_text())["loss"]
    # the settings sit beside the name
    assert saved == {"name": "triplet-offline", "margin": 0.3, "pool_size": 64, "squared": True}
    assert load_config(tmp_path / "offline.yaml") == offline
    assert config_from_dict(config_to_dict(offline)) == offline


def test_loss_settings_are_checked_when_the_config_is_loaded(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  name: quadruplet\n  margin: 0.8\n  second_margn: 0.2\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}.loss: loss 'quadruplet' has no setting 'second_margn'") and "\n" not in message
    assert "its settings: margin, second_margin, squared" in message
    path.write_text("loss:\n  name: quadruplet\n  margin: 0.8\n")
    assert load_config(path).loss == LossConfig("quadruplet", {"margin": 0.8})
    with pytest.raises(ConfigError, match=r"c\.yaml\.loss\.margin: must be >= 0"):
        load_config(path, ["loss={name: quadruplet, margin: -1}"])


def test_switching_the_loss_name_keeps_the_other_settings_and_checks_them():
    demo = PROJECT_ROOT / "configs" / "demo.yaml"  # loss: {name: triplet, margin: 0.4, negatives: farthest}
    mined = load_config(demo, ["loss.name=triplet-mined", "loss={name: triplet-mined, margin: 0.4}"])
    assert mined.loss == LossConfig("triplet-mined", {"margin": 0.4})
    contrastive = load_config(None, ["loss.margin=0.3", "loss.name=contrastive"])  # contrastive has a margin too
    assert contrastive.loss == LossConfig("contrastive", {"margin": 0.3})
    with pytest.raises(ConfigError) as error:
        load_config(demo, ["loss.name=sigmoid-ce"])
    message = str(error.value)
    assert "loss 'sigmoid-ce' has no setting 'margin', 'negatives'; its settings: none" in message
    assert "--set 'loss={name: sigmoid-ce, ...}' replaces the whole loss section" in message and "\n" not in message
    assert load_config(demo, ["loss={name: sigmoid-ce}"]).loss == LossConfig("sigmoid-ce", {})


@pytest.mark.parametrize("section, needle", [
    ({"name": "tripplet"}, "config.loss.name: unknown loss 'tripplet'; choose one of:"),
    ({"name": 3}, "config.loss.name: expected str"),
    ({"margin": "wide"}, "config.loss.margin: expected float"),
    ("triplet", "config.loss: expected a mapping"),
])
def test_bad_loss_sections_name_the_field(section, needle):
    with pytest.raises(ConfigError) as error:
        config_from_dict({"loss": section})
    assert str(error.value).startswith(needle) and "\n" not in str(error.value)


def test_every_shipped_config_loads_in_the_new_loss_format():
    for path in sorted((PROJECT_ROOT / "configs").glob("*.yaml")):
        if "compare" not in path.name:  # compare configs are checked in test_compare
            config = load_config(path)
            assert config_from_dict(config_to_dict(config)) == config


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
    with pytest.raises(ConfigError, match=r"c.yaml.data.source_options.limit_per_class: expected int"):
        load_config(path, ["data.source_options.limit_per_class=many"])
    with pytest.raises(ConfigError, match="data.source_options: JsonlSource are not the options of source 'coco'"):
        DataConfig(source="coco", source_options=JsonlSource())


def test_declared_ranges_are_checked_when_a_config_is_built(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Section:
        count: int = ranged(1, ge=1)
        share: float | None = ranged(None, gt=0.0, le=1.0)
        sizes: tuple[int, ...] = ranged((2,), ge=2)

    assert build_dataclass(Section, {"count": 1, "share": 1.0, "sizes": [2, 3]}, "s") == Section(1, 1.0, (2, 3))
    assert build_dataclass(Section, {"share": None}, "s").share is None  # an optional field may stay unset
    for values, message in [({"count": 0}, "s.count: must be at least 1, got 0"),
                            ({"share": 0}, "s.share: must be greater than 0.0 and at most 1.0, got 0.0"),
                            ({"sizes": [2, 1]}, "s.sizes[1]: must be at least 2, got 1")]:
        with pytest.raises(ConfigError) as error:
            build_dataclass(Section, values, "s")
        assert str(error.value) == message
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml\.train\.epochs: must be at least 1, got 0"):
        load_config(path)
    with pytest.raises(TypeError, match="unknown bound"):
        ranged(1, above=0)


def test_configs_made_in_code_are_checked_too():
    config = load_config()
    check_ranges(config)  # every default lies in its range
    bad = dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=0))
    with pytest.raises(ConfigError, match=r"^config\.train\.batch_size: must be at least 1, got 0$"):
        check_ranges(bad)
    with pytest.raises(ConfigError, match="train.batch_size"):
        fit(bad, progress=False)  # before any data is read
