"""Config: YAML → frozen dataclasses, --set overrides, one-line errors naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from retrieval.config import Config, build_dataclass, check_ranges, load_config, ranged, save_config
from retrieval.errors import ConfigError
from retrieval.train import fit


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
