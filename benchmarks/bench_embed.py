"""``retrieval embed``'s encoding throughput against a bare model forward over the same decoded batches.

A collection of ``--copies`` × the 51 photos of ``data/coco-mini`` (COCO JPEGs, about 640 × 480; each copy
under its own keys) is written as shards of ``--shard-size``. A checkpoint of the demo model (frozen
ImageNet EfficientNet-Lite0, linear projection, 224 px) is trained for one epoch on the sample itself.
Then, alternating ``--rounds`` times:

(a) bare forward: every image decoded and eval-transformed beforehand into batches held in memory, then
    only ``model.embed_images`` over those batches (on ``--device``);
(b) ``embed_shards`` (what ``retrieval embed`` runs, one process): shards → decoded, transformed batches in
    ``--workers`` loader processes → the same forward → float16 .npy + metadata parquet + thumbnail tars,
    written atomically with their done-markers; a fresh output folder each round.

The ratio (b) ÷ (a) of the best round of each is the figure the issue asks for (target ≥ 0.9).

Run: ``python -m benchmarks.bench_embed`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from retrieval.checkpoint import load_checkpoint
from retrieval.config import load_config
from retrieval.data import iter_samples, list_shards, records_from_jsonl, write_shards
from retrieval.data.prepare import prepare
from retrieval.embedding_shards import embed_shards
from retrieval.io import write_json
from retrieval.runtime import resolve_device
from retrieval.train import fit
from retrieval.transforms import eval_transform

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = PROJECT_ROOT / "data" / "coco-mini" / "captions.jsonl"


def copied_records(copies: int):
    """The sample's records ``copies`` times, each copy under keys of its own."""
    for copy in range(copies):
        for record in records_from_jsonl(CAPTIONS):
            yield dataclasses.replace(record, key=f"{record.key}_c{copy:04d}")


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def decoded_batches(model, shards: list[str], batch_size: int) -> list[torch.Tensor]:
    """Every image of ``shards`` decoded and eval-transformed, in batches of ``batch_size`` (per shard, as embed)."""
    transform = eval_transform(model.config.data.image_size, model.encoder.mean, model.encoder.std)
    batches = []
    for shard in shards:
        images = [transform(sample.image) for sample in iter_samples([shard])]
        batches += [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return batches


@torch.no_grad()
def forward_rate(model, batches: list[torch.Tensor], device: str) -> float:
    """Images per second of ``model.embed_images`` alone over batches already decoded (copied to the device)."""
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        model.embed_images(batch.to(device, non_blocking=True)).float().cpu()
    synchronize(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def embed_rate(model, shards: list[str], out: Path, device: str, batch_size: int, workers: int) -> float:
    """Images per second of ``embed_shards`` over ``shards`` into a fresh folder ``out``."""
    synchronize(device)
    start = time.perf_counter()
    result = embed_shards(model, shards, out, dtype="float16", batch_size=batch_size, device=device,
                          workers=workers, progress=False)
    synchronize(device)
    return result.images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=10, help="copies of the 51 sample photos (default 10)")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="loader processes of embed (default 1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "embed.json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device, "--device")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        config = load_config(PROJECT_ROOT / "configs" / "demo.yaml", [
            f"data.path={CAPTIONS}", f"data.shard_dir={root / 'sample'}", f"train.run_dir={root / 'run'}",
            "train.epochs=1", "train.eval_every=1", f"train.device={device}"])
        prepare(config)
        model = load_checkpoint(fit(config, progress=False).best_checkpoint, device=device)
        write_shards(copied_records(args.copies), root / "shards", shard_size=args.shard_size, val_fraction=0.0,
                     split_by="hash", progress=False)
        shards = list_shards(root / "shards", "train")
        batches = decoded_batches(model, shards, args.batch_size)
        images = sum(len(b) for b in batches)
        forward_rate(model, batches[:1], device)  # warm-up
        forward, embed = [], []
        for round_ in range(args.rounds):
            forward.append(forward_rate(model, batches, device))
            embed.append(embed_rate(model, shards, root / f"emb{round_}", device, args.batch_size, args.workers))
    ratio = max(embed) / max(forward)
    result = {
        "images": images, "shards": len(shards), "batch_size": args.batch_size, "workers": args.workers,
        "device": device, "torch_threads": torch.get_num_threads(), "image_size": config.data.image_size,
        "backbone": config.model.backbone, "rounds": args.rounds,
        "bare_forward_images_per_s": [round(x, 1) for x in forward],
        "embed_images_per_s": [round(x, 1) for x in embed],
        "embed_over_bare_forward": round(ratio, 3), "target": 0.9,
        "command": "python -m benchmarks.bench_embed",
    }
    print(f"{images} images in {len(shards)} shards, batch {args.batch_size}, {args.workers} loader worker(s), "
          f"{device}, {torch.get_num_threads()} torch threads")
    print(f"bare forward: {', '.join(f'{x:.1f}' for x in forward)} images/s; retrieval embed: "
          f"{', '.join(f'{x:.1f}' for x in embed)} images/s; ratio {ratio:.3f}")
    write_json(args.out, result)
    print(json.dumps({"written": str(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
