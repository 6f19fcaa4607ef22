"""Prepare a run's data: the configured source's records written as webdataset shards."""

from __future__ import annotations

from retrieval.config import Config, DataConfig
from retrieval.data import open_source, write_shards
from retrieval.errors import ConfigError


def source_options(data: DataConfig) -> dict:
    """The keyword options of ``data.source`` (only the fashion-mnist kinds take any)."""
    if data.source == "fashion-mnist":
        if data.zero_shot_classes and data.split_by != "split":
            raise ConfigError("data.split_by must be 'split' with data.zero_shot_classes (they must stay out of train)")
        return {"limit_per_class": data.limit_per_class, "zero_shot_classes": data.zero_shot_classes,
                "seed": data.split_seed}
    if data.source == "fashion-mnist-scenes":
        if data.split_by != "split":
            raise ConfigError("data.split_by must be 'split' for fashion-mnist-scenes (val scenes use test items only)")
        return {"limit_per_class": data.limit_per_class, "scene_count": data.scene_count,
                "val_fraction": data.val_fraction, "seed": data.split_seed}
    return {}


def prepare(config: Config):
    """Write the shards the config's data section describes; returns the manifest."""
    data = config.data
    records = open_source(data.source, data.path, data.image_root, **source_options(data))
    return write_shards(records, data.shard_dir, shard_size=data.shard_size, val_fraction=data.val_fraction,
                        split_seed=data.split_seed, split_by=data.split_by, source=f"{data.source}:{data.path}")
