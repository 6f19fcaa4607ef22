"""Image loading for end-to-end fine-tuning: decode + augmentation per core, and the loader against a train step.

On the photos of ``data/coco-mini`` (COCO JPEGs, about 640 × 480) at 224 px with RandomResizedCrop:

(a) decoded + augmented images per second on one core (``torch.set_num_threads(1)``): the PIL path the
    library used before (``Image.open().convert("RGB")`` + torchvision's PIL transforms) against the
    torchvision path (``torchvision.io`` decode + seeded crop/flip on uint8 tensors); rounds alternate and
    the medians are compared. Also: decode alone, augmentation alone, and the CPU work left per image when
    the batch is decoded on the training GPU (the header check of ``data.decode_device: cuda``).
(b) the real loader (``make_train_pipeline`` + ``make_loader``: shards → decoded, augmented, batched tensors
    with caption vectors), single process on one core, against train steps of resnet18 (random weights) on
    in-memory tensors of the same size and batch, on every core the machine gives torch.

Run: ``python -m benchmarks.bench_loader`` (a minute or two on 2 cores).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from retrieval.data import list_shards, make_loader, make_train_pipeline, records_from_jsonl, write_shards
from retrieval.data.images import decode_image_bytes
from retrieval.data.pipeline import EpochSeed, encoded_image
from retrieval.io import write_json
from retrieval.models import create_backbone
from retrieval.transforms import train_transform

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = PROJECT_ROOT / "data" / "coco-mini" / "captions.jsonl"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pil_transform(size: int) -> Callable:
    """The training transform as it was: PIL images, torch's global generator."""
    return T.Compose([T.RandomResizedCrop(size, scale=(0.6, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def pil_decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def rate(work: Callable[[object], object], items: list) -> float:
    """Items per second of one pass of ``work`` over ``items``."""
    start = time.perf_counter()
    for item in items:
        work(item)
    return len(items) / (time.perf_counter() - start)


def per_core(photos: list[bytes], size: int, rounds: int) -> dict:
    """(a): medians over alternating rounds, images/s on one thread."""
    old, new = pil_transform(size), train_transform(size, MEAN, STD)
    keys = [EpochSeed(0, 0).sample_seed(str(i)) for i in range(len(photos))]
    seeded = list(zip(photos, keys))
    decoded_pil, decoded_tensor = [pil_decode(d) for d in photos], [decode_image_bytes(d) for d in photos]
    tensor_pairs = list(zip(decoded_tensor, keys))
    cases = {
        "pil_decode_and_augment": (lambda d: old(pil_decode(d)), photos),
        "torchvision_decode_and_augment": (lambda pair: new(decode_image_bytes(pair[0]), pair[1]), seeded),
        "pil_decode_only": (pil_decode, photos),
        "torchvision_decode_only": (decode_image_bytes, photos),
        "pil_augment_only": (old, decoded_pil),
        "torchvision_augment_only": (lambda pair: new(*pair), tensor_pairs),
        "header_check_only (decode on the GPU)": (lambda d: encoded_image(d, "bench"), photos),
    }
    found: dict[str, list[float]] = {name: [] for name in cases}
    for work, items in cases.values():  # warm-up
        rate(work, items[:5])
    for _ in range(rounds):
        for name, (work, items) in cases.items():
            found[name].append(rate(work, items))
    return {name: round(statistics.median(values), 1) for name, values in found.items()}


def caption_table(dim: int = 50) -> dict[str, np.ndarray]:
    """A fixed 50-d vector per caption (GloVe's size): the loader only looks them up."""
    rng = np.random.default_rng(0)
    captions = sorted({c for r in records_from_jsonl(CAPTIONS) for c in r.captions})
    return {c: rng.standard_normal(dim).astype(np.float32) for c in captions}


def loader_rate(shards: list[str], table: dict, size: int, batch_size: int, passes: int) -> tuple[float, int]:
    """(b): images/s of the real loader, single process (decode + augment + caption vectors + batching)."""
    pipeline = make_train_pipeline(shards, transform=train_transform(size, MEAN, STD), caption_vector=table.get,
                                   shuffle_buffer=1000, seed=0)
    loader = make_loader(pipeline, batch_size=batch_size, num_workers=0)
    sum(len(keys) for _, _, keys in loader)  # warm-up pass
    count, start = 0, time.perf_counter()
    for _ in range(passes):
        for images, vectors, keys in loader:
            assert images.shape[1:] == (3, size, size) and vectors.shape == (len(keys), 50)
            count += len(keys)
    return count / (time.perf_counter() - start), count


def train_step_rate(size: int, batch_size: int, steps: int) -> float:
    """(b): images/s of resnet18 (random weights) + a linear head, forward/backward/AdamW on in-memory tensors."""
    backbone = create_backbone("resnet18", "random").module
    head = torch.nn.Linear(512, 50)
    model = torch.nn.Sequential(backbone, head).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, targets = torch.randn(batch_size, 3, size, size), torch.randn(batch_size, 50)

    def step() -> None:
        loss = F.mse_loss(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="image size (RandomResizedCrop output)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds over the photos for (a)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3, help="timed loader passes over the shards for (b)")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps for (b)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "loader.json")
    args = parser.parse_args(argv)
    all_threads = torch.get_num_threads()
    photos = [p.read_bytes() for p in sorted((CAPTIONS.parent / "images").glob("*.jpg"))]

    torch.set_num_threads(1)
    core = per_core(photos, args.size, args.rounds)
    speedup = core["torchvision_decode_and_augment"] / core["pil_decode_and_augment"]
    with tempfile.TemporaryDirectory() as folder:
        write_shards(records_from_jsonl(CAPTIONS), Path(folder) / "shards", split_by="split", progress=False)
        shards = list_shards(Path(folder) / "shards", "train") + list_shards(Path(folder) / "shards", "val")
        loader_images_s, loaded = loader_rate(shards, caption_table(), args.size, args.batch_size,
                                              args.passes)
    torch.set_num_threads(all_threads)
    train_images_s = train_step_rate(args.size, args.batch_size, args.steps)

    result = {
        "photos": len(photos), "image_size": args.size, "batch_size": args.batch_size,
        "images_per_s_per_core": core,
        "torchvision_over_pil_per_core": round(speedup, 2),
        "loader_images_per_s_one_core": round(loader_images_s, 1), "loader_images_timed": loaded,
        "train_step_images_per_s": round(train_images_s, 2), "train_step_threads": all_threads,
        "loader_over_train_step": round(loader_images_s / train_images_s, 1),
        "command": "python -m benchmarks.bench_loader",
    }
    print(f"(a) one core, {len(photos)} COCO photos, {args.size} px RandomResizedCrop(scale=(0.6, 1.0)) + flip")
    print("| path | images/s per core |\n|---|---:|")
    for name, value in core.items():
        print(f"| {name} | {value:.1f} |")
    print(f"torchvision ÷ PIL (decode + augment): {speedup:.2f}×\n")
    print(f"(b) loader (1 process, 1 core): {loader_images_s:.1f} images/s; resnet18 train step "
          f"({all_threads} threads, batch {args.batch_size}): {train_images_s:.2f} images/s; "
          f"ratio {loader_images_s / train_images_s:.1f}")
    write_json(args.out, result)
    print(json.dumps({"written": str(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
