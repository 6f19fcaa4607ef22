"""Prepare a run's data: the configured source's records written as webdataset shards."""

from __future__ import annotations

from retrieval.config import Config
from retrieval.data import write_shards


def prepare(config: Config):
    """Write the shards the config's data section describes; returns the manifest."""
    data = config.data
    records = data.source_options.records(data.path, seed=data.split_seed, val_fraction=data.val_fraction)
    return write_shards(records, data.shard_dir, shard_size=data.shard_size, val_fraction=data.val_fraction,
                        split_seed=data.split_seed, split_by=data.split_by, source=f"{data.source}:{data.path}")
