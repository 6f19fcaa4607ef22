"""``retrieval prepare``: images + captions (jsonl, csv, COCO json, img2dataset, Fashion-MNIST) → webdataset shards."""

from __future__ import annotations

import argparse

from pipelines.common import add_config_args, config_from_args
from retrieval.data.prepare import prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval prepare", description=__doc__)
    add_config_args(parser)
    args = parser.parse_args(argv)
    manifest = prepare(config_from_args(args))
    print(f"wrote {manifest.counts} samples to {config_from_args(args).data.shard_dir}")
    return 0
