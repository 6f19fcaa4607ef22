"""``retrieval prepare``: images + captions (jsonl, csv, COCO json, img2dataset) → webdataset shards."""

from __future__ import annotations

import argparse

from retrieval.config import Config
from retrieval.data import open_source, write_shards

from pipelines.common import add_config_args, config_from_args


def prepare(config: Config):
    """Write the shards the config's data section describes; returns the manifest."""
    data = config.data
    records = open_source(data.source, data.path, data.image_root)
    return write_shards(records, data.shard_dir, shard_size=data.shard_size, val_fraction=data.val_fraction,
                        split_seed=data.split_seed, split_by=data.split_by, source=f"{data.source}:{data.path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval prepare", description=__doc__)
    add_config_args(parser)
    args = parser.parse_args(argv)
    manifest = prepare(config_from_args(args))
    print(f"wrote {manifest.counts} samples to {config_from_args(args).data.shard_dir}")
    return 0
