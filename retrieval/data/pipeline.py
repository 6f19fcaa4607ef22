"""Streaming readers over webdataset shards: an in-order reader and a shuffled training pipeline.

The training stages are plain generator functions wrapped with ``wds.pipelinefilter`` (so each can
be tested on a list). Their randomness comes from one ``EpochSeed`` shared by the pipeline:
the same seed and epoch give the same order, and ``make_loader`` starts a new epoch per pass.
A sample's augmentation draws from its own seed (``EpochSeed.sample_seed``: seed, epoch and key only),
so its crop and flip do not depend on worker count, rank, batch position or torch's global generator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds

from retrieval.data.images import ImageTooLarge, decode_image_bytes, image_error_text, open_within_limit
from retrieval.data.in_place import _select_in_place
from retrieval.data.shards import SHORT_SHARD, check_samples_read
from retrieval.data.skips import BadItem, SkippedItems
from retrieval.data.sources import IMAGE_EXTS, wds_error_text
from retrieval.errors import DataError

log = logging.getLogger(__name__)

Handler = Callable[[Exception], bool]


@dataclass
class EncodedImage:
    """A sample's image still encoded, its header read and checked against the pixel cap: what the loader
    hands over when the batch is decoded on the training device (``retrieval.transforms.BatchDecoder``)."""

    data: bytes
    format: str  # PIL's name of the format: JPEG, PNG, ...
    mode: str  # PIL's mode from the header: RGB (YCbCr JPEG), L, CMYK, RGBA, P, ...
    where: str  # shard and sample, for error messages
    seed: int = 0  # the sample's augmentation seed (EpochSeed.sample_seed), set by the to_train_tuple stage


@dataclass
class Sample:
    """One shard sample: its image decoded (uint8 RGB tensor, 3 × H × W) or still encoded, captions and meta."""

    key: str
    image: torch.Tensor | EncodedImage
    captions: list[str]
    meta: dict = field(default_factory=dict)


def raise_data_error(exn: Exception) -> bool:
    """Default error handler: re-raise as a one-line ``DataError`` naming the shard (and key)."""
    if isinstance(exn, DataError):
        if len(exn.args) > 1:  # webdataset appended (stream, url) on the way out: keep the message only
            raise DataError(str(exn.args[0])) from None
        raise exn
    raise DataError(f"cannot read shard data: {wds_error_text(exn)}") from exn


def skip_and_count(skipped: SkippedItems) -> Handler:
    """The ``data.on_error: skip`` handler: note each bad sample or shard in ``skipped`` once, and go on.

    An item met again (the next epoch reads the same shards) is not noted twice; a shard that stopped with
    a read error is not noted again for holding fewer samples than its manifest lists.
    """
    seen: set[str] = set()

    def handler(exn: Exception) -> bool:
        if isinstance(exn, DataError):
            message = str(exn.args[0]) if exn.args else str(exn)
            error = BadItem(message, getattr(exn, "reason", "bad shard data"), getattr(exn, "where", ""))
        else:
            urls = [a for a in getattr(exn, "args", ())[1:] if isinstance(a, str)]
            error = BadItem(f"cannot read shard data: {wds_error_text(exn)}", "shard unreadable",
                            urls[-1] if urls else "")
        if str(error) in seen or (error.reason == SHORT_SHARD and error.where in seen):
            return True
        seen.update(item for item in (str(error), error.where) if item)
        skipped.add(error)
        return True

    return handler


def error_handler(skipped: SkippedItems | None) -> Handler:
    """The readers' handler for a ``data.on_error`` policy: :func:`raise_data_error` (stop, ``skipped`` None)
    or :func:`skip_and_count`."""
    return raise_data_error if skipped is None else skip_and_count(skipped)


@dataclass
class EpochSeed:
    """The seed and epoch that all random stages of one pipeline derive their generators from."""

    seed: int = 0
    epoch: int = 0

    def rng(self, stage: str, per_worker: bool = True) -> random.Random:
        """A generator for ``stage``; per worker (and node) unless the stage must agree across them."""
        parts: list[Any] = [self.seed, self.epoch, stage]
        if per_worker:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            parts += [rank, worker]
        return random.Random(":".join(str(p) for p in parts))

    def sample_seed(self, key: str, stage: str = "augment") -> int:
        """A 64-bit seed for one sample's own draws in ``stage``: a function of seed, epoch and key alone."""
        digest = hashlib.sha256(f"{self.seed}:{self.epoch}:{stage}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "little")


def _rng(seed: int | EpochSeed, stage: str, per_worker: bool = True) -> random.Random:
    state = seed if isinstance(seed, EpochSeed) else EpochSeed(int(seed))
    return state.rng(stage, per_worker)


def _shuffle_shards(data: Iterable[dict], seed: int | EpochSeed = 0) -> Iterator[dict]:
    """Shuffle the whole shard list; the same on every worker and node, so they can split it."""
    shards = list(data)
    _rng(seed, "shards", per_worker=False).shuffle(shards)
    yield from shards


def _resample_shards(data: Iterable[dict], seed: int | EpochSeed = 0) -> Iterator[dict]:
    """Draw shards with replacement, forever (each worker draws on its own)."""
    urls = [d["url"] for d in data]
    if not urls:
        return
    rng = _rng(seed, "resample")
    while True:
        yield {"url": rng.choice(urls)}


def _cycle_rank_shards(data: Iterable[dict], seed: int | EpochSeed = 0) -> Iterator[dict]:
    """This rank's and this worker's share of the (already shuffled) shard list, cycled forever.

    Rank r of N takes every N-th shard from the r-th, worker w of W every W-th of those, so within a
    pass no two (rank, worker) pairs read the same shard. Each pass goes through the share in a new
    order. A rank (or worker) left without a shard, when there are fewer shards than ranks (workers),
    reads from the whole list (its rank's list) instead: some shards are then read by two of them.
    """
    urls = [d["url"] for d in data]
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    rank_urls = urls[rank::world] or urls
    mine = rank_urls[worker::workers] or rank_urls
    if not mine:
        return
    rng = _rng(seed, "cycle")
    while True:
        order = list(mine)
        rng.shuffle(order)
        for url in order:
            yield {"url": url}


def _worker_quota(data: Iterable[Any], batches: int = 1, batch_size: int = 1) -> Iterator[Any]:
    """The samples of this worker's share of ``batches`` full batches per rank (the DataLoader takes batches from
    its workers in turn, so worker w of W gets every W-th: ``batches // W``, plus one for the first ``batches % W``)."""
    _, _, worker, workers = wds.utils.pytorch_worker_info()
    quota = (batches // workers + (1 if worker < batches % workers else 0)) * batch_size
    if quota <= 0:
        return
    for count, sample in enumerate(data, start=1):
        yield sample
        if count >= quota:
            return


def _shuffle_samples(data: Iterable[Any], bufsize: int = 1000, seed: int | EpochSeed = 0) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``bufsize`` items (``bufsize <= 1`` passes it through)."""
    rng, buf = _rng(seed, "samples"), []
    for item in data:
        if bufsize <= 1:
            yield item
            continue
        buf.append(item)
        if len(buf) >= bufsize:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _sample_where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"


def _sample_info(sample: dict) -> dict:
    """The ``json`` member of a raw tar sample (key, captions, meta); missing or malformed → DataError."""
    where = _sample_where(sample)
    if "json" not in sample:
        raise BadItem(f"{where}: no json member (its key, captions and meta)", "sample lacks a member", where)
    try:
        info = json.loads(sample["json"])
        info["captions"], info["meta"] = list(info["captions"]), dict(info.get("meta") or {})
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise BadItem(f"{where}: bad json member: {text}", "sample does not decode", where) from None
    return info


def bad_image(where: str, error: Exception) -> BadItem:
    """The one-line ``BadItem`` of an image that does not decode, or is over the pixel cap, at ``where``."""
    if isinstance(error, ImageTooLarge):
        return BadItem(f"{where}: {error.describe('image')}", "image over the pixel limit", where)
    return BadItem(f"{where}: image does not decode: {image_error_text(error)}", "image does not decode", where)


def encoded_image(data: bytes, where: str) -> EncodedImage:
    """``data`` as an :class:`EncodedImage`, after reading its header and checking the pixel cap (no pixel decoded)."""
    with open_within_limit(io.BytesIO(data)) as image:
        return EncodedImage(data, str(image.format), image.mode, where)


def decode_sample(sample: dict, keep_encoded: bool = False) -> Sample:
    """A raw tar sample (``__key__``, image member, ``json``) as a ``Sample`` with a uint8 RGB image tensor.

    With ``keep_encoded`` the image stays an :class:`EncodedImage` (header checked, for decoding on the
    device). An image over the pixel cap or one that does not decode is a one-line ``BadItem``.
    """
    where = _sample_where(sample)
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadItem(f"{where}: no image member ({', '.join(IMAGE_EXTS)})", "sample lacks a member", where)
    info = _sample_info(sample)
    try:
        image = encoded_image(sample[ext], where) if keep_encoded else decode_image_bytes(sample[ext])
    except Exception as exc:  # PIL and torchvision raise many types
        raise bad_image(where, exc) from None
    return Sample(key=str(info.get("key", sample["__key__"])), image=image, captions=info["captions"],
                  meta=info["meta"])


def _decode(data: Iterable[dict], handler: Handler = raise_data_error, keep_encoded: bool = False
            ) -> Iterator[Sample]:
    for sample in data:
        try:
            yield decode_sample(sample, keep_encoded)
        except Exception as exn:
            if not handler(exn):
                break


def _pick_caption(
    data: Iterable[Sample],
    caption_vector: Callable[[str], np.ndarray | None],
    seed: int | EpochSeed = 0,
    counts: dict[str, int] | None = None,
) -> Iterator[tuple[Sample, torch.Tensor]]:
    """Pair each sample with the vector of one random caption that has one; drop (and count) the rest."""
    rng = _rng(seed, "captions")
    counts = counts if counts is not None else {}
    for sample in data:
        order = list(sample.captions)
        rng.shuffle(order)
        vector = next((v for v in map(caption_vector, order) if v is not None), None)
        if vector is None:
            counts["no_caption"] = counts.get("no_caption", 0) + 1
            continue
        counts["kept"] = counts.get("kept", 0) + 1
        yield sample, torch.from_numpy(np.array(vector, dtype=np.float32))
    if counts.get("no_caption"):
        log.info("dropped %d samples with no caption vector (kept %d)", counts["no_caption"], counts.get("kept", 0))


def _to_train_tuple(
    data: Iterable[tuple[Sample, torch.Tensor]],
    transform: Callable[[torch.Tensor, int], Any] | None,
    handler: Handler = raise_data_error,
    seed: int | EpochSeed = 0,
) -> Iterator[tuple[Any, torch.Tensor, str]]:
    """``(transform(image, sample seed), vector, key)``; the sample seed is ``EpochSeed.sample_seed(key)``.

    With ``transform`` None the image stays encoded and carries its sample seed: ``(EncodedImage, vector, key)``.
    """
    state = seed if isinstance(seed, EpochSeed) else EpochSeed(int(seed))
    for sample, vector in data:
        try:
            sample_seed = state.sample_seed(sample.key)
            if transform is None:
                image = dataclasses.replace(sample.image, seed=sample_seed)
            else:
                image = transform(sample.image, sample_seed)
        except Exception as exn:
            err = DataError(f"sample {sample.key}: transform failed: {type(exn).__name__}: {exn}".splitlines()[0])
            if not handler(err):
                break
            continue
        yield image, vector, sample.key


def _count_samples(data: Iterable[dict], read: dict[str, int]) -> Iterator[dict]:
    """Pass raw tar samples through, counting them per shard (``__url__``)."""
    for sample in data:
        read[sample["__url__"]] = read.get(sample["__url__"], 0) + 1
        yield sample


shuffle_shards = wds.pipelinefilter(_shuffle_shards)
resample_shards = wds.pipelinefilter(_resample_shards)
shuffle_samples = wds.pipelinefilter(_shuffle_samples)
cycle_rank_shards = wds.pipelinefilter(_cycle_rank_shards)
worker_quota = wds.pipelinefilter(_worker_quota)
decode = wds.pipelinefilter(_decode)
pick_caption = wds.pipelinefilter(_pick_caption)
to_train_tuple = wds.pipelinefilter(_to_train_tuple)
count_samples = wds.pipelinefilter(_count_samples)
select_in_place = wds.pipelinefilter(_select_in_place)


def _check_shards(shards: Sequence[str]) -> list[str]:
    if isinstance(shards, str):
        shards = [shards]
    shards = [str(s) for s in shards]
    if not shards:
        raise DataError("no shards given to read")
    return shards


def iter_samples(shards: Sequence[str], handler: Handler = raise_data_error) -> Iterator[Sample]:
    """Every sample of ``shards`` in order (for indexing and evaluation); no shuffling, no splitting.

    After a complete pass, a shard that held fewer samples than its manifest lists goes to ``handler``.
    """
    shards = _check_shards(shards)
    read = dict.fromkeys(shards, 0)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=handler), count_samples(read),
        select_in_place(handler), decode(handler=handler)
    )
    return _then_check_counts(pipeline, read, handler)


def _then_check_counts(samples: Iterable[Sample], read: dict[str, int], handler: Handler) -> Iterator[Sample]:
    yield from samples
    check_samples_read(read, handler)


def read_shard_records(shards: Sequence[str], handler: Handler = raise_data_error) -> list[dict]:
    """Keys, captions and metadata of every sample, in order, without decoding images.

    A sample without its json member, or a shard that held fewer samples than its manifest lists, goes
    to ``handler`` (by default a one-line ``DataError`` naming the shard).
    """
    shards = [str(s) for s in ([shards] if isinstance(shards, str) else shards)]
    read = dict.fromkeys(shards, 0)
    samples = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=handler),
                               count_samples(read), select_in_place(handler))
    records = []
    for sample in samples:
        try:
            records.append({"key": sample["__key__"], **_sample_info(sample)})
        except DataError as exn:
            if not handler(exn):
                break
    check_samples_read(read, handler)
    return records


class TrainPipeline(wds.DataPipeline):
    """A ``DataPipeline`` whose random stages share one ``EpochSeed``; ``set_epoch`` reshuffles."""

    def __init__(self, *stages: Any, seed_state: EpochSeed, counts: dict[str, int]) -> None:
        super().__init__(*stages)
        self.seed_state = seed_state
        self.counts = counts

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s shard order, sample order and caption choice on the next pass."""
        self.seed_state.epoch = int(epoch)


def make_train_pipeline(
    shards: Sequence[str],
    *,
    transform: Callable[[torch.Tensor, int], Any] | None = None,
    caption_vector: Callable[[str], np.ndarray | None],
    shuffle_buffer: int = 1000,
    seed: int = 0,
    resampled: bool = False,
    handler: Handler = raise_data_error,
    keep_encoded: bool = False,
    batches_per_rank: int | None = None,
    batch_size: int = 1,
) -> TrainPipeline:
    """Shuffled training samples ``(image_tensor, vector float32, key)`` from ``shards``.

    Stages: shard shuffle (or resampling), split by node and worker, tar reading, buffered sample
    shuffle, decoding to uint8 RGB tensors, one random caption with a known vector (samples with none
    are dropped and counted in ``pipeline.counts`` — per process), ``transform(image, sample seed)``.
    With ``keep_encoded`` (and no ``transform``) images are not decoded: each is an ``EncodedImage``
    with its header checked and its sample seed, for ``retrieval.transforms.BatchDecoder`` to decode and
    augment the batch on the training device. With ``resampled`` the stream is endless (use
    ``.with_epoch(n)``). ``handler`` gets every error (default: raise).

    ``batches_per_rank`` (distributed training) fixes the epoch: each rank cycles through its own share
    of the shards (:func:`_cycle_rank_shards`) and its DataLoader workers together yield exactly that
    many full batches of ``batch_size`` (:func:`_worker_quota`), so every rank runs the same number of steps.
    """
    if (transform is None) != keep_encoded:
        raise ValueError("give a transform to decode in the loader, or keep_encoded=True without one")
    state = EpochSeed(seed)
    counts: dict[str, int] = {}
    if batches_per_rank is not None and resampled:
        raise ValueError("batches_per_rank cycles each rank's own shards; it does not resample")
    if resampled:
        shard_stages = [resample_shards(seed=state)]
    elif batches_per_rank is not None:
        shard_stages = [shuffle_shards(seed=state), cycle_rank_shards(seed=state)]
    else:
        shard_stages = [shuffle_shards(seed=state), wds.split_by_node, wds.split_by_worker]
    quota = [] if batches_per_rank is None else [worker_quota(batches=batches_per_rank, batch_size=batch_size)]
    return TrainPipeline(
        wds.SimpleShardList(_check_shards(shards)),
        *shard_stages,
        wds.tarfile_to_samples(handler=handler),
        select_in_place(handler),
        shuffle_samples(bufsize=shuffle_buffer, seed=state),
        decode(handler=handler, keep_encoded=keep_encoded),
        pick_caption(caption_vector, seed=state, counts=counts),
        to_train_tuple(transform, handler=handler, seed=state),
        *quota,
        seed_state=state,
        counts=counts,
    )


class EpochLoader(wds.WebLoader):
    """A ``WebLoader`` that starts epoch 0, 1, 2… of its pipeline on each pass."""

    def __init__(self, pipeline: wds.DataPipeline, **kwargs: Any) -> None:
        super().__init__(pipeline, **kwargs)
        self.train_pipeline = pipeline
        self.epoch = 0

    def __iter__(self) -> Iterator[Any]:
        if hasattr(self.train_pipeline, "set_epoch"):
            self.train_pipeline.set_epoch(self.epoch)
        self.epoch += 1
        return _one_line_errors(super().__iter__())


def _one_line_errors(batches: Iterator[Any]) -> Iterator[Any]:
    """Undo the traceback that DataLoader workers wrap around a ``DataError``: keep its one line."""
    try:
        yield from batches
    except DataError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) <= 1:
            raise
        raise DataError(re.sub(r"^[\w.]*DataError: ", "", lines[-1])) from exc


def collate_batch(samples: Sequence[tuple[Any, torch.Tensor, str]]) -> tuple[Any, torch.Tensor, list[str]]:
    """``(image, vector, key)`` tuples → ``(images (B, ...), vectors (B, D), keys list)``.

    Encoded images stay a list of ``EncodedImage`` (decoded per batch on the training device).
    """
    images, vectors, keys = zip(*samples)
    if isinstance(images[0], EncodedImage):
        return list(images), torch.stack(vectors), list(keys)
    return torch.utils.data.default_collate(list(images)), torch.stack(vectors), list(keys)


def make_loader(pipeline: wds.DataPipeline, batch_size: int, num_workers: int = 0) -> EpochLoader:
    """Batches ``(images (B, ...), vectors (B, D), keys list)``; each worker reads its own shards.

    Batches are built per worker (the last one of a worker may be short). Each pass over the
    loader is the next epoch of ``pipeline`` (fresh, reproducible shuffles). The loader draws its
    workers' base seed from a generator of its own, never from torch's global one, so starting an
    epoch leaves the training RNG (dropout) as it was: a resumed run draws what an uninterrupted one does.
    """
    return EpochLoader(
        pipeline, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_batch, persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )
