"""Forward+backward time of our losses against pytorch-metric-learning's, as ratios (ours / pml).

    python -m benchmarks.bench_losses [--batch 256] [--dim 50] [--threads 1] [--repeats 50]

Both sides get the same batch (images scattered around their own caption vectors so that about 4%
of triplets are semi-hard and 1% hard at margin 1, a mid-training state; identity labels; float32;
CPU) and are timed interleaved in one process, after a warm-up, as medians over repeats. Pairs:

- ``triplet`` (one word-space hard negative per image) vs pml ``TripletMarginLoss`` with
  ``BatchHardMiner`` on ``ref_emb``: also one triplet per image anchor;
- ``triplet-mined`` (semi-hard) vs pml ``TripletMarginLoss`` + ``TripletMarginMiner(semihard)``:
  the very same triplets;
- ``multi-similarity`` vs pml ``MultiSimilarityLoss`` + ``MultiSimilarityMiner`` (ours wraps them).

Writes a markdown table to stdout and JSON to ``benchmarks/results/losses.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_metric_learning
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import MultiSimilarityLoss, TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner, MultiSimilarityMiner, TripletMarginMiner

from retrieval.losses import create_loss
from retrieval.losses.miners import triplet_selection

RESULTS = Path(__file__).resolve().parent / "results" / "losses.json"
Step = Callable[[torch.Tensor], torch.Tensor]


def make_batch(batch: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caption vectors, image embeddings scattered around them, identity labels."""
    generator = torch.Generator().manual_seed(seed)
    captions = torch.randn(batch, dim, generator=generator)
    images = captions + 2.0 * torch.randn(batch, dim, generator=generator)
    return images, captions, torch.arange(batch)


def ours(name: str, captions: torch.Tensor, labels: torch.Tensor, **kwargs) -> Step:
    loss = create_loss(name, **kwargs)
    return lambda images: loss(images, captions, labels).value


def pml_triplet_batch_hard(captions: torch.Tensor, labels: torch.Tensor, margin: float) -> Step:
    distance = LpDistance(normalize_embeddings=False)
    miner, loss = BatchHardMiner(distance=distance), TripletMarginLoss(margin=margin, distance=distance)

    def step(images: torch.Tensor) -> torch.Tensor:
        ref_labels = labels.clone()  # a distinct tensor keeps the image-caption diagonal positive
        return loss(images, labels, miner(images, labels, captions, ref_labels), captions, ref_labels)

    return step


def pml_triplet_semihard(captions: torch.Tensor, labels: torch.Tensor, margin: float) -> Step:
    distance = LpDistance(normalize_embeddings=False)
    miner = TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=distance)
    loss = TripletMarginLoss(margin=margin, distance=distance)

    def step(images: torch.Tensor) -> torch.Tensor:
        ref_labels = labels.clone()
        return loss(images, labels, miner(images, labels, captions, ref_labels), captions, ref_labels)

    return step


def pml_multi_similarity(captions: torch.Tensor, labels: torch.Tensor) -> Step:
    miner, loss = MultiSimilarityMiner(epsilon=0.1), MultiSimilarityLoss(alpha=2, beta=50, base=0.5)

    def step(images: torch.Tensor) -> torch.Tensor:
        ref_labels = labels.clone()
        return loss(images, labels, miner(images, labels, captions, ref_labels), captions, ref_labels)

    return step


def time_pair(first: Step, second: Step, images: torch.Tensor, warmup: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of forward+backward for two steps, timed alternately."""
    times: tuple[list[float], list[float]] = ([], [])
    for round_ in range(warmup + repeats):
        for slot, step in enumerate((first, second)):
            leaf = images.clone().requires_grad_(True)
            start = time.perf_counter()
            step(leaf).backward()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[slot].append(elapsed * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def run(batch: int, dim: int, threads: int, warmup: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    images, captions, labels = make_batch(batch, dim)
    margin = 1.0
    cases = [
        ("triplet (hard) vs TripletMarginLoss+BatchHardMiner",
         ours("triplet", captions, labels, margin=margin), pml_triplet_batch_hard(captions, labels, margin)),
        ("triplet-mined (semihard) vs TripletMarginLoss+TripletMarginMiner",
         ours("triplet-mined", captions, labels, margin=margin, mining="semihard"),
         pml_triplet_semihard(captions, labels, margin)),
        ("multi-similarity vs MultiSimilarityLoss+Miner",
         ours("multi-similarity", captions, labels), pml_multi_similarity(captions, labels)),
    ]
    _, semihard = triplet_selection(torch.cdist(images, captions), labels, labels, margin, "semihard")
    rows = []
    for title, mine, theirs in cases:
        ours_ms, pml_ms = time_pair(mine, theirs, images, warmup, repeats)
        rows.append({"case": title, "ours_ms": ours_ms, "pml_ms": pml_ms, "ratio": ours_ms / pml_ms})
    return {
        "batch": batch, "dim": dim, "threads": threads, "warmup": warmup, "repeats": repeats,
        "device": "cpu", "torch": torch.__version__, "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "python": platform.python_version(), "semihard_triplets": int(semihard.sum()), "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"batch {result['batch']}, D={result['dim']}, CPU, {result['threads']} torch thread(s), "
        f"median of {result['repeats']} after {result['warmup']} warm-up; "
        f"{result['semihard_triplets']} semi-hard triplets in the batch",
        "",
        "| case | ours (ms) | pml (ms) | ours / pml |",
        "|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['case']} | {row['ours_ms']:.2f} | {row['pml_ms']:.2f} | {row['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.batch, args.dim, args.threads, args.warmup, args.repeats)
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
