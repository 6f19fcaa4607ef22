"""``retrieval prepare``: images + captions (jsonl, csv, COCO json, img2dataset, Fashion-MNIST) → webdataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.common import add_config_args, config_from_args
from retrieval.data.prepare import prepare
from retrieval.data.shards import SKIPPED
from retrieval.data.skips import skipped_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval prepare", description=__doc__)
    add_config_args(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    manifest = prepare(config)
    print(f"wrote {manifest.counts} samples to {config.data.shard_dir}")
    if config.data.on_error == "skip":
        print(skipped_summary(manifest.skipped, Path(config.data.shard_dir) / SKIPPED))
    return 0
