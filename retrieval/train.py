"""The training loop as a library function: ``fit(config) -> TrainResult``.

Where the batches come from (cached backbone features or images streamed from the shards) is a
:mod:`retrieval.batches` source chosen once per run; the loop itself is the same for both.

Under ``torchrun`` the same loop runs in every process with DistributedDataParallel
(:mod:`retrieval.distributed`): each rank trains on its part of every global batch, the loss sees
the embeddings and captions of all ranks, and rank 0 alone evaluates, logs and writes files.
A training state (model, optimizer, schedule, gradient scaler, every RNG state, epoch and step) is
written every ``train.checkpoint_every`` optimizer steps and at each epoch's end; ``resume=True``
continues a stopped run from it, exactly as if it had not stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from retrieval.batches import BatchSource, batch_source, caption_targets
from retrieval.checkpoint import check_vectors, read_training_state, save_checkpoint, upgrade_saved_config
from retrieval.collapse import MOMENT_DTYPE, CollapseAlarm, Spread, embedding_moments
from retrieval.config import Config, check_ranges, config_to_dict, save_config
from retrieval.data import list_shards
from retrieval.data.skips import SkippedItems, skipped_summary
from retrieval.distributed import Distributed, join_process_group
from retrieval.embed import EncodedCollection
from retrieval.errors import ConfigError, DataError
from retrieval.evaluation import CaptionQueries, caption_queries, class_count, cross_modal_report
from retrieval.losses import LOSSES, CrossModalLoss, LossOutput, build_loss
from retrieval.models import BACKBONES, ImageEncoder, create_backbone
from retrieval.optimization import Optimization, check_precision
from retrieval.progress import write_line
from retrieval.rundir import BEST_CHECKPOINT, LAST_CHECKPOINT, RunDir
from retrieval.runtime import resolve_device, seed_everything, torch_threads
from retrieval.targets import build_caption_encoder
from retrieval.training_log import EpochStats, TrainingLog, check_tensorboard

# settings that may differ when a run is resumed: where it runs, not what it computes
RESUMABLE_CHANGES = ("train.device", "train.feature_cache_dir", "train.tensorboard", "train.collapse_patience",
                     "train.collapse_min_active", "train.collapse_min_spread_ratio")


@dataclass
class TrainResult:
    """Where the run lives and how it went (on rank 0; other ranks get empty metrics)."""

    run_dir: Path
    history: list[EpochStats]
    initial_metrics: dict
    final_metrics: dict
    best_metrics: dict
    best_checkpoint: Path
    last_checkpoint: Path
    seconds: float
    warnings: list[str] = field(default_factory=list)  # the collapse alarm's, one line each


@dataclass
class Position:
    """Where training stands: the next epoch to run, batches of it already done, optimizer steps so far."""

    epoch: int = 1
    batch: int = 0
    step: int = 0


@dataclass
class EpochProgress:
    """Running sums of an epoch's loss signals (kept in the training state: a resumed epoch averages all of it).

    ``counts``: the batches each signal was defined in (a mean distance is NaN in a batch without such
    pairs, e.g. no negative pair: that batch is left out of that distance's average); None in states
    saved before it was kept, where every batch counted. ``moments``: the image embeddings' summed
    :func:`~retrieval.collapse.embedding_moments` (the epoch's spread); summed on the device between
    :meth:`sync` calls, so a step costs no extra device sync.
    """

    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    batches: int = 0
    seconds: float = 0.0
    counts: list[int] | None = None
    moments: list[float] | None = None

    def __post_init__(self) -> None:
        self._moments: torch.Tensor | None = None

    def add(self, result: LossOutput) -> float:
        """Count one batch; returns its loss value (a device sync)."""
        loss = float(result.value.detach())
        values = (loss, result.active_fraction, result.mean_pos_distance, result.mean_neg_distance)
        counts = self.counts if self.counts is not None else [self.batches] * len(values)
        defined = [True, True] + [not math.isnan(value) for value in values[2:]]  # a NaN loss stays visible
        self.sums = [total + value if ok else total for total, value, ok in zip(self.sums, values, defined)]
        self.counts = [count + ok for count, ok in zip(counts, defined)]
        self.batches += 1
        if result.embedding_moments is not None:
            if self._moments is None:
                self._moments = (result.embedding_moments.clone() if self.moments is None else
                                 torch.tensor(self.moments, dtype=MOMENT_DTYPE, device=result.embedding_moments.device)
                                 + result.embedding_moments)
            else:
                self._moments += result.embedding_moments
        return loss

    def sync(self) -> EpochProgress:
        """Bring the device-side moment sums into ``moments`` (before the state is saved or read)."""
        if self._moments is not None:
            self.moments, self._moments = self._moments.tolist(), None
        return self

    def stats(self, epoch: int) -> EpochStats:
        counts = self.counts if self.counts is not None else [self.batches] * len(self.sums)
        means = [total / count if count else float("nan") for total, count in zip(self.sums, counts)]
        spread = Spread.of(self.sync().moments)
        return EpochStats(epoch, *means, seconds=self.seconds, embedding_spread=spread.embedding_spread,
                          dimension_variance=spread.dimension_variance)


def check_names(config: Config) -> None:
    """Fail fast, before any data is read, on a loss or backbone name that does not exist."""
    LOSSES.get(config.loss.name)  # its settings were checked when the config was loaded
    BACKBONES.get(config.model.backbone)
    check_tensorboard(config)


def rsum(metrics: dict) -> float:
    """Sum of all R@K in both directions: the usual single number for model selection."""
    return float(sum(v for k, v in metrics.items() if "R@" in k))


def refuse_existing_run(run_dir: RunDir, overwrite: bool = False) -> None:
    """A folder that already holds a run is refused (one line naming the choices), unless ``overwrite``."""
    if run_dir.holds_run() and not overwrite:
        found = ", ".join(str(path.relative_to(run_dir.path)) for path in run_dir.run_files()[:3])
        raise ConfigError(f"train.run_dir {run_dir} already holds a run ({found}); pass --resume to continue it "
                          "from its last checkpoint, set a new train.run_dir, or pass --overwrite to replace it")


def config_changes(saved: dict, config: Config) -> list[str]:
    """The ``section.field`` names whose values differ between a saved config (as a dict) and ``config``."""
    current = config_to_dict(config)
    return [f"{section}.{name}" for section in sorted(set(saved) | set(current))
            for name in sorted(set(saved.get(section) or {}) | set(current.get(section) or {}))
            if (saved.get(section) or {}).get(name) != (current.get(section) or {}).get(name)]


def read_resume_state(run_dir: RunDir, config: Config, device: str) -> dict:
    """The training state to resume from; refused in one line when there is none or the config changed."""
    if not run_dir.training_state.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no training state ({run_dir.training_state.name}) to continue; "
                          "train without --resume")
    state = read_training_state(run_dir.training_state, device)
    changed = [name for name in config_changes(upgrade_saved_config(state["config"]), config)
               if name not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(f"--resume: the config differs from the run's in {', '.join(changed[:5])}; resume with "
                          f"the run's own config ({run_dir.config_file}) or start a new train.run_dir")
    if state["training"]["complete"]:
        raise ConfigError(f"--resume: the run in {run_dir} already finished all {config.train.epochs} epochs")
    return state


class GlobalBatchLoss(nn.Module):
    """Encoder forward, then the loss over the global batch: what DistributedDataParallel wraps.

    Outputs, caption vectors and labels of all ranks are gathered (the local outputs keep their
    gradient), so negatives and in-batch miners choose among every rank's captions.
    """

    def __init__(self, encoder: ImageEncoder, loss: CrossModalLoss, source: BatchSource, place: Distributed) -> None:
        super().__init__()
        self.encoder, self.loss = encoder, loss
        self.source, self.place = source, place

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        outputs = self.source.embed(self.encoder, inputs)  # under train.precision's autocast
        with torch.autocast(device_type=outputs.device.type, enabled=False):  # the loss itself in float32
            gathered = self.place.gather(outputs.float())
            result = self.loss(gathered, self.place.gather(targets), self.place.gather(labels))
        return dataclasses.replace(result, embedding_moments=embedding_moments(
            self.loss.outputs_to_embedding(gathered.detach())))


def _numpy_state() -> dict:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["position"],
                         state["has_gauss"], state["cached_gaussian"]))


class Trainer:
    """Holds the state of one run; :func:`fit` is the entry point."""

    def __init__(self, config: Config, progress: bool = True, overwrite: bool = False, resume: bool = False) -> None:
        check_ranges(config)
        check_names(config)
        if overwrite and resume:
            raise ConfigError("--resume continues the run in train.run_dir and --overwrite replaces it; pass one")
        self.config = config
        self.place, self.device = join_process_group(resolve_device(config.train.device))
        check_precision(config.train.precision, self.device)
        self.progress = progress and self.place.is_main
        self.run_dir = RunDir(config.train.run_dir)
        self.saved_state = read_resume_state(self.run_dir, config, self.device) if resume else None
        if not resume:
            refuse_existing_run(self.run_dir, overwrite)
        self.place.barrier()  # every rank has looked at the folder before rank 0 changes it
        train_shards = list_shards(config.data, "train")
        val_shards = list_shards(config.data, "val")
        with self.place.main_first():  # weights missing from the cache are downloaded once, by rank 0
            self.backbone = create_backbone(config.model.backbone, config.model.weights)
        self.skipped = SkippedItems(warn=True) if config.data.on_error == "skip" else None
        # features cached on disk are written once, by rank 0, and read by the others
        with self.place.main_first() if config.train.feature_cache_dir else contextlib.nullcontext():
            self.source = batch_source(config, self.backbone, train_shards, val_shards, self.device, self.progress,
                                       self.skipped, self.place)
        if not self.source.train_set.keys:
            raise DataError(f"no training images in {config.data.shard_dir}")
        if overwrite and self.place.is_main:
            # the data has been read: the old run goes now (only its own files), before the text side
            # could reuse its word2vec-captions vectors
            self.run_dir.clear()
        self._val_captions: CaptionQueries | None = None
        with self.place.main_first():  # word2vec-captions trains and saves its vectors on rank 0 first
            self._build_text_side()
        self._build_model()
        self.steps_per_epoch = self.source.steps_per_epoch(self.targets)
        # an epoch's last batch closes its accumulation cycle: ceil(batches / accumulation) steps per epoch
        total_steps = -(-self.steps_per_epoch // config.train.grad_accumulation) * config.train.epochs
        self.optimization = Optimization(config.train, self.encoder, self.loss, self.device, total_steps)
        if self.saved_state is not None:
            self._restore_model(self.saved_state)
        self.encoder = self.optimization.prepare_model(self.encoder)
        self.training_loss: nn.Module = GlobalBatchLoss(self.encoder, self.loss, self.source, self.place)
        if self.place.active and any(p.requires_grad for p in self.training_loss.parameters()):
            self.training_loss = DistributedDataParallel(self.training_loss)
        resume_step = self.saved_state["training"]["position"]["step"] if self.saved_state else None
        self.log = TrainingLog(self.run_dir, enabled=self.place.is_main, progress=self.progress,
                               tensorboard=config.train.tensorboard, resume_step=resume_step,
                               epochs=config.train.epochs)

    # -- setup -------------------------------------------------------------------------------
    def _build_text_side(self) -> None:
        train_set = self.source.train_set
        train_captions = [c for captions in train_set.captions for c in captions]
        self.caption_encoder = build_caption_encoder(self.config.text, self.run_dir, train_captions)
        self.targets, stats = caption_targets(train_set, self.caption_encoder.encode_batch)
        if self.place.is_main:
            write_line(f"train captions: {stats.summary()}")
        self.num_classes = class_count(train_set.meta)

    def _build_model(self) -> None:
        model = self.config.model
        self.encoder = ImageEncoder(self.backbone, self.caption_encoder.dim, model.projection, model.hidden_dim,
                                    model.dropout, model.freeze_backbone, model.normalize_output).to(self.device)
        self.loss = build_loss(self.config.loss, seed=self.config.train.seed, num_classes=self.num_classes,
                               embedding_dim=self.caption_encoder.dim).to(self.device)
        self.loss.prepare(self.targets.vectors.to(self.device))

    def _restore_model(self, state: dict) -> None:
        """Weights and optimizer of a saved training state (RNG states and position come in :meth:`_run`)."""
        check_vectors(self.caption_encoder, state["vectors_fingerprint"], self.config.text, self.run_dir)
        self.encoder.load_state_dict(state["encoder"])
        self.loss.load_state_dict(state["loss"])
        self.optimization.load_state_dict(state["training"]["optimization"])

    # -- random state, for exact resume ------------------------------------------------------
    def _random_state(self) -> dict:
        """Every generator this rank draws from: torch (CPU and CUDA), numpy, python, the loss's and the source's."""
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": _numpy_state(),
                                 "python": [list(item) if isinstance(item, tuple) else item
                                            for item in random.getstate()]}
        if torch.device(self.device).type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(torch.device(self.device))
        return {**state, **self._own_generators()}

    def _set_random_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        _set_numpy_state(state["numpy"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], torch.device(self.device))
        self._set_own_generators(state)

    def _own_generators(self) -> dict:
        """The states of the loss's and the batch source's own generators (what an epoch's start draws from)."""
        state = {}
        if self.loss.generator is not None:
            state["loss"] = self.loss.generator.get_state()
        source_state = self.source.random_state()
        if source_state is not None:
            state["source"] = source_state
        return state

    def _set_own_generators(self, state: dict) -> None:
        if "loss" in state:
            self.loss.generator.set_state(state["loss"])
        if "source" in state:
            self.source.set_random_state(state["source"])

    # -- one epoch, evaluation, checkpoints --------------------------------------------------
    def _start_epoch(self, epoch: int, replay: dict | None) -> dict:
        """Run the epoch-start hooks; ``replay`` (resuming mid-epoch) first rewinds the generators they draw from.

        Returns the epoch-start state to save with step checkpoints."""
        if replay is None:
            start_state = self._own_generators()
            self.loss.on_epoch_start(epoch)
            return start_state
        now = self._own_generators()
        self._set_own_generators(replay)  # the epoch's bank refresh and shuffle are drawn again from here
        self.loss.on_epoch_start(epoch)
        self._set_own_generators({key: value for key, value in now.items() if key == "loss"})
        return replay

    def train_epoch(self, epoch: int, position: Position, progress: EpochProgress, replay: dict | None = None
                    ) -> EpochStats:
        """Train one epoch (from ``position.batch`` on); step checkpoints as configured."""
        self.training_loss.train()
        epoch_start = self._start_epoch(epoch, replay)
        started = time.perf_counter() - progress.seconds
        checkpoint_every = self.config.train.checkpoint_every
        self.log.start_epoch(epoch, self.steps_per_epoch - position.batch)
        batches = self.source.batches(epoch, self.targets, start_batch=position.batch)
        images, loss = 0, float("nan")  # images (all ranks) since the last optimizer step; the last batch's loss
        for inputs, targets, labels in batches:
            images += len(inputs) * self.place.world_size
            inputs = self.optimization.prepare_inputs(inputs.to(self.device, non_blocking=True))
            targets, labels = targets.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            last_batch = position.batch + 1 == self.steps_per_epoch
            accumulate = (isinstance(self.training_loss, DistributedDataParallel) and not last_batch
                          and not self.optimization.will_step)
            with self.training_loss.no_sync() if accumulate else contextlib.nullcontext():
                with self.optimization.autocast():
                    result = self.training_loss(inputs, targets, labels)
                self.optimization.backward(result.value)
            stepped = self.optimization.step(close_cycle=last_batch)
            loss = progress.add(result)
            position.batch += 1
            if stepped:
                position.step += 1
                self.log.log_step(position.step, epoch, loss, self.optimization.lr, images=images)
                images = 0
                if checkpoint_every and position.step % checkpoint_every == 0 and position.batch < self.steps_per_epoch:
                    progress.seconds = time.perf_counter() - started
                    self.save_training_state(position, progress, epoch_start)
        if self.optimization.finish_cycle():  # a single-process stream can end before its counted last batch
            position.step += 1
            self.log.log_step(position.step, epoch, loss, self.optimization.lr, images=images)
        if progress.batches == 0:
            raise DataError(f"epoch {epoch} saw no training batch; check {self.config.data.shard_dir}")
        progress.seconds = time.perf_counter() - started
        return progress.stats(epoch)

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

    def save_training_state(self, position: Position, progress: EpochProgress, epoch_start: dict,
                            complete: bool = False) -> None:
        """Write everything ``--resume`` needs (rank 0 writes; every rank contributes its RNG states)."""
        random_states = self.place.gather_objects(self._random_state())
        if not self.place.is_main:
            return
        self.log.flush()  # the step log holds every step up to this state
        training = {
            "position": asdict(position), "epoch_progress": asdict(progress.sync()), "epoch_start": epoch_start,
            "random_states": random_states, "optimization": self.optimization.state_dict(),
            "history": [asdict(stats) for stats in self.history], "initial_metrics": self.initial_metrics,
            "best_score": self.best_score, "best_metrics": self.best_metrics, "complete": complete,
            "world_size": self.place.world_size,
        }
        save_checkpoint(self.run_dir.training_state, config=self.config, encoder=self.encoder, loss=self.loss,
                        caption_encoder=self.caption_encoder, epoch=position.epoch - (position.batch == 0),
                        metrics=self.history[-1].metrics if self.history else {}, num_classes=self.num_classes,
                        training=training)

    def _resume_from(self, training: dict) -> tuple[Position, EpochProgress, dict | None]:
        """Restore history, scores and this rank's RNG states; returns where to continue."""
        if training["world_size"] != self.place.world_size:
            raise ConfigError(f"--resume: the run trained with {training['world_size']} process(es), this one has "
                              f"{self.place.world_size}; resume with the same torchrun --nproc_per_node and --nnodes")
        self.history = [EpochStats(**stats) for stats in training["history"]]
        self.initial_metrics, self.best_metrics = training["initial_metrics"], training["best_metrics"]
        self.best_score = training["best_score"]
        self._set_random_state(training["random_states"][self.place.rank])
        position, progress = Position(**training["position"]), EpochProgress(**training["epoch_progress"])
        return position, progress, (training["epoch_start"] if position.batch else None)

    def run(self) -> TrainResult:
        with torch_threads(self.source.threads(self.device)):
            try:
                return self._run()
            finally:
                self.log.close()

    def _run(self) -> TrainResult:
        started = time.perf_counter()
        if self.place.is_main:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir.config_file)
        if self.saved_state is None:
            self.history: list[EpochStats] = []
            self.initial_metrics = self.evaluate() if self.place.is_main else {}
            self.best_score, self.best_metrics = -1.0, self.initial_metrics
            position, progress, replay = Position(), EpochProgress(), None
        else:
            position, progress, replay = self._resume_from(self.saved_state["training"])
            write_line(f"resuming {self.run_dir} at epoch {position.epoch}, batch {position.batch} "
                       f"(step {position.step})", enabled=self.place.is_main)
        self.place.barrier()
        alarm = self._collapse_alarm()
        epochs = self.config.train.epochs
        for epoch in range(position.epoch, epochs + 1):
            stats = self.train_epoch(epoch, position, progress, replay)
            replay = None
            if self.place.is_main and (epoch % self.config.train.eval_every == 0 or epoch == epochs):
                stats.metrics = self.evaluate()
                if rsum(stats.metrics) > self.best_score:
                    self.best_score, self.best_metrics = rsum(stats.metrics), stats.metrics
                    self.save(BEST_CHECKPOINT, epoch, stats.metrics)
            self.history.append(stats)
            self.log.end_epoch(stats, self.history)
            for warning in alarm.update(epoch, stats.active_fraction, stats.embedding_spread):
                write_line(warning, enabled=self.place.is_main)
            position.epoch, position.batch, progress = epoch + 1, 0, EpochProgress()
            self.save_training_state(position, progress, {}, complete=epoch == epochs)
        final = self.history[-1].metrics if self.history else self.initial_metrics
        last = self.run_dir.checkpoint(LAST_CHECKPOINT)
        if self.place.is_main:
            self.save(LAST_CHECKPOINT, epochs, final)
            if self.skipped is not None:
                write_line(f"data.on_error=skip: {skipped_summary(self.skipped.counts())}")
        self.place.barrier()
        return TrainResult(self.run_dir.path, self.history, self.initial_metrics, final, self.best_metrics,
                           self.run_dir.checkpoint(BEST_CHECKPOINT), last, time.perf_counter() - started,
                           warnings=list(alarm.warnings))

    def _collapse_alarm(self) -> CollapseAlarm:
        """The run's collapse alarm, having seen the epochs already in the history (a resumed run)."""
        train = self.config.train
        alarm = CollapseAlarm(patience=train.collapse_patience, min_active=train.collapse_min_active,
                              min_spread_ratio=train.collapse_min_spread_ratio,
                              check_active=type(self.loss).active_means_gradient)
        for stats in self.history:
            alarm.update(stats.epoch, stats.active_fraction, stats.embedding_spread)
        return alarm


def fit(config: Config, progress: bool = True, overwrite: bool = False, resume: bool = False) -> TrainResult:
    """Train an image encoder against frozen caption vectors as ``config`` says; returns the run.

    A ``train.run_dir`` that already holds a run is refused (ConfigError) unless ``resume`` continues it
    from its training state or ``overwrite`` clears its old run first. Under ``torchrun`` every process
    calls this; they join one process group (see :mod:`retrieval.distributed`).
    """
    seed_everything(config.train.seed)
    return Trainer(config, progress=progress, overwrite=overwrite, resume=resume).run()
