"""``retrieval index``: embed the images of a shard split with a trained checkpoint into a faiss index."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.checkpoint import load_checkpoint
from retrieval.data import list_shards
from retrieval.indexing import build_index
from retrieval.runtime import resolve_device

from pipelines.common import checkpoint_path


def index_run(run_dir: Path, *, checkpoint: str = "best.pt", split: str | None = None, out: Path | None = None,
              kind: str | None = None, device: str = "auto") -> Path:
    """Build ``<run>/index`` from the run's shards with one of its checkpoints."""
    device = resolve_device(device)
    model = load_checkpoint(checkpoint_path(run_dir, checkpoint), device=device)
    split = split or model.config.index.split
    splits = ("train", "val") if split == "all" else (split,)
    shards = [shard for name in splits for shard in list_shards(model.config.data.shard_dir, name)]
    return build_index(model, shards, out or Path(run_dir) / "index", kind=kind or model.config.index.kind,
                       metric=model.config.index.metric, device=device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval index", description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    parser.add_argument("--checkpoint", default="best.pt", help="checkpoint name in <run>/checkpoints")
    parser.add_argument("--split", choices=("train", "val", "all"), help="shard split to index (default: config)")
    parser.add_argument("--kind", choices=("auto", "flat", "ivf", "hnsw"), help="index type (default: config)")
    parser.add_argument("--out", type=Path, help="index directory (default: <run>/index)")
    args = parser.parse_args(argv)
    out = index_run(args.run, checkpoint=args.checkpoint, split=args.split, out=args.out, kind=args.kind)
    print(f"index written to {out}")
    return 0
