"""Build the search index of a collection: image embeddings, caption vectors, vocabulary and thumbnails.

The index folder (its layout: :class:`retrieval.rundir.IndexDir`) is written atomically, all or nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from gensim.parsing.preprocessing import STOPWORDS
from tqdm.auto import tqdm

from retrieval.checkpoint import LoadedModel, load_checkpoint
from retrieval.data import Sample, list_shards
from retrieval.data.pipeline import error_handler
from retrieval.data.skips import SkippedItems, skipped_summary
from retrieval.distances import search_distance
from retrieval.embed import encode_shards, eval_transform, known_captions
from retrieval.embedding_shards import EmbeddingDir, iter_embedding_shards
from retrieval.errors import DataError
from retrieval.index import VectorIndex, build_index_from_chunks
from retrieval.io import atomic_dir
from retrieval.rundir import BEST_CHECKPOINT, THUMBNAILS_DIR, IndexDir, RunDir, index_stamp
from retrieval.text import tokenize
from retrieval.thumbnails import ThumbnailReader, ThumbnailTarWriter, thumbnail_jpeg


def thumbnail_names(writer: ThumbnailTarWriter) -> dict[str, str]:
    """key → the tar holding its thumbnail, relative to the index folder (as the metadata stores it)."""
    writer.flush()
    return {key: f"{THUMBNAILS_DIR}/{name}" for key, name in writer.tar_of.items()}


def caption_vocabulary(captions: list[str], caption_vectors: np.ndarray, caption_encoder) -> dict:
    """What :meth:`retrieval.search.Searcher.nearest_words` reads: known content words of the captions
    and their mean vector."""
    candidates = sorted({word for caption in captions for word in tokenize(caption)
                         if word.isalpha() and len(word) > 2 and word not in STOPWORDS})
    _, known, _ = caption_encoder.encode_batch(candidates)
    center = caption_vectors.mean(axis=0) if len(caption_vectors) else np.zeros(caption_encoder.dim)
    return {"words": [w for w, ok in zip(candidates, known) if ok], "center": [float(x) for x in center]}


def build_index(model: LoadedModel, shards: Sequence[str], out_dir: str | Path, *, kind: str | None = None,
                metric: str = "auto", thumbnails: bool = True, device: str = "cpu") -> Path:
    """Embed every image of ``shards`` with ``model`` and write the index directory atomically.

    ``metric``: ``auto`` compares by the loss's distance, else by the distance it names
    (``index.metric``); images and captions are stored mapped into that distance's search space.
    With the run's ``data.on_error: skip``, bad samples and shards are warned about, passed over and counted.
    """
    out_dir = Path(out_dir)
    distance = search_distance(model.loss.distance, metric)
    transform = eval_transform(model.config.data.image_size, model.encoder.mean, model.encoder.std)
    stamp = index_stamp(model)
    skipped = SkippedItems(warn=True) if model.config.data.on_error == "skip" else None
    if kind in (None, model.config.index.kind):  # the configured kind with its parameters; another kind: its defaults
        kind = model.config.index.params
    with atomic_dir(out_dir) as tmp:
        staged = IndexDir(tmp)
        writer = ThumbnailTarWriter(staged.thumbnails) if thumbnails else None

        def save_thumbnail(sample: Sample) -> None:  # during the one pass over the shards
            writer.add(sample.key, thumbnail_jpeg(sample.image))

        collection = encode_shards(shards, model.embed_images, transform, device=device, desc="embedding images",
                                   visit=save_thumbnail if thumbnails else None, handler=error_handler(skipped))
        write_index_files(staged, model, distance, kind, stamp, collection.vectors.numpy(), collection.keys,
                          collection.captions, collection.meta, thumbnail_names(writer) if writer else {})
    if skipped is not None:
        tqdm.write(f"data.on_error=skip: {skipped_summary(skipped.counts())}")
    return out_dir


class EmbeddingChunks:
    """The embeddings of a finished embedding folder, one float32 shard at a time, as often as iterated
    (what :func:`~retrieval.index.build_index_from_chunks` reads twice)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = folder

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, vectors, _ in iter_embedding_shards(self.folder):
            yield np.asarray(vectors, dtype=np.float32)


def write_index_files(staged: IndexDir, model: LoadedModel, distance, kind, stamp: dict,
                      vectors: np.ndarray | EmbeddingChunks, keys: list[str], captions: list[list[str]],
                      meta: list[dict], thumbs: dict[str, str]) -> None:
    """The image and caption indexes and the vocabulary of a collection's embeddings (rows of ``keys``).

    ``vectors``: one array, or :class:`EmbeddingChunks`, which are indexed shard by shard (the coarse
    quantizer trains on a sample) without holding them all.
    """
    texts, caption_vectors, owner, _ = known_captions(captions, model.caption_encoder.encode_batch)
    caption_vectors = distance.to_search_space(caption_vectors.astype(np.float32))
    metadata = [{"key": key, "captions": item_captions, "thumbnail": thumbs.get(key), "meta": item_meta}
                for key, item_captions, item_meta in zip(keys, captions, meta)]
    if isinstance(vectors, EmbeddingChunks):
        chunks = _SearchSpaceChunks(vectors, distance)
        build_index_from_chunks(chunks, len(keys), model.caption_encoder.dim, metadata, kind=kind,
                                metric=distance.faiss_metric, stamp=stamp).save(staged.images)
    else:
        image_vectors = distance.to_search_space(np.asarray(vectors, dtype=np.float32))
        VectorIndex.build(image_vectors, metadata, kind=kind, metric=distance.faiss_metric,
                          stamp=stamp).save(staged.images)
    caption_meta = [{"caption": text, "key": keys[i]} for text, i in zip(texts, owner)]
    VectorIndex.build(caption_vectors, caption_meta, kind=kind, metric=distance.faiss_metric,  # the same rules
                      stamp=stamp).save(staged.captions)
    vocabulary = caption_vocabulary(texts, caption_vectors, model.caption_encoder)
    staged.vocabulary_file.write_text(json.dumps(vocabulary))


def build_index_from_embeddings(model: LoadedModel, embeddings: str | Path, out_dir: str | Path, *,
                                kind: str | None = None, metric: str = "auto", thumbnails: bool = True) -> Path:
    """Write the index folder from an embedding folder of ``retrieval embed`` (no image is decoded again).

    The folder must have been encoded by ``model`` (its stamp is compared). Thumbnails come from its tars.
    """
    out_dir = Path(out_dir)
    summary = EmbeddingDir(Path(embeddings)).read_summary()
    stamp = index_stamp(model)
    if {"model": summary.get("model"), "vectors": summary.get("vectors")} != stamp:
        raise DataError(f"{embeddings}: encoded by another model (fingerprint {summary.get('model')}, this "
                        f"checkpoint is {stamp['model']}); run retrieval embed with this checkpoint")
    distance = search_distance(model.loss.distance, metric)
    if kind in (None, model.config.index.kind):
        kind = model.config.index.params
    keys, captions, meta = [], [], []
    for _, _, rows in iter_embedding_shards(embeddings):  # the embeddings stay on disk (memory-mapped)
        keys += [row["key"] for row in rows]
        captions += [list(row["captions"]) for row in rows]
        meta += [row["meta"] for row in rows]
    reader = ThumbnailReader(EmbeddingDir(Path(embeddings)).thumbnails) if thumbnails else None
    with atomic_dir(out_dir) as tmp:
        staged = IndexDir(tmp)
        thumbs: dict[str, str] = {}
        if reader is not None:  # regrouped in the index's row order, as an index built from the shards has them
            writer = ThumbnailTarWriter(staged.thumbnails)
            for key in keys:
                data = reader.get(key)
                if data is not None:
                    writer.add(key, data)
            thumbs = thumbnail_names(writer)
        write_index_files(staged, model, distance, kind, stamp, EmbeddingChunks(embeddings), keys, captions, meta,
                          thumbs)
    return out_dir


class _SearchSpaceChunks:
    """Chunks mapped into a distance's search space, re-iterable like the chunks they map."""

    def __init__(self, chunks: EmbeddingChunks, distance) -> None:
        self.chunks, self.distance = chunks, distance

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in self.chunks:
            yield self.distance.to_search_space(chunk)


def index_run(run_dir: str | Path, *, checkpoint: str = BEST_CHECKPOINT, split: str | None = None,
              out: str | Path | None = None, kind: str | None = None, device: str = "cpu",
              embeddings: str | Path | None = None) -> Path:
    """Build a run's index (``<run>/index`` unless ``out`` is given) from its shards with one of its checkpoints.

    ``split``: train, val or all (default: the run's ``index.split``); ``kind``: default the run's ``index.kind``.
    ``embeddings``: an embedding folder of ``retrieval embed`` to index instead of encoding the shards.
    """
    run = RunDir(run_dir)
    model = load_checkpoint(run.checkpoint(checkpoint), device=device)
    if embeddings is not None:
        return build_index_from_embeddings(model, embeddings, out or run.index.path,
                                           kind=kind or model.config.index.kind, metric=model.config.index.metric)
    split = split or model.config.index.split
    shards = list_shards(model.config.data, split)
    return build_index(model, shards, out or run.index.path, kind=kind or model.config.index.kind,
                       metric=model.config.index.metric, device=device)
