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


DEFAULT_SHARD_DIR = "runs/demo/shards"


@dataclass(frozen=True)
class DataConfig:
    """Where the images and captions come from and how they become shards.

    ``source_options`` are the chosen source's own settings (a ``SourceOptions`` dataclass of
    ``retrieval.data.SOURCES``, e.g. fashion-mnist's ``limit_per_class``); in YAML a mapping,
    checked against that source when the config is loaded. None means the source's defaults.
    """

    source: str = "jsonl"  # jsonl | csv | coco | img2dataset | fashion-mnist | fashion-mnist-scenes
    path: str = "data/coco-mini/captions.jsonl"
    source_options: Any = None  # the source's SourceOptions (a mapping in YAML)
    shard_dir: str = DEFAULT_SHARD_DIR  # shards written by `retrieval prepare` (with their manifest)
    # existing webdataset shards read in place instead (a folder, dir/{00000..00099}.tar, a glob; img2dataset
    # output included): nothing is prepared or copied, each sample's split follows split_by as prepare's would
    shards: str | None = None
    prepare_workers: int | None = ranged(None, ge=1)  # processes `retrieval prepare` writes with (None: CPUs, ≤ 8)
    shard_size: int = ranged(1000, ge=1)
    split_by: str = "split"  # "hash", or a metadata field holding train/val
    val_fraction: float = ranged(0.2, ge=0.0, le=1.0)
    split_seed: int = 0
    image_size: int = ranged(224, ge=1)
    num_workers: int = ranged(0, ge=0)
    on_error: str = "stop"  # stop: a bad item is a one-line error | skip: bad items are passed over and counted
    # where streamed training images are decoded and augmented: auto (the training GPU when training on
    # CUDA, else the loader) | cpu (the loader's workers) | cuda (the training GPU; refused without one)
    decode_device: str = "auto"

    def __post_init__(self) -> None:
        from retrieval.data.skips import ON_ERROR
        from retrieval.data.sources import make_source_options, source_type  # the data package loads torch
        from retrieval.transforms import check_decode_device

        if self.on_error not in ON_ERROR:
            raise ConfigError(f"data.on_error: must be {' or '.join(ON_ERROR)}, got {self.on_error!r}")
        check_decode_device(self.decode_device)
        if self.shards is not None and not str(self.shards).strip():
            raise ConfigError("data.shards: empty; give a shard folder or pattern, or leave it out")
        if self.shards is not None and self.shard_dir != DEFAULT_SHARD_DIR:
            raise ConfigError(f"data.shards ({self.shards}) reads shards in place and data.shard_dir "
                              f"({self.shard_dir}) names prepared ones; give one of them")

        options = self.source_options
        if options is None or isinstance(options, dict):
            options = make_source_options(self.source, options)
        elif type(options) is not source_type(self.source):
            raise ConfigError(f"data.source_options: {type(options).__name__} are not the options of "
                              f"source {self.source!r}")
        object.__setattr__(self, "source_options", options)
        options.check(self)


@dataclass(frozen=True)
class TextConfig:
    """The frozen word vectors and how a caption becomes one vector."""

    # glove-6b-50d | glove-text | word2vec-binary | word2vec-text | gensim | word2vec-captions | sentence-transformer
    vectors: str = "glove-6b-50d"
    # sentence-transformer: a local model folder (default: the packaged all-MiniLM-L6-v2)
    vectors_path: str | None = None
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
    """The training loss: a registry name plus that loss's own settings.

    In YAML the settings sit beside the name (``loss: {name: quadruplet, margin: 0.3}``); they are
    checked against the loss's signature when the config is loaded (see ``retrieval.losses``).
    ``settings`` holds what the config gave; the loss's defaults fill in the rest when it is built.
    """

    name: str = "triplet"
    settings: dict = field(default_factory=dict)


PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
CHANNELS_LAST = ("auto", True, False)


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
    # the optimiser side of a step (retrieval/optimization.py); the defaults are plain fp32 AdamW at train.lr
    precision: str = "fp32"  # fp32 | bf16 (autocast, CPU or CUDA) | fp16 (autocast and a gradient scaler; CUDA only)
    backbone_lr: float | None = ranged(None, gt=0.0)  # lr of a training backbone (None: train.lr)
    warmup_steps: int = ranged(0, ge=0)  # optimizer steps of linear warm-up from near 0 to the lr
    lr_schedule: str = "constant"  # constant | cosine (after warm-up, down to 0 at the run's last optimizer step)
    grad_clip_norm: float | None = ranged(None, gt=0.0)  # clip the total gradient norm to this (None: no clipping)
    grad_accumulation: int = ranged(1, ge=1)  # micro-batches per optimizer step
    channels_last: bool | str = "auto"  # auto (on CUDA when the backbone trains) | true | false
    checkpoint_every: int = ranged(1000, ge=0)  # optimizer steps between training states (0: epoch ends only)
    tensorboard: bool = False  # also write TensorBoard event files to <run_dir>/tensorboard (needs tensorboard)
    # the collapse alarm (retrieval/collapse.py): a one-line warning when, for collapse_patience epochs in a row,
    # a margin loss's active fraction stays under collapse_min_active or the embedding spread under
    # collapse_min_spread_ratio times its first epoch's
    collapse_patience: int = ranged(3, ge=1)
    collapse_min_active: float = ranged(0.05, ge=0.0, le=1.0)
    collapse_min_spread_ratio: float = ranged(0.1, ge=0.0, le=1.0)

    def __post_init__(self) -> None:
        for name, choices in (("precision", PRECISIONS), ("lr_schedule", LR_SCHEDULES),
                              ("channels_last", CHANNELS_LAST)):
            value = getattr(self, name)
            # true/false by identity: 1 or 0 is not a choice
            if not any(value is choice if isinstance(choice, bool) else value == choice for choice in choices):
                words = ", ".join(str(choice).lower() for choice in choices)
                raise ConfigError(f"train.{name}: must be one of {words}; got {value!r}")


@dataclass(frozen=True)
class IndexConfig:
    """The faiss index built over the collection's image embeddings.

    ``params`` is the kind's ``IndexKind`` (``retrieval.index.INDEX_KINDS``) with its build and
    search parameters; in YAML they sit beside ``kind`` (``index: {kind: ivf, nlist: 1024, nprobe: 32}``)
    and are checked against that kind when the config is loaded. None means the kind's defaults.
    """

    kind: str = "auto"  # auto | flat | ivf | ivf-pq | hnsw (auto: max_memory, min_recall, on_disk beside it)
    metric: str = "auto"  # auto (the loss's distance) | l2 | squared-l2 | cosine | ip
    split: str = "val"  # which shard split is indexed: train | val | all
    params: Any = None  # the kind's IndexKind (in YAML: its parameters beside kind)

    def __post_init__(self) -> None:
        from retrieval.index import index_kind_type, make_index_kind  # faiss only once an index config is built

        params = self.params
        if params is None or isinstance(params, dict):
            params = make_index_kind(self.kind, params)
        elif type(params) is not index_kind_type(self.kind, "index.kind"):
            raise ConfigError(f"index: {type(params).__name__} holds the parameters of another kind than {self.kind!r}")
        object.__setattr__(self, "params", params)


@dataclass(frozen=True)
class Config:
    """The whole configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self) -> None:
        if self.train.backbone_lr is not None and self.model.freeze_backbone:
            raise ConfigError("train.backbone_lr: set, but model.freeze_backbone is true, so no backbone trains; "
                              "set model.freeze_backbone=false or drop train.backbone_lr")
        if self.data.decode_device == "cuda" and self.model.freeze_backbone and self.train.cache_features:
            raise ConfigError("data.decode_device: 'cuda' decodes the images streamed for end-to-end training, but "
                              "this run trains on cached features (model.freeze_backbone and train.cache_features); "
                              "use auto or cpu")


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
        hint = _moved_option_hint(values, unknown) if cls is DataConfig else ""
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}{hint}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    kwargs = {}
    for name, value in values.items():
        path = f"{where}.{name}" if where else name
        if hints[name] is LossConfig:
            kwargs[name] = _loss_config(value or {}, path)
        elif hints[name] is IndexConfig:
            kwargs[name] = _index_config(value or {}, path)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _coerce(value or {}, hints[name], path)
        elif cls is DataConfig and name == "source_options":
            kwargs[name] = _source_options(values.get("source", DataConfig.source), value, path, f"{where}.source")
        else:
            kwargs[name] = _coerce(value, hints[name], path)
            _check_range(specs[name], kwargs[name], path)
    return cls(**kwargs)


def build_dataclass(cls: type, values: dict, where: str) -> Any:
    """Any dataclass from nested dicts, as configs are built: unknown or missing fields, wrong types and values
    outside a field's declared range are one-line ConfigErrors that name the field (``where.field[2].name``)."""
    return _build(cls, values, where)


def _loss_config(values: Any, where: str) -> LossConfig:
    """``{name: ..., <setting>: ...}`` → :class:`LossConfig`, each setting checked against the loss's signature."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{name: triplet, margin: 0.4}}, got {values!r}")
    settings = dict(values)
    name = _coerce(settings.pop("name", LossConfig.name), str, f"{where}.name")
    from retrieval.losses import check_loss_settings  # the loss registry (and torch) only once a config is read

    return LossConfig(name, check_loss_settings(name, settings, where=where, coerce=_coerce))


def _source_options(source: Any, values: Any, where: str, source_where: str) -> Any:
    """``data.source_options`` (a mapping) → the typed options of ``data.source``, each option type-checked."""
    from retrieval.data.sources import make_source_options, source_type

    source_type(source, source_where)
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of the source's options, got {values!r}")
    return make_source_options(source, values, where=where, coerce=_coerce)


def _index_config(values: Any, where: str) -> IndexConfig:
    """``{kind: ..., metric: ..., split: ..., <kind's parameters>}`` → :class:`IndexConfig`, parameters checked."""
    from retrieval.index import index_param_names, make_index_kind

    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{kind: ivf, nlist: 1024}}, got {values!r}")
    kind = _coerce(values.get("kind", IndexConfig.kind), str, f"{where}.kind")
    unknown = sorted(set(values) - set(_INDEX_FIELDS) - set(index_param_names(kind, f"{where}.kind")))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(_INDEX_FIELDS)} and "
                          f"the parameters of index kind {kind!r}: {', '.join(index_param_names(kind)) or 'none'}")
    general = {name: value for name, value in values.items() if name in _INDEX_FIELDS}
    params = {name: value for name, value in values.items() if name not in _INDEX_FIELDS}
    index = _build(IndexConfig, general, where)
    return dataclasses.replace(index, params=make_index_kind(kind, params, where=where, coerce=_coerce))


_INDEX_FIELDS = ("kind", "metric", "split")  # the rest of an index section: the kind's parameters


def _moved_option_hint(values: dict, unknown: list[str]) -> str:
    """A note for fields that are options of the chosen source (they belong under ``source_options``)."""
    from retrieval.data.sources import SOURCES, source_option_names

    source = values.get("source", DataConfig.source)
    if source not in SOURCES:
        return ""
    options = [name for name in unknown if name in source_option_names(source)]
    if not options:
        return ""
    return f" ({', '.join(options)}: options of source {source!r}, set under source_options)"


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

    values = plain(dataclasses.asdict(config))
    values["loss"] = {"name": config.loss.name, **plain(config.loss.settings)}  # settings beside the name
    values["data"]["source_options"] = plain(_set_options(config.data.source_options))
    del values["index"]["params"]
    values["index"].update(plain(_set_options(config.index.params)))  # beside kind
    return values


def _set_options(options: Any) -> dict:
    """The fields of a source's options (or an index kind's parameters) that differ from their defaults:
    switching ``data.source`` (``index.kind``) then drops no setting silently (a stale one is refused),
    and a saved config lists only what was chosen."""
    defaults = type(options)()
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if getattr(options, f.name) != getattr(defaults, f.name)}


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
    """Return a copy of the nested dict with each ``a.b=v`` override applied in order.

    ``a={...}`` replaces the whole section: ``loss={name: circle, m: 0.3}`` drops the previous
    loss's settings, where ``loss.name=circle`` keeps them (and they must then suit the new loss).
    """
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
