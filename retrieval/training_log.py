"""Temporary minimal training log (replaced by the logs module)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

from retrieval.io import atomic_path
from retrieval.rundir import RunDir


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


class TrainingLog:
    def __init__(self, run_dir: RunDir, *, enabled: bool = True, progress: bool = True, tensorboard: bool = False,
                 resume_step: int | None = None) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.steps_file = run_dir.path / "steps.csv"
        if enabled and resume_step is not None and self.steps_file.exists():
            rows = list(csv.reader(open(self.steps_file)))
            kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= resume_step]
            with atomic_path(self.steps_file) as tmp, open(tmp, "w", newline="") as handle:
                csv.writer(handle).writerows(kept)
        self._handle = None

    def start_epoch(self, epoch: int, steps: int | None) -> None:
        pass

    def log_step(self, step: int, epoch: int, loss: float, lr: float, images: int) -> None:
        if not self.enabled:
            return
        if self._handle is None:
            new = not self.steps_file.exists()
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.steps_file, "a", newline="")
            if new:
                self._handle.write("step,epoch,loss,lr\n")
        self._handle.write(f"{step},{epoch},{loss!r},{lr!r}\n")
        self._handle.flush()

    def end_epoch(self, stats: EpochStats, history: list[EpochStats]) -> None:
        if not self.enabled:
            return
        metric_names = sorted({name for s in history for name in s.metrics})
        columns = ["epoch", "loss", "active_fraction", "mean_pos_distance", "mean_neg_distance", "seconds"]
        with atomic_path(self.run_dir.metrics_file) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns + metric_names)
            for s in history:
                writer.writerow([getattr(s, c) for c in columns] + [s.metrics.get(m, "") for m in metric_names])

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
