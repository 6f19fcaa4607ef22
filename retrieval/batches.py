"""Where a run's training batches come from: cached backbone features, or images streamed from the shards.

:func:`batch_source` chooses once per run. A frozen backbone with ``train.cache_features`` gives
:class:`CachedFeatureBatches`: the pooled features of every image are computed once and only the
projection trains (seconds on a CPU). Otherwise :class:`StreamedImageBatches` streams images from
the shards through the webdataset pipeline with augmentation, end to end. Both yield
``(inputs, caption vectors, labels)`` and know how the encoder consumes their inputs.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from retrieval.config import Config
from retrieval.data import make_loader, make_train_pipeline, read_shard_records
from retrieval.data.pipeline import error_handler
from retrieval.data.skips import SkippedItems
from retrieval.distributed import SINGLE_PROCESS, Distributed
from retrieval.embed import (
    EncodedCollection,
    caption_pairs,
    caption_vector_table,
    encode_shards,
    eval_transform,
    split_features,
)
from retrieval.errors import DataError
from retrieval.evaluation import image_labels
from retrieval.models import Backbone, ImageEncoder
from retrieval.transforms import BatchDecoder, resolve_decode_device, train_transform

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (inputs, caption vectors, labels)


@dataclass
class CaptionTargets:
    """The text side of training: every known training caption as a (vector, image) pair, and image labels."""

    vectors: torch.Tensor  # (M, D) float32 caption vectors
    owner: torch.Tensor  # (M,) the training image each caption describes
    labels: torch.Tensor  # (N,) per training image: its class on class data, else its own index
    encode_batch: Callable  # the caption encoder's, for batches that look captions up by text


def caption_targets(train_set: EncodedCollection, encode_batch: Callable) -> tuple[CaptionTargets, Any]:
    """The :class:`CaptionTargets` of a training collection, and the out-of-vocabulary stats of its captions."""
    vectors, owner, stats = caption_pairs(train_set.captions, encode_batch)
    targets = CaptionTargets(torch.from_numpy(np.ascontiguousarray(vectors)).float(), torch.from_numpy(owner).long(),
                             torch.from_numpy(image_labels(train_set.meta)), encode_batch)
    return targets, stats


class BatchSource(ABC):
    """One run's training data: the training images, their epochs of batches and the held-out embeddings."""

    train_set: EncodedCollection  # keys, captions and metadata of the training images (and features, when cached)

    @abstractmethod
    def batches(self, epoch: int, targets: CaptionTargets, start_batch: int = 0) -> Iterable[Batch]:
        """One epoch of ``(inputs, caption vectors, labels)``; ``epoch`` counts from 1.

        ``start_batch`` resumes an epoch: the batches from that one on, exactly as an uninterrupted epoch.
        """

    @abstractmethod
    def steps_per_epoch(self, targets: CaptionTargets) -> int:
        """Batches per epoch on each rank."""

    def random_state(self) -> torch.Tensor | None:
        """State of the source's own generator at an epoch's start, for resume (None: it has none)."""
        return None

    def set_random_state(self, state: torch.Tensor) -> None:  # noqa: B027 - sources without a generator keep none
        """Restore :meth:`random_state` before replaying an epoch."""

    @abstractmethod
    def embed(self, encoder: ImageEncoder, inputs: torch.Tensor) -> torch.Tensor:
        """The encoder's outputs for a batch of this source's inputs."""

    @abstractmethod
    def held_out(self, encoder: ImageEncoder, to_search_space: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, EncodedCollection]:
        """(search-space embeddings on the CPU, collection) of the held-out split, in shard order."""

    def threads(self, device: str) -> int:
        """Torch CPU threads for the run (default: torch's)."""
        return torch.get_num_threads()


class CachedFeatureBatches(BatchSource):
    """Pooled features of a frozen backbone, computed once per split (or read from the feature cache)."""

    def __init__(self, config: Config, backbone: Backbone, train_shards: list[str], val_shards: list[str],
                 device: str, progress: bool = True, skipped: SkippedItems | None = None,
                 place: Distributed = SINGLE_PROCESS) -> None:
        self.config, self.device, self.place = config, device, place
        handler = error_handler(skipped)
        self.generator = torch.Generator().manual_seed(config.train.seed)
        features = backbone.module.to(device).eval()
        self.train_set, self.val_set = (
            split_features(shards, split, features, model_config=config.model, image_size=config.data.image_size,
                           mean=backbone.mean, std=backbone.std, cache_dir=config.train.feature_cache_dir,
                           device=device, progress=progress, handler=handler)
            for split, shards in (("train", train_shards), ("val", val_shards)))

    def _epoch_pairs(self, targets: CaptionTargets) -> torch.Tensor:
        """This epoch's image–caption pairs (caption rows), shuffled; draws from the source's generator."""
        if self.config.train.captions_per_image == "all":
            pairs = torch.arange(len(targets.owner))
        else:  # one random known caption per image
            order = torch.randperm(len(targets.owner), generator=self.generator)
            _, first = np.unique(targets.owner[order].numpy(), return_index=True)
            pairs = order[torch.from_numpy(first)]
        return pairs[torch.randperm(len(pairs), generator=self.generator)]

    def steps_per_epoch(self, targets: CaptionTargets) -> int:
        """Batches per epoch (the same on every rank): global batches of ``world size × train.batch_size``."""
        pairs = len(targets.owner) if self.config.train.captions_per_image == "all" else len(targets.labels)
        return -(-pairs // (self.place.world_size * self.config.train.batch_size))

    def batches(self, epoch: int, targets: CaptionTargets, start_batch: int = 0) -> Iterator[Batch]:
        """(features, caption vectors, labels) over a shuffled epoch of image–caption pairs.

        Under N ranks each global batch of ``N × train.batch_size`` pairs is cut into N parts in rank
        order, so the ranks together see exactly the batches of one process with the global batch size.
        ``start_batch`` skips the first batches (resume mid-epoch); the shuffle is drawn all the same.
        """
        pairs = self._epoch_pairs(targets)
        global_batch = self.place.world_size * self.config.train.batch_size
        for start in range(start_batch * global_batch, len(pairs), global_batch):
            chosen = torch.tensor_split(pairs[start:start + global_batch], self.place.world_size)[self.place.rank]
            images = targets.owner[chosen]
            yield self.train_set.vectors[images], targets.vectors[chosen], targets.labels[images]

    def random_state(self) -> torch.Tensor:
        """The state of the generator that shuffles each epoch (saved at an epoch's start for resume)."""
        return self.generator.get_state()

    def set_random_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def embed(self, encoder: ImageEncoder, inputs: torch.Tensor) -> torch.Tensor:
        return encoder.embed_features(inputs)

    def held_out(self, encoder: ImageEncoder, to_search_space: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, EncodedCollection]:
        return to_search_space(self.embed(encoder, self.val_set.vectors.to(self.device))).cpu(), self.val_set

    def threads(self, device: str) -> int:
        # Projection-only epochs are tiny matrix products: one thread is faster than a thread team
        # (measured ~10x on a busy 2-core machine); end-to-end fine-tuning keeps every thread.
        return 1 if device == "cpu" else super().threads(device)


class StreamedImageBatches(BatchSource):
    """Augmented images streamed from the shards each epoch, for end-to-end fine-tuning.

    In one process an epoch is one pass over the shards, as the DataLoader's workers read them (a
    worker's last batch may be short). Under N ranks an epoch has a fixed length: every rank runs
    ``known images // (N × train.batch_size)`` full batches from its own share of the shards, which it
    cycles through (see :func:`retrieval.data.pipeline.make_train_pipeline`).
    """

    def __init__(self, config: Config, backbone: Backbone, train_shards: list[str], val_shards: list[str],
                 device: str, progress: bool = True, skipped: SkippedItems | None = None,
                 place: Distributed = SINGLE_PROCESS) -> None:
        self.config, self.device, self.progress, self.place = config, device, progress, place
        self.handler = error_handler(skipped)
        self.train_shards, self.val_shards = train_shards, val_shards
        self.mean, self.std = backbone.mean, backbone.std
        records = read_shard_records(train_shards, self.handler)
        self.train_set = EncodedCollection(torch.zeros(len(records), 0), [r["key"] for r in records],
                                           [r["captions"] for r in records], [r.get("meta", {}) for r in records])
        self._vector_table: dict | None = None

    def _caption_vectors(self, targets: CaptionTargets) -> dict:
        """Caption text → vector for every training caption with a known vector (built once)."""
        if self._vector_table is None:
            self._vector_table = caption_vector_table(self.train_set.captions, targets.encode_batch)
        return self._vector_table

    def steps_per_epoch(self, targets: CaptionTargets) -> int:
        table = self._caption_vectors(targets)
        usable = sum(any(caption in table for caption in captions) for captions in self.train_set.captions)
        batch_size = self.config.train.batch_size
        if not self.place.active:  # one pass; a worker's last batch may be short, so this is the usual count
            return max(1, -(-usable // batch_size))
        steps = usable // (self.place.world_size * batch_size)
        if steps < 1:
            raise DataError(f"{usable} training images with known captions in {self.config.data.shard_dir} do not fill "
                            f"one batch of {batch_size} on each of {self.place.world_size} processes; lower "
                            "train.batch_size or use fewer processes")
        return steps

    def batches(self, epoch: int, targets: CaptionTargets, start_batch: int = 0) -> Iterable[Batch]:
        """(images, caption vectors, labels) streamed from the shards with augmentation (the loop's log shows the
        epoch's progress). ``start_batch`` k: the epoch is read again from its start and its first k batches are
        passed over after decoding (every sample's crop depends only on its seed, epoch and key, so the batches
        from k on are those of an uninterrupted epoch)."""
        return itertools.islice(self._stream(epoch, targets), start_batch, None)

    def _stream(self, epoch: int, targets: CaptionTargets) -> Iterator[Batch]:
        table = self._caption_vectors(targets)
        index_of = {key: i for i, key in enumerate(self.train_set.keys)}
        train = self.config.train
        augment = train_transform(self.config.data.image_size, self.mean, self.std)
        decode_device = resolve_decode_device(self.config.data.decode_device, self.device)  # None: in the loader
        fixed = self.steps_per_epoch(targets) if self.place.active else None
        pipeline = make_train_pipeline(self.train_shards, transform=None if decode_device else augment,
                                       keep_encoded=decode_device is not None, caption_vector=table.get,
                                       shuffle_buffer=train.shuffle_buffer, seed=train.seed + epoch - 1,
                                       handler=self.handler, batches_per_rank=fixed, batch_size=train.batch_size)
        loader = make_loader(pipeline, train.batch_size, self.config.data.num_workers)
        to_images = BatchDecoder(augment, decode_device or "cpu", self.handler)  # decodes encoded batches there
        for images, vectors, keys in map(to_images, loader):
            yield images, vectors, targets.labels[torch.tensor([index_of[k] for k in keys])]

    def embed(self, encoder: ImageEncoder, inputs: torch.Tensor) -> torch.Tensor:
        return encoder(inputs)

    def held_out(self, encoder: ImageEncoder, to_search_space: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, EncodedCollection]:
        transform = eval_transform(self.config.data.image_size, self.mean, self.std)
        collection = encode_shards(self.val_shards, lambda images: to_search_space(self.embed(encoder, images)),
                                   transform, device=self.device, desc="encoding val images", progress=self.progress,
                                   handler=self.handler)
        return collection.vectors, collection


def batch_source(config: Config, backbone: Backbone, train_shards: list[str], val_shards: list[str], device: str,
                 progress: bool = True, skipped: SkippedItems | None = None,
                 place: Distributed = SINGLE_PROCESS) -> BatchSource:
    """Cached features for a frozen backbone with ``train.cache_features``, else streamed images.

    ``skipped`` (the ``data.on_error: skip`` policy) collects the bad samples and shards passed over; None raises.
    """
    if config.model.freeze_backbone and config.train.cache_features:
        return CachedFeatureBatches(config, backbone, train_shards, val_shards, device, progress, skipped, place)
    return StreamedImageBatches(config, backbone, train_shards, val_shards, device, progress, skipped, place)
