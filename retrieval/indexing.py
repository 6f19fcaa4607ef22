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
from retrieval.distances import search_distance
from retrieval.embed import encode_shards, eval_transform, known_captions
from retrieval.index import VectorIndex
from retrieval.io import atomic_dir
from retrieval.search import CAPTION_INDEX_DIR, IMAGE_INDEX_DIR, VOCABULARY_FILE, caption_vocabulary, stamp_for

THUMBNAIL_SIZE = 192


def write_thumbnail(sample: Sample, out_dir: Path) -> str:
    """Save a small JPEG of ``sample`` under ``out_dir/thumbnails``; returns its relative path."""
    image = sample.image.convert("RGB")
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    relative = f"thumbnails/{sample.key}.jpg"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    (out_dir / relative).write_bytes(buffer.getvalue())
    return relative


def build_index(model: LoadedModel, shards: Sequence[str], out_dir: str | Path, *, kind: str = "auto",
                metric: str = "auto", thumbnails: bool = True, device: str = "cpu") -> Path:
    """Embed every image of ``shards`` with ``model`` and write the index directory atomically.

    ``metric``: ``auto`` compares by the loss's distance, else by the distance it names
    (``index.metric``); images and captions are stored mapped into that distance's search space.
    """
    out_dir = Path(out_dir)
    distance = search_distance(model.loss.distance, metric)
    transform = eval_transform(model.config.data.image_size, model.encoder.mean, model.encoder.std)
    stamp = stamp_for(model)
    with atomic_dir(out_dir) as tmp:
        thumbs: dict[str, str] = {}

        def save_thumbnail(sample: Sample) -> None:  # during the one pass over the shards
            thumbs[sample.key] = write_thumbnail(sample, tmp)

        if thumbnails:
            (tmp / "thumbnails").mkdir()
        collection = encode_shards(shards, model.embed_images, transform, device=device, desc="embedding images",
                                   visit=save_thumbnail if thumbnails else None)
        texts, caption_vectors, owner, _ = known_captions(collection.captions, model.caption_encoder.encode_batch)
        image_vectors = distance.to_search_space(collection.vectors.numpy().astype(np.float32))
        caption_vectors = distance.to_search_space(caption_vectors.astype(np.float32))
        metadata = [{"key": key, "captions": captions, "thumbnail": thumbs.get(key), "meta": meta}
                    for key, captions, meta in zip(collection.keys, collection.captions, collection.meta)]
        VectorIndex.build(image_vectors, metadata, kind=kind, metric=distance.faiss_metric,
                          stamp=stamp).save(tmp / IMAGE_INDEX_DIR)
        caption_meta = [{"caption": text, "key": collection.keys[i]} for text, i in zip(texts, owner)]
        VectorIndex.build(caption_vectors, caption_meta, kind="flat", metric=distance.faiss_metric,
                          stamp=stamp).save(tmp / CAPTION_INDEX_DIR)
        vocabulary = caption_vocabulary(texts, caption_vectors, model.caption_encoder)
        (tmp / VOCABULARY_FILE).write_text(json.dumps(vocabulary))
    return out_dir
