"""Build the search index of a collection: image embeddings, caption vectors and thumbnails.

Layout of an index directory (written atomically, all or nothing)::

    images/      faiss index of image embeddings + metadata (key, captions, thumbnail) + stamp
    captions/    faiss index of the collection's caption vectors (for image→text)
    thumbnails/  small JPEGs for the UI
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from retrieval.checkpoint import LoadedModel
from retrieval.data import Sample
from retrieval.embed import encode_shards, eval_transform, known_captions
from retrieval.errors import ConfigError
from retrieval.index import VectorIndex
from retrieval.io import atomic_dir
from retrieval.search import CAPTION_INDEX_DIR, IMAGE_INDEX_DIR, VOCABULARY_FILE, caption_vocabulary, stamp_for

THUMBNAIL_SIZE = 192


def search_metric(model: LoadedModel, configured: str) -> str:
    """``auto`` → the metric the loss trained for (``l2`` for the triplet loss, ``cosine`` for others)."""
    metric = model.loss.search_metric if configured == "auto" else configured
    if metric not in ("l2", "cosine", "ip"):
        raise ConfigError(f"index.metric: unknown metric {metric!r}; choose auto, l2 or cosine")
    return metric


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise each row (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def write_thumbnail(sample: Sample, out_dir: Path) -> str:
    """Save a small JPEG of ``sample`` under ``out_dir/thumbnails``; returns its relative path."""
    image = sample.image.convert("RGB")
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    relative = f"thumbnails/{sample.key}.jpg"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    (out_dir / relative).write_bytes(buffer.getvalue())
    return relative


def build_index(model: LoadedModel, shards: Sequence[str], out_dir: str | Path, *, kind: str | None = None,
                metric: str = "auto", thumbnails: bool = True, device: str = "cpu") -> Path:
    """Embed every image of ``shards`` with ``model`` and write the index directory atomically."""
    out_dir = Path(out_dir)
    metric = search_metric(model, metric)
    transform = eval_transform(model.config.data.image_size, model.encoder.mean, model.encoder.std)
    stamp = stamp_for(model)
    if kind in (None, model.config.index.kind):  # the configured kind with its parameters; another kind: its defaults
        kind = model.config.index.params
    with atomic_dir(out_dir) as tmp:
        thumbs: dict[str, str] = {}

        def save_thumbnail(sample: Sample) -> None:  # during the one pass over the shards
            thumbs[sample.key] = write_thumbnail(sample, tmp)

        if thumbnails:
            (tmp / "thumbnails").mkdir()
        collection = encode_shards(shards, model.embed_images, transform, device=device, desc="embedding images",
                                   visit=save_thumbnail if thumbnails else None)
        texts, caption_vectors, owner, _ = known_captions(collection.captions, model.caption_encoder.encode_batch)
        image_vectors = collection.vectors.numpy().astype(np.float32)
        if metric == "cosine":  # cosine = inner product of unit vectors, on both sides
            image_vectors, caption_vectors, metric = unit_rows(image_vectors), unit_rows(caption_vectors), "ip"
        metadata = [{"key": key, "captions": captions, "thumbnail": thumbs.get(key), "meta": meta}
                    for key, captions, meta in zip(collection.keys, collection.captions, collection.meta)]
        VectorIndex.build(image_vectors, metadata, kind=kind, metric=metric, stamp=stamp).save(tmp / IMAGE_INDEX_DIR)
        caption_meta = [{"caption": text, "key": collection.keys[i]} for text, i in zip(texts, owner)]
        VectorIndex.build(caption_vectors.astype(np.float32), caption_meta, kind="flat", metric=metric,
                          stamp=stamp).save(tmp / CAPTION_INDEX_DIR)
        vocabulary = caption_vocabulary(texts, caption_vectors, model.caption_encoder)
        (tmp / VOCABULARY_FILE).write_text(json.dumps(vocabulary))
    return out_dir
