"""``retrieval embed``: encode a run's shards into embedding shards (img_emb/*.npy + metadata/*.parquet).

Under ``torchrun --nproc_per_node N -m pipelines.cli embed ...`` each of the N processes encodes every
N-th shard; alone it encodes them all. A rerun skips the shards already done, so a stopped run resumes.
Under torchrun write ``--run-dir`` (torchrun's own parser takes ``--run`` for its ``--run-path``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from retrieval.checkpoint import load_checkpoint
from retrieval.data import list_shards
from retrieval.data.pipeline import error_handler
from retrieval.data.skips import SkippedItems
from retrieval.distributed import join_process_group, leave_process_group
from retrieval.embedding_shards import DTYPES, embed_shards
from retrieval.rundir import BEST_CHECKPOINT, RunDir
from retrieval.runtime import resolve_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval embed", description=__doc__)
    parser.add_argument("--run", "--run-dir", dest="run", type=Path, default=Path("runs/demo"),
                        help="run directory (default: runs/demo)")
    parser.add_argument("--checkpoint", default=BEST_CHECKPOINT, help="checkpoint name in <run>/checkpoints")
    parser.add_argument("--split", choices=("train", "val", "all"), help="shard split to encode (default: the "
                        "run's index.split)")
    parser.add_argument("--out", type=Path, help="embedding folder (default: <run>/embeddings)")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="stored embedding type (default float16)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--workers", type=int, help="loader processes that decode images (default: the run's "
                        "data.num_workers)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: the local rank's GPU)")
    parser.add_argument("--no-thumbnails", action="store_true", help="write no thumbnail tars")
    parser.add_argument("--overwrite", action="store_true", help="remove what the --out folder holds first")
    args = parser.parse_args(argv)
    place, device = join_process_group(resolve_device(args.device, "--device"))
    try:
        run = RunDir(args.run)
        model = load_checkpoint(run.checkpoint(args.checkpoint), device=device)
        split = args.split or model.config.index.split
        shards = list_shards(model.config.data, split)
        out = args.out or run.embeddings
        if args.overwrite and place.is_main and out.exists():
            shutil.rmtree(out)
        place.barrier()
        skipped = SkippedItems(warn=True) if model.config.data.on_error == "skip" else None
        workers = model.config.data.num_workers if args.workers is None else args.workers
        result = embed_shards(model, shards, out, place=place, dtype=args.dtype, batch_size=args.batch_size,
                              device=device, workers=workers, thumbnails=not args.no_thumbnails,
                              handler=error_handler(skipped))
    finally:
        leave_process_group()
    if place.is_main:
        print(f"embeddings of {len(result.names)} shards in {result.out} (this process encoded "
              f"{len(result.encoded)} shards, {result.images} images; {len(result.already_done)} already done)")
    return 0
