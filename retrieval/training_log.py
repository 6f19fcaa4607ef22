"""The logs of one training run: progress, ``steps.csv``, ``metrics.csv`` and, when asked, TensorBoard event files.

:class:`TrainingLog` is what the training loop calls (on rank 0 only) at each optimizer step and epoch end:

- a progress bar per epoch showing the loss and images per second, on a terminal; where the output is not
  a terminal (a log file, a pipe), one line per epoch instead, never a bar;
- ``steps.csv`` (step, epoch, loss, lr), one row appended and flushed per optimizer step;
- ``metrics.csv``, one row per epoch, rewritten atomically at each epoch end;
- TensorBoard scalars under ``<run_dir>/tensorboard`` when ``train.tensorboard: true``
  (``train/…`` per step, ``epoch/…`` and ``held_out/…`` per epoch, all with the optimizer step as x axis).

On resume from the checkpoint of step ``s``, ``steps.csv`` keeps its rows up to ``s`` and TensorBoard drops
every event after ``s``, so the logs read as those of one uninterrupted run.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from retrieval.config import Config
from retrieval.errors import ConfigError
from retrieval.io import atomic_path
from retrieval.progress import format_duration, is_terminal, progress_bar
from retrieval.rundir import RunDir

STEP_COLUMNS = ("step", "epoch", "loss", "lr")
EPOCH_COLUMNS = ("epoch", "loss", "active_fraction", "mean_pos_distance", "mean_neg_distance",
                 "embedding_spread", "dimension_variance", "seconds")
SHOWN_METRIC = "text_to_image/R@5"  # the held-out figure an epoch's line shows
STEPS_FLUSH_SECONDS = 1.0  # steps.csv reaches the disk at least this often (and at every flush())


@dataclass
class EpochStats:
    """What one epoch did: the loss signals, and held-out retrieval when it was evaluated.

    ``embedding_spread`` and ``dimension_variance``: how far apart the epoch's image embeddings are
    (:class:`retrieval.collapse.Spread`); NaN in histories saved before they were logged.
    """

    epoch: int
    loss: float
    active_fraction: float
    mean_pos_distance: float
    mean_neg_distance: float
    seconds: float
    metrics: dict = field(default_factory=dict)
    embedding_spread: float = float("nan")
    dimension_variance: float = float("nan")


def write_history(path: str | os.PathLike, history: list[EpochStats]) -> None:
    """metrics.csv: one row per epoch, a column per held-out metric any epoch has (rewritten atomically)."""
    metric_names = sorted({name for stats in history for name in stats.metrics})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*EPOCH_COLUMNS, *metric_names])
        for stats in history:
            writer.writerow([getattr(stats, c) for c in EPOCH_COLUMNS]
                            + [stats.metrics.get(m, "") for m in metric_names])


def check_tensorboard(config: Config) -> None:
    """One-line ConfigError when ``train.tensorboard`` is asked for but the tensorboard package is not installed."""
    if config.train.tensorboard:
        _summary_writer_class()


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ConfigError(f"train.tensorboard: true needs the tensorboard package ({error}); install it "
                          "(pip install tensorboard) or set train.tensorboard: false") from None
    return SummaryWriter


def read_steps(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``steps.csv`` as ``{"step": int, "epoch": int, "loss": float, "lr": float}``.

    A row that does not parse (the last line of a run killed while writing it) is left out.
    """
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                rows.append({"step": int(row["step"]), "epoch": int(row["epoch"]), "loss": float(row["loss"]),
                             "lr": float(row["lr"])})
            except (KeyError, TypeError, ValueError):
                continue
    return rows


def epoch_line(stats: EpochStats, images_per_second: float | None = None, epochs: int | None = None) -> str:
    """``epoch 3/60: loss 0.4123, active 0.532, spread 0.812, t2i R@5 0.620, 1234 img/s, 12.3 s`` (the parts
    that are known)."""
    parts = [f"loss {stats.loss:.4f}", f"active {stats.active_fraction:.3f}"]
    if not math.isnan(stats.embedding_spread):
        parts.append(f"spread {stats.embedding_spread:.3f}")
    if SHOWN_METRIC in stats.metrics:
        parts.append(f"t2i R@5 {stats.metrics[SHOWN_METRIC]:.3f}")
    if images_per_second:
        parts.append(f"{images_per_second:.0f} img/s")
    parts.append(format_duration(stats.seconds))
    return f"{_epoch_label(stats.epoch, epochs)}: " + ", ".join(parts)


def _epoch_label(epoch: int, epochs: int | None) -> str:
    return f"epoch {epoch}/{epochs}" if epochs else f"epoch {epoch}"


class TrainingLog:
    """Progress, step log, epoch metrics and TensorBoard events of one training run (rank 0 only).

    ``progress``: a bar per epoch on a terminal, one line per epoch elsewhere (``stream``, default
    ``sys.stderr``, decides which). ``tensorboard``: also write event files to ``run_dir.tensorboard``.
    ``resume_step``: the step of the checkpoint the run resumes from (None for a new run, whose
    ``steps.csv`` starts empty). ``epochs``: the run's epoch count, shown as ``epoch 3/60``.
    With ``enabled=False`` (the other ranks) every method does nothing and nothing is written.
    """

    def __init__(self, run_dir: RunDir | str | os.PathLike, *, progress: bool, tensorboard: bool,
                 resume_step: int | None = None, epochs: int | None = None, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.run_dir = RunDir(run_dir)
        self.progress, self.epochs, self.stream = progress, epochs, stream
        self.terminal = progress and is_terminal(stream)
        self.step = resume_step or 0  # the last step logged
        self.epoch = 0
        self._bar: Any = None
        self._writer = self._open_tensorboard(resume_step) if tensorboard else None
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self._steps_file = self._open_steps(resume_step)
        self._steps = csv.writer(self._steps_file)
        self._steps_flushed_at = time.perf_counter()
        self._reset_epoch_counters()

    # -- the files ---------------------------------------------------------------------------
    def _open_tensorboard(self, resume_step: int | None) -> Any:
        summary_writer = _summary_writer_class()
        # purge_step: TensorBoard drops the events at or after it that an earlier, killed session wrote
        return summary_writer(log_dir=str(self.run_dir.tensorboard),
                              purge_step=None if resume_step is None else resume_step + 1)

    def _open_steps(self, resume_step: int | None) -> TextIO:
        """steps.csv open for appending: new (header only), or on resume holding the rows up to ``resume_step``."""
        path = self.run_dir.steps_file
        kept = []
        if resume_step is not None and path.is_file():
            kept = [row for row in read_steps(path) if row["step"] <= resume_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(STEP_COLUMNS)
            writer.writerows([row[c] for c in STEP_COLUMNS] for row in kept)
        return open(path, "a", newline="")

    # -- what the loop calls -----------------------------------------------------------------
    def start_epoch(self, epoch: int, steps: int | None) -> None:
        """An epoch begins; ``steps``: the optimizer steps it will run (None when unknown)."""
        if not self.enabled:
            return
        self._close_bar()
        self.epoch = epoch
        self._reset_epoch_counters()
        if self.terminal:
            self._bar = progress_bar(desc=_epoch_label(epoch, self.epochs), total=steps, unit="step",
                                     stream=self.stream)

    def log_step(self, step: int, epoch: int, loss: float, lr: float, images: int) -> None:
        """One optimizer step: its number (counted over the whole run), epoch, loss, learning rate and the
        number of images it trained on (all ranks together, for a true images/s)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        loss, lr = float(loss), float(lr)
        self._steps.writerow((step, epoch, loss, lr))
        if now - self._steps_flushed_at >= STEPS_FLUSH_SECONDS:  # live for `tail -f`, without a write per step
            self._steps_file.flush()
            self._steps_flushed_at = now
        step_seconds = now - self._last_step_time
        self.step, self.epoch, self._last_step_time = step, epoch, now
        self._epoch_images += images
        self._epoch_loss += loss
        self._epoch_steps += 1
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/lr", lr, step)
            if step_seconds > 0:
                self._writer.add_scalar("train/images_per_second", images / step_seconds, step)
        if self._bar is not None:
            rate = self.images_per_second()
            self._bar.set_postfix({"loss": f"{self._epoch_loss / self._epoch_steps:.4f}",
                                   "img/s": f"{rate:.0f}" if rate else "?"}, refresh=False)
            self._bar.update(1)

    def end_epoch(self, stats: EpochStats, history: list[EpochStats]) -> None:
        """An epoch is over (evaluated or not): metrics.csv, epoch scalars, and its line or finished bar.

        ``history``: every epoch of the run so far, ``stats`` last (metrics.csv is rewritten from it).
        """
        if not self.enabled:
            return
        write_history(self.run_dir.metrics_file, history)
        rate = self.images_per_second()
        if self._writer is not None:
            scalars = {"epoch/loss": stats.loss, "epoch/active_fraction": stats.active_fraction,
                       "epoch/mean_pos_distance": stats.mean_pos_distance,
                       "epoch/mean_neg_distance": stats.mean_neg_distance, "epoch/seconds": stats.seconds,
                       "epoch/embedding_spread": stats.embedding_spread,
                       "epoch/dimension_variance": stats.dimension_variance,
                       **{f"held_out/{name}": value for name, value in stats.metrics.items()}}
            if rate:
                scalars["epoch/images_per_second"] = rate
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, float(value), self.step)
            self._writer.flush()
        line = epoch_line(stats, rate, self.epochs)
        if self._bar is not None:
            self._bar.set_postfix_str(line.split(": ", 1)[1], refresh=False)
            self._close_bar()
        elif self.progress:
            print(line, file=sys.stderr if self.stream is None else self.stream, flush=True)

    def images_per_second(self) -> float | None:
        """Images trained on per second in the current epoch, from its start to its last step (None before one)."""
        if not self.enabled:
            return None
        seconds = self._last_step_time - self._epoch_start
        return self._epoch_images / seconds if self._epoch_images and seconds > 0 else None

    def flush(self) -> None:
        """Make everything logged so far durable (call before writing a checkpoint)."""
        if not self.enabled:
            return
        self._steps_file.flush()
        self._steps_flushed_at = time.perf_counter()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the bar and the files (a second call does nothing)."""
        if not self.enabled:
            return
        self._close_bar()
        if not self._steps_file.closed:
            self._steps_file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------------
    def _reset_epoch_counters(self) -> None:
        self._epoch_start = self._last_step_time = time.perf_counter()
        self._epoch_images, self._epoch_loss, self._epoch_steps = 0, 0.0, 0

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

