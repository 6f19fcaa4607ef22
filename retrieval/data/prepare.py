"""Prepare a run's data: the configured source's records written as webdataset shards."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from retrieval.config import Config
from retrieval.data import write_shards
from retrieval.data.skips import SkippedItems
from retrieval.errors import DataError

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout, which holds the embedded sample data


def prepare(config: Config):
    """Write the shards the config's data section describes; returns the manifest.

    With ``data.on_error: skip`` bad items are passed over: ``manifest.skipped`` counts them by reason and
    ``skipped.jsonl`` beside the shards lists them.
    """
    data = config.data
    skipped = SkippedItems() if data.on_error == "skip" else None
    records = data.source_options.records(data.path, seed=data.split_seed, val_fraction=data.val_fraction,
                                          skipped=skipped)
    return write_shards(records, data.shard_dir, shard_size=data.shard_size, val_fraction=data.val_fraction,
                        split_seed=data.split_seed, split_by=data.split_by, source=f"{data.source}:{data.path}",
                        skipped=skipped)


def locate_data(config: Config) -> Config:
    """Use the embedded sample when the configured path is relative and absent from the working directory."""
    path = Path(config.data.path)
    if path.exists() or path.is_absolute():
        return config
    embedded = PROJECT_ROOT / path
    if not embedded.exists():
        raise DataError(f"data file {path} not found (nor {embedded})")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(embedded)))
