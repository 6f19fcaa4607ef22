"""Prepare a run's data: the configured source's records written as webdataset shards."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from retrieval.config import Config
from retrieval.data import write_shards
from retrieval.data.skips import SkippedItems
from retrieval.errors import ConfigError, DataError

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout, which holds the embedded sample data


MAX_AUTO_WORKERS = 8  # data.prepare_workers unset: one process per CPU, at most this many


def prepare_workers(config: Config, workers: int | None = None) -> int:
    """How many processes write the shards: ``workers`` (``--workers``), else ``data.prepare_workers``, else one per
    CPU this process may use, at most :data:`MAX_AUTO_WORKERS`."""
    chosen = workers if workers is not None else config.data.prepare_workers
    if chosen is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(cpus, MAX_AUTO_WORKERS))
    if not isinstance(chosen, int) or chosen < 1:
        raise ConfigError(f"--workers: must be at least 1, got {chosen!r}")
    return chosen


def prepare(config: Config, workers: int | None = None):
    """Write the shards the config's data section describes with ``prepare_workers(config, workers)`` processes;
    returns the manifest.

    With ``data.on_error: skip`` bad items are passed over: ``manifest.skipped`` counts them by reason and
    ``skipped.jsonl`` beside the shards lists them. A config that reads shards in place (``data.shards``)
    has nothing to prepare: refused.
    """
    data = config.data
    if data.shards:
        raise ConfigError(f"data.shards ({data.shards}) is read in place; there is nothing to prepare (train, "
                          "evaluate, index and embed read it directly)")
    skipped = SkippedItems() if data.on_error == "skip" else None
    records = data.source_options.records(data.path, seed=data.split_seed, val_fraction=data.val_fraction,
                                          skipped=skipped)
    return write_shards(records, data.shard_dir, shard_size=data.shard_size, val_fraction=data.val_fraction,
                        split_seed=data.split_seed, split_by=data.split_by, source=f"{data.source}:{data.path}",
                        skipped=skipped, workers=prepare_workers(config, workers))


def locate_data(config: Config) -> Config:
    """Use the embedded sample when the configured path is relative and absent from the working directory."""
    path = Path(config.data.path)
    if path.exists() or path.is_absolute():
        return config
    embedded = PROJECT_ROOT / path
    if not embedded.exists():
        raise DataError(f"data file {path} not found (nor {embedded})")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(embedded)))
