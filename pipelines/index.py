"""``retrieval index``: embed the images of a shard split with a trained checkpoint into a faiss index."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.indexing import index_run
from retrieval.runtime import resolve_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval index", description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    parser.add_argument("--checkpoint", default="best.pt", help="checkpoint name in <run>/checkpoints")
    parser.add_argument("--split", choices=("train", "val", "all"), help="shard split to index (default: config)")
    parser.add_argument("--kind", choices=("auto", "flat", "ivf", "hnsw"), help="index type (default: config)")
    parser.add_argument("--out", type=Path, help="index directory (default: <run>/index)")
    parser.add_argument("--embeddings", type=Path, help="index this embedding folder of `retrieval embed` instead "
                        "of encoding the shards (--split does not apply)")
    args = parser.parse_args(argv)
    if args.embeddings is not None and args.split is not None:
        parser.error("--split chooses shards to encode; with --embeddings the folder's shards are indexed")
    out = index_run(args.run, checkpoint=args.checkpoint, split=args.split, out=args.out, kind=args.kind,
                    device=resolve_device("auto"), embeddings=args.embeddings)
    print(f"index written to {out}")
    return 0
