"""``retrieval prepare``: images + captions (jsonl, csv, COCO json, img2dataset, Fashion-MNIST) → webdataset shards.

Webdataset shards that already exist (img2dataset's webdataset output included) need no preparing: point
``data.shards`` at them and train, evaluate, index and embed read them where they lie.
"""

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
    parser.add_argument("--workers", type=int, help="processes that verify and write the shards (default: "
                        "data.prepare_workers, else one per CPU up to 8)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    manifest = prepare(config, args.workers)
    print(f"wrote {manifest.counts} samples to {config.data.shard_dir}")
    if config.data.on_error == "skip":
        print(skipped_summary(manifest.skipped, Path(config.data.shard_dir) / SKIPPED))
    return 0
