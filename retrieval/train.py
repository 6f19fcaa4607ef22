"""The training loop as a library function: ``fit(config) -> TrainResult``.

Where the batches come from (cached backbone features or images streamed from the shards) is a
:mod:`retrieval.batches` source chosen once per run; the loop itself is the same for both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval.batches import batch_source, caption_targets
from retrieval.checkpoint import save_checkpoint
from retrieval.config import Config, check_ranges, save_config
from retrieval.data import list_shards
from retrieval.data.skips import SkippedItems, skipped_summary
from retrieval.embed import EncodedCollection
from retrieval.errors import ConfigError, DataError
from retrieval.evaluation import CaptionQueries, caption_queries, class_count, cross_modal_report
from retrieval.losses import LOSSES, build_loss
from retrieval.models import BACKBONES, ImageEncoder, create_backbone
from retrieval.rundir import BEST_CHECKPOINT, LAST_CHECKPOINT, RunDir
from retrieval.runtime import resolve_device, seed_everything, torch_threads
from retrieval.targets import build_caption_encoder
from retrieval.training_log import EpochStats, write_history


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


def check_names(config: Config) -> None:
    """Fail fast, before any data is read, on a loss or backbone name that does not exist."""
    LOSSES.get(config.loss.name)  # its settings were checked when the config was loaded
    BACKBONES.get(config.model.backbone)


def rsum(metrics: dict) -> float:
    """Sum of all R@K in both directions: the usual single number for model selection."""
    return float(sum(v for k, v in metrics.items() if "R@" in k))


def refuse_existing_run(run_dir: RunDir, overwrite: bool = False) -> None:
    """A folder that already holds a run is refused (one line naming the choices), unless ``overwrite``."""
    if run_dir.holds_run() and not overwrite:
        found = ", ".join(str(path.relative_to(run_dir.path)) for path in run_dir.run_files()[:3])
        raise ConfigError(f"train.run_dir {run_dir} already holds a run ({found}); "
                          "set a new train.run_dir, or pass --overwrite to replace it")


class Trainer:
    """Holds the state of one run; :func:`fit` is the entry point."""

    def __init__(self, config: Config, progress: bool = True, overwrite: bool = False) -> None:
        check_ranges(config)
        check_names(config)
        self.config = config
        self.progress = progress
        self.device = resolve_device(config.train.device)
        self.run_dir = RunDir(config.train.run_dir)
        refuse_existing_run(self.run_dir, overwrite)
        train_shards = list_shards(config.data.shard_dir, "train")
        val_shards = list_shards(config.data.shard_dir, "val")
        self.backbone = create_backbone(config.model.backbone, config.model.weights)
        self.skipped = SkippedItems(warn=True) if config.data.on_error == "skip" else None
        self.source = batch_source(config, self.backbone, train_shards, val_shards, self.device, progress,
                                   self.skipped)
        if not self.source.train_set.keys:
            raise DataError(f"no training images in {config.data.shard_dir}")
        if overwrite:
            # the data has been read: the old run goes now (only its own files), before the text side
            # could reuse its word2vec-captions vectors
            self.run_dir.clear()
        self._val_captions: CaptionQueries | None = None
        self._build_text_side()
        self._build_model()

    # -- setup -------------------------------------------------------------------------------
    def _build_text_side(self) -> None:
        train_set = self.source.train_set
        train_captions = [c for captions in train_set.captions for c in captions]
        self.caption_encoder = build_caption_encoder(self.config.text, self.run_dir, train_captions)
        self.targets, stats = caption_targets(train_set, self.caption_encoder.encode_batch)
        tqdm.write(f"train captions: {stats.summary()}")
        self.num_classes = class_count(train_set.meta)

    def _build_model(self) -> None:
        model = self.config.model
        self.encoder = ImageEncoder(self.backbone, self.caption_encoder.dim, model.projection, model.hidden_dim,
                                    model.dropout, model.freeze_backbone, model.normalize_output).to(self.device)
        self.loss = build_loss(self.config.loss, seed=self.config.train.seed, num_classes=self.num_classes,
                               embedding_dim=self.caption_encoder.dim).to(self.device)
        self.loss.prepare(self.targets.vectors.to(self.device))
        parameters = [p for p in list(self.encoder.parameters()) + list(self.loss.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameters, lr=self.config.train.lr,
                                           weight_decay=self.config.train.weight_decay)

    # -- one epoch, evaluation, checkpoints --------------------------------------------------
    def train_epoch(self, epoch: int) -> EpochStats:
        self.encoder.train()
        self.loss.on_epoch_start(epoch)
        start, totals, count = time.perf_counter(), np.zeros(4), 0
        for inputs, targets, labels in self.source.batches(epoch, self.targets):
            inputs, targets, labels = inputs.to(self.device), targets.to(self.device), labels.to(self.device)
            outputs = self.source.embed(self.encoder, inputs)
            result = self.loss(outputs, targets, labels)
            self.optimizer.zero_grad(set_to_none=True)
            result.value.backward()
            self.optimizer.step()
            totals += [float(result.value.detach()), result.active_fraction, result.mean_pos_distance,
                       result.mean_neg_distance]
            count += 1
        if count == 0:
            raise DataError(f"epoch {epoch} saw no training batch; check {self.config.data.shard_dir}")
        mean = totals / count
        return EpochStats(epoch, *mean.tolist(), seconds=time.perf_counter() - start)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out text→image and image→text R@K on the val split."""
        self.encoder.eval()
        embeddings, collection = self.source.held_out(self.encoder, self.loss.embed)
        queries = self._held_out_captions(collection)
        return cross_modal_report(embeddings.numpy(), queries.vectors, queries.caption_labels, queries.image_labels,
                                  self.config.train.ks, self.loss.distance)

    def _held_out_captions(self, collection: EncodedCollection) -> CaptionQueries:
        """Val caption vectors with their relevance labels, encoded once per run (they are frozen)."""
        if self._val_captions is None:
            self._val_captions = caption_queries(collection.captions, collection.meta,
                                                 self.caption_encoder.encode_batch)
        return self._val_captions

    def save(self, name: str, epoch: int, metrics: dict) -> Path:
        path = self.run_dir.checkpoint(name)
        save_checkpoint(path, config=self.config, encoder=self.encoder, loss=self.loss,
                        caption_encoder=self.caption_encoder,
                        epoch=epoch, metrics=metrics, num_classes=self.num_classes)
        return path

    def run(self) -> TrainResult:
        with torch_threads(self.source.threads(self.device)):
            return self._run()

    def _run(self) -> TrainResult:
        started = time.perf_counter()
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.run_dir.config_file)
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
                    self.save(BEST_CHECKPOINT, epoch, stats.metrics)
            self.history.append(stats)
            write_history(self.run_dir.metrics_file, self.history)
            bar.set_postfix(loss=f"{stats.loss:.3f}", active=f"{stats.active_fraction:.2f}",
                            **({"t2i_R@5": f"{stats.metrics.get('text_to_image/R@5', 0):.2f}"}
                               if stats.metrics else {}))
        last = self.save(LAST_CHECKPOINT, epochs, self.history[-1].metrics if self.history else initial)
        if self.skipped is not None:
            tqdm.write(f"data.on_error=skip: {skipped_summary(self.skipped.counts())}")
        return TrainResult(self.run_dir.path, self.history, initial,
                           self.history[-1].metrics if self.history else initial,
                           best_metrics, self.run_dir.checkpoint(BEST_CHECKPOINT), last,
                           time.perf_counter() - started)


def fit(config: Config, progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train an image encoder against frozen caption vectors as ``config`` says; returns the run.

    A ``train.run_dir`` that already holds a run is refused (ConfigError), unless ``overwrite`` clears its old
    run first.
    """
    seed_everything(config.train.seed)
    return Trainer(config, progress=progress, overwrite=overwrite).run()
