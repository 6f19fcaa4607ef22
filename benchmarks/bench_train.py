"""Training-loop overhead: our ``Trainer`` epoch vs a bare PyTorch loop doing the same work.

Both run the demo's cached-feature path (linear projection + text-anchored triplet loss with hard
negatives) over identical batches; the ratio ours / bare is the cost of the library's loop
(loss registry, logging signals, label handling). Run: ``python -m benchmarks.bench_train``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from retrieval.config import load_config
from retrieval.io import write_json
from retrieval.runtime import seed_everything
from retrieval.train import Trainer

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def bare_epoch(features, vectors, owner, projection, optimizer, margin, batch_size, generator) -> None:
    """The same epoch written as a plain loop: permute pairs, project, hard negative, hinge, step."""
    order = torch.randperm(len(owner), generator=generator)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        images, targets = owner[chosen], vectors[chosen]
        outputs = F.normalize(projection(features[images]), dim=1)
        text_distances = torch.cdist(targets, targets).masked_fill(images[:, None] == images[None, :], -1.0)
        negatives = targets[text_distances.argmax(dim=1)]
        loss = torch.relu(margin + (outputs - targets).norm(dim=1) - (outputs - negatives).norm(dim=1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30, help="timed epochs per side")
    parser.add_argument("--repeat", type=int, default=4, help="pairs of image–caption copies (bigger epochs)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "train.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seed_everything(0)
    config = load_config(PROJECT_ROOT / "configs" / "demo.yaml", [
        f"data.path={PROJECT_ROOT / 'data/coco-mini/captions.jsonl'}", "train.run_dir=runs/bench-train",
        "data.shard_dir=runs/demo/shards"])
    trainer = Trainer(config, progress=False)
    # a larger epoch: every pair repeated, so per-batch costs dominate start-up costs
    targets = trainer.targets
    targets.owner, targets.vectors = targets.owner.repeat(args.repeat), targets.vectors.repeat(args.repeat, 1)
    projection = torch.nn.Linear(trainer.encoder.feature_dim, trainer.caption_encoder.dim)
    optimizer = torch.optim.AdamW(projection.parameters(), lr=config.train.lr)
    generator = torch.Generator().manual_seed(0)
    ours, bare = [], []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        trainer.train_epoch(epoch)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        bare_epoch(trainer.source.train_set.vectors, targets.vectors, targets.owner, projection, optimizer,
                   trainer.loss.margin, config.train.batch_size, generator)
        bare.append(time.perf_counter() - start)
    ours_ms, bare_ms = statistics.median(ours[2:]) * 1e3, statistics.median(bare[2:]) * 1e3
    result = {"pairs_per_epoch": len(targets.owner), "batch_size": config.train.batch_size,
              "epochs_timed": args.epochs - 2, "ours_ms_per_epoch": round(ours_ms, 3),
              "bare_ms_per_epoch": round(bare_ms, 3), "ratio_ours_over_bare": round(ours_ms / bare_ms, 3)}
    print("| loop | ms / epoch | ratio |\n|---|---:|---:|")
    print(f"| bare PyTorch | {bare_ms:.2f} | 1.00 |\n| retrieval Trainer | {ours_ms:.2f} | {ours_ms / bare_ms:.2f} |")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
