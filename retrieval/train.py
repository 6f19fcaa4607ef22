"""The training loop as a library function: ``fit(config) -> TrainResult``.

Two paths share one loop: with a frozen backbone and ``train.cache_features`` the pooled features
of every image are computed once and only the projection trains (seconds on a CPU); otherwise
images stream from the shards through the webdataset pipeline with augmentation, end to end.
"""

from __future__ import annotations

import contextlib
import csv
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from retrieval.checkpoint import loss_kwargs, save_checkpoint
from retrieval.config import Config, save_config
from retrieval.data import list_shards, make_loader, make_train_pipeline
from retrieval.embed import (EncodedCollection, caption_pairs, encode_shards, eval_transform, split_features,
                             train_transform)
from retrieval.errors import DataError
from retrieval.evaluation import cross_modal_report, image_classes, relevance
from retrieval.io import atomic_path
from retrieval.losses import LOSSES, create_loss
from retrieval.models import BACKBONES, ImageEncoder, create_backbone
from retrieval.negatives import NEGATIVE_SAMPLERS
from retrieval.targets import build_caption_encoder


@dataclass
class EpochStats:
    """What one epoch did: the loss signals, and held-out retrieval when it was evaluated."""

    epoch: int
    loss: float
    active_fraction: float
    mean_pos_distance: float
    mean_neg_distance: float
    seconds: float
    metrics: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    """Where the run lives and how it went."""

    run_dir: Path
    history: list[EpochStats]
    initial_metrics: dict
    final_metrics: dict
    best_metrics: dict
    best_checkpoint: Path
    last_checkpoint: Path
    seconds: float


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; make CPU kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str) -> str:
    """``auto`` → cuda when visible, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def read_shard_records(shards: list[str]) -> list[dict]:
    """Keys, captions and metadata of every sample, without decoding images."""
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False).to_tuple("__key__", "json")
    return [{"key": key, **json.loads(payload)} for key, payload in dataset]


def check_names(config: Config) -> None:
    """Fail fast, before any data is read, on a loss, negative sampler or backbone name that does not exist."""
    LOSSES.get(config.loss.name)
    NEGATIVE_SAMPLERS.get(config.loss.negatives)
    BACKBONES.get(config.model.backbone)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` torch CPU threads, restoring the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rsum(metrics: dict) -> float:
    """Sum of all R@K in both directions: the usual single number for model selection."""
    return float(sum(v for k, v in metrics.items() if "R@" in k))


class Trainer:
    """Holds the state of one run; :func:`fit` is the entry point."""

    def __init__(self, config: Config, progress: bool = True) -> None:
        check_names(config)
        self.config = config
        self.progress = progress
        self.device = resolve_device(config.train.device)
        self.run_dir = Path(config.train.run_dir)
        self.train_shards = list_shards(config.data.shard_dir, "train")
        self.val_shards = list_shards(config.data.shard_dir, "val")
        self.backbone = create_backbone(config.model.backbone, config.model.weights)
        self.cached = config.model.freeze_backbone and config.train.cache_features
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self._val_captions: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._load_collections()
        self._build_text_side()
        self._build_model()

    # -- setup -------------------------------------------------------------------------------
    def _load_collections(self) -> None:
        image_size = self.config.data.image_size
        self.eval_tf = eval_transform(image_size, self.backbone.mean, self.backbone.std)
        if self.cached:
            self.train_set = self._features("train", self.train_shards)
            self.val_set = self._features("val", self.val_shards)
        else:
            records = read_shard_records(self.train_shards)
            self.train_set = EncodedCollection(torch.zeros(len(records), 0), [r["key"] for r in records],
                                               [r["captions"] for r in records], [r.get("meta", {}) for r in records])
            self.val_set = None
        if not self.train_set.keys:
            raise DataError(f"no training images in {self.config.data.shard_dir}")

    def _features(self, split: str, shards: list[str]) -> EncodedCollection:
        """Backbone features of a split, from the on-disk cache when one is configured and current."""
        return split_features(shards, split, self.backbone.module.to(self.device).eval(),
                              model_config=self.config.model, image_size=self.config.data.image_size,
                              mean=self.backbone.mean, std=self.backbone.std,
                              cache_dir=self.config.train.feature_cache_dir, device=self.device,
                              progress=self.progress)

    def _build_text_side(self) -> None:
        train_captions = [c for captions in self.train_set.captions for c in captions]
        self.caption_encoder = build_caption_encoder(self.config.text, self.run_dir, train_captions)
        vectors, owner, stats = caption_pairs(self.train_set.captions, self.caption_encoder.encode_batch)
        tqdm.write(f"train captions: {stats.summary()}")
        self.train_vectors = torch.from_numpy(np.ascontiguousarray(vectors)).float()
        self.train_owner = torch.from_numpy(owner).long()
        self.classes = image_classes(self.train_set.meta)
        self.num_classes = int(self.classes.max()) + 1 if self.classes is not None else None

    def _build_model(self) -> None:
        model = self.config.model
        self.encoder = ImageEncoder(self.backbone, self.caption_encoder.dim, model.projection, model.hidden_dim,
                                    model.dropout, model.freeze_backbone, model.normalize_output).to(self.device)
        self.loss = create_loss(self.config.loss.name, **loss_kwargs(self.config, self.num_classes)).to(self.device)
        self.loss.prepare(self.train_vectors.to(self.device))
        parameters = [p for p in list(self.encoder.parameters()) + list(self.loss.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameters, lr=self.config.train.lr,
                                           weight_decay=self.config.train.weight_decay)
        self.metric = self.loss.search_metric

    # -- batches -----------------------------------------------------------------------------
    def _labels_for(self, image_index: torch.Tensor) -> torch.Tensor:
        if self.classes is not None:
            return torch.from_numpy(self.classes)[image_index]
        return image_index

    def _cached_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(features, caption vectors, labels) over a shuffled epoch of image–caption pairs."""
        if self.config.train.captions_per_image == "all":
            pairs = torch.arange(len(self.train_owner))
        else:  # one random known caption per image
            order = torch.randperm(len(self.train_owner), generator=self.generator)
            _, first = np.unique(self.train_owner[order].numpy(), return_index=True)
            pairs = order[torch.from_numpy(first)]
        pairs = pairs[torch.randperm(len(pairs), generator=self.generator)]
        for start in range(0, len(pairs), self.config.train.batch_size):
            chosen = pairs[start:start + self.config.train.batch_size]
            images = self.train_owner[chosen]
            yield self.train_set.vectors[images], self.train_vectors[chosen], self._labels_for(images)

    def _streamed_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, caption vectors, labels) streamed from the shards with augmentation."""
        flat = sorted({caption for captions in self.train_set.captions for caption in captions})
        vectors, known, _ = self.caption_encoder.encode_batch(flat)
        table = {c: v for c, v, ok in zip(flat, vectors, known) if ok}
        index_of = {key: i for i, key in enumerate(self.train_set.keys)}
        transform = train_transform(self.config.data.image_size, self.backbone.mean, self.backbone.std)
        pipeline = make_train_pipeline(self.train_shards, transform=transform, caption_vector=table.get,
                                       shuffle_buffer=self.config.train.shuffle_buffer,
                                       seed=self.config.train.seed + len(self.history))
        loader = make_loader(pipeline, self.config.train.batch_size, self.config.data.num_workers)
        for images, vectors, keys in loader:
            index = torch.tensor([index_of[k] for k in keys])
            yield images, vectors, self._labels_for(index)

    # -- one epoch, evaluation, checkpoints --------------------------------------------------
    def train_epoch(self, epoch: int) -> EpochStats:
        self.encoder.train()
        if hasattr(self.loss, "refresh_bank") and epoch > 1:  # offline negatives: a new bank each epoch
            self.loss.refresh_bank()
        start, totals, count = time.perf_counter(), np.zeros(4), 0
        batches = self._cached_batches() if self.cached else self._streamed_batches()
        if not self.cached:  # streamed epochs are long enough to deserve their own bar
            batches = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not self.progress)
        for inputs, targets, labels in batches:
            inputs, targets, labels = inputs.to(self.device), targets.to(self.device), labels.to(self.device)
            outputs = self.encoder.embed_features(inputs) if self.cached else self.encoder(inputs)
            result = self.loss(outputs, targets, labels)
            self.optimizer.zero_grad(set_to_none=True)
            result.value.backward()
            self.optimizer.step()
            totals += [float(result.value.detach()), result.active_fraction, result.mean_pos_distance, result.mean_neg_distance]
            count += 1
        if count == 0:
            raise DataError(f"epoch {epoch} saw no training batch; check {self.config.data.shard_dir}")
        mean = totals / count
        return EpochStats(epoch, *mean.tolist(), seconds=time.perf_counter() - start)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out text→image and image→text R@K on the val split."""
        self.encoder.eval()
        if self.cached:
            embeddings = self.loss.embed(self.encoder.embed_features(self.val_set.vectors.to(self.device))).cpu()
            collection = self.val_set
        else:
            collection = encode_shards(self.val_shards, lambda x: self.loss.embed(self.encoder(x)), self.eval_tf,
                                       device=self.device, desc="encoding val images", progress=self.progress)
            embeddings = collection.vectors
        captions, owner, image_labels = self._held_out_captions(collection)
        return cross_modal_report(embeddings.numpy(), captions, owner, image_labels, self.config.train.ks, self.metric)

    def _held_out_captions(self, collection: EncodedCollection) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Val caption vectors with their relevance labels, encoded once per run (they are frozen)."""
        if self._val_captions is None:
            captions, owner, _ = caption_pairs(collection.captions, self.caption_encoder.encode_batch)
            caption_labels, image_labels, _ = relevance(collection.meta, owner)
            self._val_captions = (captions, caption_labels, image_labels)
        return self._val_captions

    def save(self, name: str, epoch: int, metrics: dict) -> Path:
        path = self.run_dir / "checkpoints" / name
        save_checkpoint(path, config=self.config, encoder=self.encoder, loss=self.loss,
                        caption_encoder=self.caption_encoder,
                        epoch=epoch, metrics=metrics, num_classes=self.num_classes)
        return path

    def write_history(self, history: list[EpochStats]) -> None:
        """metrics.csv: one row per epoch (rewritten atomically each epoch)."""
        metric_names = sorted({name for stats in history for name in stats.metrics})
        columns = ["epoch", "loss", "active_fraction", "mean_pos_distance", "mean_neg_distance", "seconds"]
        with atomic_path(self.run_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns + metric_names)
            for stats in history:
                writer.writerow([getattr(stats, c) for c in columns] + [stats.metrics.get(m, "") for m in metric_names])

    def run(self) -> TrainResult:
        # Projection-only epochs are tiny matrix products: one thread is faster than a thread team
        # (measured ~10x on a busy 2-core machine); end-to-end fine-tuning keeps every thread.
        threads = 1 if self.cached and self.device == "cpu" else torch.get_num_threads()
        with torch_threads(threads):
            return self._run()

    def _run(self) -> TrainResult:
        started = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.run_dir / "config.yaml")
        self.history: list[EpochStats] = []
        initial = self.evaluate()
        best_score, best_metrics = -1.0, initial
        epochs = self.config.train.epochs
        bar = tqdm(range(1, epochs + 1), desc="training", unit="epoch", disable=not self.progress)
        for epoch in bar:
            stats = self.train_epoch(epoch)
            if epoch % self.config.train.eval_every == 0 or epoch == epochs:
                stats.metrics = self.evaluate()
                if rsum(stats.metrics) > best_score:
                    best_score, best_metrics = rsum(stats.metrics), stats.metrics
                    self.save("best.pt", epoch, stats.metrics)
            self.history.append(stats)
            self.write_history(self.history)
            bar.set_postfix(loss=f"{stats.loss:.3f}", active=f"{stats.active_fraction:.2f}",
                            **({"t2i_R@5": f"{stats.metrics.get('text_to_image/R@5', 0):.2f}"} if stats.metrics else {}))
        last = self.save("last.pt", epochs, self.history[-1].metrics if self.history else initial)
        return TrainResult(self.run_dir, self.history, initial, self.history[-1].metrics if self.history else initial,
                           best_metrics, self.run_dir / "checkpoints" / "best.pt", last,
                           time.perf_counter() - started)


def fit(config: Config, progress: bool = True) -> TrainResult:
    """Train an image encoder against frozen caption vectors as ``config`` says; returns the run."""
    seed_everything(config.train.seed)
    return Trainer(config, progress=progress).run()
