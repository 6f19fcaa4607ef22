"""Encode the images of a shard set: eval transforms (``retrieval.transforms``), batched forward passes,
a progress bar."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.data import Sample, iter_samples
from retrieval.data.in_place import shard_selection
from retrieval.data.pipeline import Handler, raise_data_error
from retrieval.io import atomic_path
from retrieval.progress import progress_bar
from retrieval.transforms import eval_transform


@dataclass
class EncodedCollection:
    """Per-image outputs of a shard set, in shard order, with what the index needs to show them."""

    vectors: torch.Tensor  # (N, F) backbone features or (N, D) embeddings
    keys: list[str]
    captions: list[list[str]]
    meta: list[dict]


@torch.no_grad()
def encode_shards(shards: Sequence[str], forward: Callable[[torch.Tensor], torch.Tensor], transform: Callable,
                  *, batch_size: int = 32, device: str = "cpu", desc: str = "encoding images",
                  progress: bool = True, visit: Callable[[Sample], None] | None = None,
                  handler: Handler = raise_data_error) -> EncodedCollection:
    """Run ``forward`` over every image of ``shards`` (in order) and keep captions and metadata.

    ``visit`` is called with each decoded sample, so other per-image work needs no second read.
    ``handler`` gets every bad sample or shard (default: a one-line ``DataError``).
    """
    outputs, keys, captions, meta, batch = [], [], [], [], []

    def flush() -> None:
        if batch:
            outputs.append(forward(torch.stack(batch).to(device)).float().cpu())
            batch.clear()

    for sample in progress_bar(iter_samples(shards, handler), desc=desc, unit="img", leave=False, enabled=progress):
        if visit is not None:
            visit(sample)
        batch.append(transform(sample.image))
        keys.append(sample.key)
        captions.append(list(sample.captions))
        meta.append(dict(sample.meta))
        if len(batch) == batch_size:
            flush()
    flush()
    vectors = torch.cat(outputs) if outputs else torch.zeros(0, 0)
    return EncodedCollection(vectors, keys, captions, meta)


def known_captions(captions: Sequence[Sequence[str]], encode_batch: Callable
                   ) -> tuple[list[str], np.ndarray, np.ndarray, Any]:
    """Every known caption of a collection: (texts, vectors (M, D), owning image index (M,), OOV stats).

    ``captions[i]`` are the captions of image ``i``; captions with no known word are left out.
    """
    flat = [caption for image_captions in captions for caption in image_captions]
    owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    vectors, known, stats = encode_batch(flat)
    texts = [caption for caption, ok in zip(flat, known) if ok]
    return texts, vectors[known], owner[known], stats


def caption_pairs(captions: Sequence[Sequence[str]], encode_batch: Callable) -> tuple[np.ndarray, np.ndarray, Any]:
    """:func:`known_captions` without the texts: (vectors (M, D), owning image index (M,), OOV stats)."""
    _, vectors, owner, stats = known_captions(captions, encode_batch)
    return vectors, owner, stats


def caption_vector_table(captions: Sequence[Sequence[str]], encode_batch: Callable) -> dict[str, np.ndarray]:
    """Caption text → vector for every distinct known caption of a collection (encoded once each, sorted)."""
    flat = sorted({caption for image_captions in captions for caption in image_captions})
    vectors, known, _ = encode_batch(flat)
    return {caption: vector for caption, vector, ok in zip(flat, vectors, known) if ok}


def feature_cache_path(cache_dir: str | Path, backbone: str, weights: str, image_size: int,
                       split: str, shards: Sequence[str]) -> Path:
    """Where a split's backbone features are cached: keyed by backbone, weights, size and shard files."""
    from retrieval.models.backbones import weights_identity

    identity = json.dumps([backbone, weights_identity(backbone, weights), image_size,
                           [(s, os.path.getsize(s), os.path.getmtime(s), *shard_selection(s)) for s in shards]])
    return Path(cache_dir) / f"{split}-{hashlib.sha1(identity.encode()).hexdigest()[:16]}.pt"


def _read_cached_features(path: Path) -> EncodedCollection | None:
    """A cached split read without running code (``weights_only``); None when missing or unreadable (recomputed)."""
    if not path.exists():
        return None
    try:
        return EncodedCollection(**torch.load(path, weights_only=True))
    except Exception:  # a damaged or foreign cache file is a cache miss: torch raises many types
        return None


def split_features(shards: Sequence[str], split: str, features: Callable[[torch.Tensor], torch.Tensor], *,
                   model_config, image_size: int, mean, std, cache_dir: str | None = None,
                   device: str = "cpu", progress: bool = True, handler: Handler = raise_data_error
                   ) -> EncodedCollection:
    """Pooled backbone features of ``shards``: read from (or written to) the shared feature cache.

    ``handler`` gets every bad sample or shard (default: a one-line ``DataError``).
    """
    path = None
    if cache_dir:
        path = feature_cache_path(cache_dir, model_config.backbone, model_config.weights, image_size, split, shards)
        cached = _read_cached_features(path)
        if cached is not None:
            return cached
    collection = encode_shards(shards, features, eval_transform(image_size, mean, std), device=device,
                               desc=f"encoding {split} images", progress=progress, handler=handler)
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(dataclasses.asdict(collection), tmp)
    return collection
