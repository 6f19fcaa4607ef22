"""Typed configuration: frozen dataclasses per section, loaded from YAML, ``--set a.b=v`` overrides.

Every run saves the resolved config beside its outputs, so a run can be reproduced exactly.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retrieval.errors import ConfigError
from retrieval.io import atomic_path

# declared ranges of numeric fields: metadata key → (test, words for the message)
_BOUNDS = {"ge": (operator.ge, "at least"), "gt": (operator.gt, "greater than"),
           "le": (operator.le, "at most"), "lt": (operator.lt, "less than")}


def ranged(default: Any, **bounds: float) -> Any:
    """A dataclass field whose value (each item, for a tuple) must satisfy ``bounds`` (``ge``, ``gt``, ``le``, ``lt``).

    The range is checked whenever a config is built from a file, a dict or ``--set`` (and by :func:`check_ranges`);
    ``None`` in an optional field is always allowed.
    """
    unknown = sorted(set(bounds) - set(_BOUNDS))
    if unknown:
        raise TypeError(f"unknown bound(s) {', '.join(unknown)}; use {', '.join(_BOUNDS)}")
    return field(default=default, metadata={"range": bounds})


def _check_range(spec: dataclasses.Field, value: Any, where: str) -> None:
    bounds = spec.metadata.get("range")
    if not bounds or value is None:
        return
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _check_range(spec, item, f"{where}[{i}]")
        return
    for name, bound in bounds.items():
        if not _BOUNDS[name][0](value, bound):
            limits = " and ".join(f"{_BOUNDS[n][1]} {b}" for n, b in bounds.items())
            raise ConfigError(f"{where}: must be {limits}, got {value!r}")


def check_ranges(instance: Any, where: str = "config") -> None:
    """Check every declared range of a dataclass instance and its nested dataclasses (one-line ConfigError).

    For configs made in code (``dataclasses.replace``), which never pass through the config builder.
    """
    for spec in dataclasses.fields(instance):
        value = getattr(instance, spec.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{where}.{spec.name}")
        else:
            _check_range(spec, value, f"{where}.{spec.name}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images and captions come from and how they become shards."""

    source: str = "jsonl"  # jsonl | csv | coco | img2dataset | fashion-mnist | fashion-mnist-scenes
    path: str = "data/coco-mini/captions.jsonl"
    image_root: str | None = None
    shard_dir: str = "runs/demo/shards"
    shard_size: int = ranged(1000, ge=1)
    split_by: str = "split"  # "hash", or a metadata field holding train/val
    val_fraction: float = ranged(0.2, ge=0.0, le=1.0)
    split_seed: int = 0
    image_size: int = ranged(224, ge=1)
    num_workers: int = ranged(0, ge=0)
    # fashion-mnist sources only (path: the IDX folder, or "default")
    limit_per_class: int | None = None  # at most this many items per class and split (seeded by split_seed)
    zero_shot_classes: tuple[str, ...] = ()  # fashion-mnist: classes kept out of training, val only
    scene_count: int = 20000  # fashion-mnist-scenes: scenes in all (val_fraction of them val)


@dataclass(frozen=True)
class TextConfig:
    """The frozen word vectors and how a caption becomes one vector."""

    vectors: str = "glove-6b-50d"  # glove-6b-50d | glove-text | word2vec-binary | word2vec-text | gensim | word2vec-captions | sentence-transformer
    vectors_path: str | None = None  # sentence-transformer: a local model folder (default: the packaged all-MiniLM-L6-v2)
    weighting: str = "mean"  # mean | tfidf
    normalize: bool = False
    word2vec_dim: int = 50
    word2vec_epochs: int = 40


@dataclass(frozen=True)
class ModelConfig:
    """Image encoder: a CNN backbone plus a projection into the word-vector space."""

    backbone: str = "efficientnet-lite0"
    weights: str = "default"  # default | random | path to a state dict
    freeze_backbone: bool = True
    projection: str = "linear"  # linear | mlp
    hidden_dim: int = ranged(512, ge=1)
    dropout: float = ranged(0.0, ge=0.0, lt=1.0)
    normalize_output: bool = False  # L2-normalise image embeddings (pair with text.normalize)


@dataclass(frozen=True)
class LossConfig:
    """The training loss: a registry name plus its keyword arguments."""

    name: str = "triplet"
    margin: float = 1.0
    squared: bool = False
    negatives: str = "hard"  # hard | soft | random
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule, evaluation and where the run is written."""

    run_dir: str = "runs/demo"
    epochs: int = ranged(60, ge=1)
    batch_size: int = ranged(32, ge=1)
    lr: float = ranged(1e-3, gt=0.0)
    weight_decay: float = ranged(1e-4, ge=0.0)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    cache_features: bool = True
    feature_cache_dir: str | None = None  # keep cached backbone features on disk, shared across runs
    captions_per_image: str = "all"  # all: every caption is a pair each epoch | one: one random caption
    eval_every: int = ranged(5, ge=1)
    ks: tuple[int, ...] = ranged((1, 5, 10), ge=1)
    shuffle_buffer: int = ranged(1000, ge=0)


@dataclass(frozen=True)
class IndexConfig:
    """The faiss index built over the collection's image embeddings."""

    kind: str = "auto"  # auto | flat | ivf | hnsw
    metric: str = "auto"  # auto (what the loss trained for) | l2 | ip
    split: str = "val"  # which shard split is indexed: train | val | all


@dataclass(frozen=True)
class Config:
    """The whole configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field's type annotation, converting lists to tuples and ints to floats.

    Nested dataclasses are built field by field (a class with a ``from_json`` classmethod reads itself).
    """
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        read = getattr(annotation, "from_json", None)
        return read(value, where) if read is not None else _build(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        if len(options) == 2 and type(None) in options:  # X | None: X's own error names the problem
            return _coerce(value, next(o for o in options if o is not type(None)), where)
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {annotation}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_rest) = typing.get_args(annotation)
        return origin(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        value_type = typing.get_args(annotation)[1] if typing.get_args(annotation) else Any
        return {k: _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    specs = {f.name: f for f in dataclasses.fields(cls)}
    known = set(specs)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    kwargs = {}
    for name, value in values.items():
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _coerce(value or {}, hints[name], path)
        else:
            kwargs[name] = _coerce(value, hints[name], path)
            _check_range(specs[name], kwargs[name], path)
    return cls(**kwargs)


def build_dataclass(cls: type, values: dict, where: str) -> Any:
    """Any dataclass from nested dicts, as configs are built: unknown or missing fields, wrong types and values
    outside a field's declared range are one-line ConfigErrors that name the field (``where.field[2].name``)."""
    return _build(cls, values, where)


def config_from_dict(values: dict, where: str = "config") -> Config:
    """Build a :class:`Config` from nested dicts, rejecting unknown fields and wrong types."""
    return _build(Config, values or {}, where)


def config_to_dict(config: Config) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.field=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Return a copy of the nested dict with each ``a.b=v`` override applied in order."""
    result = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return result


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    values: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        try:
            values = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"config file {file} is not valid YAML{line}") from None
    where = str(path) if path is not None else "config"
    base = config_to_dict(config_from_dict(values, where))
    return config_from_dict(apply_overrides(base, list(overrides)), where)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
