"""Embedding shards: a collection encoded shard by shard, in the layout clip-retrieval users know.

An embedding folder (written by :func:`embed_shards`, one output set per input shard ``<name>``)::

    img_emb/img_emb_<name>.npy            (N, D) float16 or float32: the model's search-space embeddings
                                          (``loss.embed`` of the image encoder), one row per image
    metadata/metadata_<name>.parquet      key, captions, meta (JSON text), shard (the input shard), row
    thumbnails/thumbs_<name>.tar          <key>.jpg members (+ thumbs_<name>.json: their offsets)
    done/<name>.json                      written last: counts, dtype and the model's fingerprint
    embeddings.json                       the shards in order, with the totals (written when all are done)

Under ``torchrun`` each rank encodes input shard ``i`` when ``i % world_size == rank``; a single process
encodes them all. Every file is written atomically, and a shard whose done-marker matches its outputs is
skipped on a rerun, so a killed run resumes where it stopped. Outputs of another model (or dtype) in the
same folder are refused, never mixed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from retrieval.checkpoint import LoadedModel
from retrieval.data import iter_samples
from retrieval.data.pipeline import Handler, raise_data_error
from retrieval.distributed import SINGLE_PROCESS, Distributed
from retrieval.errors import ConfigError, DataError
from retrieval.io import atomic_path, write_json
from retrieval.progress import progress_bar
from retrieval.rundir import index_stamp
from retrieval.thumbnails import thumbnail_jpeg, thumbnail_tar_path, write_thumbnail_tar
from retrieval.transforms import eval_transform

FORMAT = "retrieval-embeddings/1"
DTYPES = ("float16", "float32")
EMBEDDINGS_SUBDIR, METADATA_SUBDIR, THUMBNAILS_SUBDIR, DONE_SUBDIR = "img_emb", "metadata", "thumbnails", "done"
SUMMARY_FILE = "embeddings.json"
METADATA_SCHEMA = pa.schema([("key", pa.string()), ("captions", pa.list_(pa.string())), ("meta", pa.string()),
                             ("shard", pa.string()), ("row", pa.int64())])


@dataclass(frozen=True)
class EmbeddingDir:
    """An embedding folder: where each file of embedding shard ``name`` lies."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def embeddings(self, name: str) -> Path:
        return self.path / EMBEDDINGS_SUBDIR / f"img_emb_{name}.npy"

    def metadata(self, name: str) -> Path:
        return self.path / METADATA_SUBDIR / f"metadata_{name}.parquet"

    @property
    def thumbnails(self) -> Path:
        return self.path / THUMBNAILS_SUBDIR

    def thumbnail_tar(self, name: str) -> Path:
        return thumbnail_tar_path(self.thumbnails, name)

    def marker(self, name: str) -> Path:
        """The done-marker of shard ``name``: written after its other files."""
        return self.path / DONE_SUBDIR / f"{name}.json"

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    def make_folders(self) -> None:
        for sub in (EMBEDDINGS_SUBDIR, METADATA_SUBDIR, THUMBNAILS_SUBDIR, DONE_SUBDIR):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def read_summary(self) -> dict:
        """``embeddings.json``: the shard names in order, counts, dimension, dtype and the model's stamp."""
        try:
            summary = json.loads(self.summary_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{self.summary_file}: not found; encode the collection first (retrieval embed), "
                            "or let a stopped run finish") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.summary_file}: cannot read: {str(exc).splitlines()[0]}") from None
        if not isinstance(summary, dict) or not isinstance(summary.get("shards"), list):
            raise DataError(f"{self.summary_file}: not an embedding summary (no 'shards' list)")
        return summary


def shard_names(shards: Sequence[str]) -> list[str]:
    """The name of each input shard's outputs: its file name without ``.tar``; two alike → DataError."""
    names, seen = [], {}
    for shard in shards:
        name = Path(shard).name.removesuffix(".tar")
        if name in seen:
            raise DataError(f"input shards {seen[name]} and {shard} share the name {name!r}; their embedding "
                            "shards would collide (encode them into separate --out folders)")
        seen[name] = shard
        names.append(name)
    return names


def _source_identity(shard: str) -> dict[str, Any]:
    return {"source": str(shard), "source_bytes": os.path.getsize(shard)}


def shard_is_done(folder: EmbeddingDir, name: str, shard: str, stamp: dict, dtype: str) -> bool:
    """Whether shard ``name``'s outputs are complete and were made from ``shard`` by this model in ``dtype``.

    Outputs of another model or dtype are refused (DataError): a folder never mixes them. A missing or
    unreadable marker, a changed input shard, or files that disagree with the marker's counts mean
    "not done" (the shard is encoded again).
    """
    try:
        marker = json.loads(folder.marker(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        return False
    if marker.get("model") != stamp["model"] or marker.get("vectors") != stamp["vectors"]:
        raise DataError(f"{folder.path}: shard {name} was encoded by another model (fingerprint "
                        f"{marker.get('model')}, this checkpoint is {stamp['model']}); use another --out or "
                        "--overwrite")
    if marker.get("dtype") != dtype:
        raise DataError(f"{folder.path}: shard {name} holds {marker.get('dtype')} embeddings, not {dtype}; use "
                        "another --out, the same --dtype, or --overwrite")
    if {k: marker.get(k) for k in ("source", "source_bytes")} != _source_identity(shard):
        return False
    try:
        vectors = np.load(folder.embeddings(name), mmap_mode="r")
        rows = pq.read_metadata(folder.metadata(name)).num_rows
    except (OSError, ValueError):
        return False
    count = marker.get("count")
    if vectors.shape != (count, marker.get("dim")) or str(vectors.dtype) != dtype or rows != count:
        return False
    return not marker.get("thumbnails") or folder.thumbnail_tar(name).is_file()


@dataclass
class _Batch:
    """A batch of one input shard, ready for the model; ``last`` closes the shard."""

    position: int  # the shard's place in the input list
    images: torch.Tensor
    keys: list[str]
    captions: list[list[str]]
    meta: list[dict]
    thumbnails: list[bytes]
    last: bool


class _ShardBatches(IterableDataset):
    """Decoded, transformed batches of each shard in ``work`` (position, path); a batch never spans shards.

    With loader workers, worker ``w`` of ``W`` reads the shards at ``w``, ``w + W``, …; the batches of
    different shards interleave, each tagged with its shard.
    """

    def __init__(self, work: list[tuple[int, str]], transform, batch_size: int, image_size: int,
                 thumbnails: bool, handler: Handler) -> None:
        self.work, self.transform, self.batch_size, self.image_size = work, transform, batch_size, image_size
        self.thumbnails, self.handler = thumbnails, handler

    def __iter__(self) -> Iterator[_Batch]:
        info = get_worker_info()
        mine = self.work if info is None else self.work[info.id::info.num_workers]
        for position, shard in mine:
            images, keys, captions, meta, thumbs = [], [], [], [], []
            for sample in iter_samples([shard], self.handler):
                images.append(self.transform(sample.image))
                keys.append(sample.key)
                captions.append(list(sample.captions))
                meta.append(dict(sample.meta))
                thumbs.append(thumbnail_jpeg(sample.image) if self.thumbnails else b"")
                if len(images) == self.batch_size:
                    yield _Batch(position, torch.stack(images), keys, captions, meta, thumbs, False)
                    images, keys, captions, meta, thumbs = [], [], [], [], []
            stacked = torch.stack(images) if images else torch.zeros(0, 3, self.image_size, self.image_size)
            yield _Batch(position, stacked, keys, captions, meta, thumbs, True)


def _no_collation(batch: _Batch) -> _Batch:
    return batch


@dataclass
class _Pending:
    """What has been encoded of one shard so far."""

    vectors: list[np.ndarray] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    thumbnails: list[bytes] = field(default_factory=list)


def write_embedding_shard(folder: EmbeddingDir, name: str, shard: str, vectors: np.ndarray, keys: list[str],
                          captions: list[list[str]], meta: list[dict], thumbnails: list[bytes] | None,
                          stamp: dict) -> None:
    """Write one shard's embeddings, metadata and thumbnails (each atomically), then its done-marker."""
    with atomic_path(folder.embeddings(name)) as tmp, open(tmp, "wb") as handle:
        np.save(handle, vectors)
    table = pa.table({"key": keys, "captions": captions,
                      "meta": [json.dumps(m, ensure_ascii=False, sort_keys=True) for m in meta],
                      "shard": [str(shard)] * len(keys), "row": list(range(len(keys)))}, schema=METADATA_SCHEMA)
    with atomic_path(folder.metadata(name)) as tmp:
        pq.write_table(table, tmp)
    if thumbnails is not None:
        write_thumbnail_tar(folder.thumbnail_tar(name), zip(keys, thumbnails))
    write_json(folder.marker(name), {"format": FORMAT, **_source_identity(shard), "count": len(keys),
                                     "dim": int(vectors.shape[1]), "dtype": str(vectors.dtype),
                                     "model": stamp["model"], "vectors": stamp["vectors"],
                                     "thumbnails": thumbnails is not None})


@dataclass
class EmbedResult:
    """What one process of :func:`embed_shards` did: the folder, every shard's name, and its own share."""

    out: Path
    names: list[str]
    encoded: list[str]  # shards this process encoded now
    already_done: list[str]  # shards of this process found complete and skipped
    images: int  # images this process encoded now


def _check_options(dtype: str, batch_size: int, workers: int) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: must be float16 or float32, got {dtype!r}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"--workers: must be 0 or more, got {workers}")


@torch.no_grad()
def embed_shards(model: LoadedModel, shards: Sequence[str], out: str | os.PathLike, *,
                 place: Distributed = SINGLE_PROCESS, dtype: str = "float16", batch_size: int = 64,
                 device: str = "cpu", workers: int = 0, thumbnails: bool = True, progress: bool = True,
                 handler: Handler = raise_data_error) -> EmbedResult:
    """Encode this process's share of ``shards`` into the embedding folder ``out`` (see the module docstring).

    Shard ``i`` belongs to rank ``i % place.world_size``. Shards already done (their marker matches) are
    skipped. ``workers`` loader processes decode and transform (and make thumbnails) while the model runs.
    When every rank is done, rank 0 writes ``embeddings.json``.
    """
    _check_options(dtype, batch_size, workers)
    shards = [str(s) for s in shards]
    if not shards:
        raise DataError("no shards given to encode")
    names = shard_names(shards)
    folder, stamp = EmbeddingDir(Path(out)), index_stamp(model)
    folder.make_folders()
    done = {i for i, (name, shard) in enumerate(zip(names, shards)) if shard_is_done(folder, name, shard, stamp, dtype)}
    mine = [i for i in range(len(shards)) if i % place.world_size == place.rank]
    work = [(i, shards[i]) for i in mine if i not in done]
    image_size = model.config.data.image_size
    transform = eval_transform(image_size, model.encoder.mean, model.encoder.std)
    dataset = _ShardBatches(work, transform, batch_size, image_size, thumbnails, handler)
    loader = DataLoader(dataset, batch_size=None, collate_fn=_no_collation, num_workers=min(workers, len(work)),
                        pin_memory=torch.device(device).type == "cuda")
    pending: dict[int, _Pending] = {}
    images = 0
    bar = progress_bar(desc=f"encoding {len(work)} shards" + (f" (rank {place.rank})" if place.active else ""),
                       unit="img", enabled=progress and place.is_main)
    with bar:
        for batch in loader if work else ():
            part = pending.setdefault(batch.position, _Pending())
            if len(batch.keys):
                vectors = model.embed_images(batch.images.to(device, non_blocking=True))
                part.vectors.append(vectors.float().cpu().numpy().astype(dtype))
                part.keys += batch.keys
                part.captions += batch.captions
                part.meta += batch.meta
                part.thumbnails += batch.thumbnails
                images += len(batch.keys)
                bar.update(len(batch.keys))
            if batch.last:
                part = pending.pop(batch.position)
                dim = model.caption_encoder.dim
                vectors = np.concatenate(part.vectors) if part.vectors else np.zeros((0, dim), dtype=dtype)
                write_embedding_shard(folder, names[batch.position], shards[batch.position], vectors, part.keys,
                                      part.captions, part.meta, part.thumbnails if thumbnails else None, stamp)
    place.barrier()
    if place.is_main:
        write_summary(folder, names, stamp, dtype)
    place.barrier()
    return EmbedResult(folder.path, names, [names[i] for i, _ in work], [names[i] for i in mine if i in done], images)


def write_summary(folder: EmbeddingDir, names: list[str], stamp: dict, dtype: str) -> None:
    """``embeddings.json`` from the done-markers of ``names`` (in that order); a shard not done → DataError."""
    counts, dims = {}, set()
    for name in names:
        try:
            marker = json.loads(folder.marker(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DataError(f"{folder.path}: shard {name} is not done; run retrieval embed again") from None
        counts[name] = int(marker["count"])
        dims.add(int(marker["dim"]))
    write_json(folder.summary_file, {"format": FORMAT, "shards": names, "counts": counts,
                                     "count": sum(counts.values()), "dim": max(dims, default=0), "dtype": dtype,
                                     "model": stamp["model"], "vectors": stamp["vectors"]})


def read_metadata(path: str | os.PathLike) -> list[dict]:
    """The rows of one metadata parquet: key, captions, meta (parsed), shard, row."""
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["meta"] = json.loads(row["meta"])
    return rows


def iter_embedding_shards(out: str | os.PathLike) -> Iterator[tuple[str, np.ndarray, list[dict]]]:
    """(name, embeddings (N, D), metadata rows) of every shard of a finished embedding folder, in order.

    The embeddings are memory-mapped: a shard's rows are read from disk as they are used.
    """
    folder = EmbeddingDir(Path(out))
    for name in folder.read_summary()["shards"]:
        try:
            vectors = np.load(folder.embeddings(name), mmap_mode="r")
            rows = read_metadata(folder.metadata(name))
        except (OSError, ValueError) as exc:
            raise DataError(f"{folder.path}: cannot read shard {name}: {str(exc).splitlines()[0]}") from None
        if len(vectors) != len(rows):
            raise DataError(f"{folder.path}: shard {name} has {len(vectors)} embeddings but {len(rows)} metadata rows")
        yield name, vectors, rows
