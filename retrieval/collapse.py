"""The collapse alarm: a one-line warning when training stops learning or its embeddings fall together.

Two signals are read once per epoch (see :class:`retrieval.training_log.EpochStats`):

- the *active fraction*: the share of a loss's terms that are non-zero. For margin losses
  (``CrossModalLoss.active_means_gradient``) a zero term gives no gradient, so a run whose active
  fraction stays under ``min_active`` has mostly stopped learning (e.g. negatives that are too easy);
- the *embedding spread*: the root-mean-square distance between two image embeddings of the epoch.
  When it falls under ``min_spread_ratio`` times its first epoch's value, the images are collapsing
  onto one point (the embedding then ranks nothing).

Each rule must hold for ``patience`` consecutive epochs before it fires, and each fires once per run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

#: the dimension-wise moments one batch contributes: count, per-dimension sums and sums of squares
MOMENT_DTYPE = torch.float64


def embedding_moments(embeddings: torch.Tensor) -> torch.Tensor:
    """(1 + 2·D,) float64: row count, per-dimension sum and sum of squares of (N, D) embeddings (detached)."""
    rows = embeddings.detach().to(MOMENT_DTYPE)
    count = torch.tensor([rows.shape[0]], dtype=MOMENT_DTYPE, device=rows.device)
    return torch.cat([count, rows.sum(dim=0), (rows * rows).sum(dim=0)])


@dataclass(frozen=True)
class Spread:
    """How far apart an epoch's image embeddings are.

    ``embedding_spread``: sqrt(E||x_i - x_j||²) over pairs of the epoch's embeddings, which equals
    sqrt(2 · Σ_d Var_d); ``dimension_variance``: the mean over dimensions of each dimension's variance.
    Both come from running sums, so they cover every image of the epoch at no pairwise cost.
    """

    embedding_spread: float
    dimension_variance: float

    @classmethod
    def of(cls, moments: Iterable[float] | None) -> Spread:
        """From summed :func:`embedding_moments`; NaN when no embedding was counted."""
        values = list(moments) if moments is not None else []
        if not values or values[0] < 2:
            return cls(float("nan"), float("nan"))
        count, rest = values[0], values[1:]
        dims = len(rest) // 2
        means = [s / count for s in rest[:dims]]
        # population variance per dimension, clipped at 0 against rounding
        variances = [max(sq / count - m * m, 0.0) for sq, m in zip(rest[dims:], means)]
        return cls(math.sqrt(2.0 * sum(variances)), sum(variances) / dims)


@dataclass
class CollapseAlarm:
    """Watches a run's epochs; :meth:`update` returns the warnings an epoch newly raises (one line each)."""

    patience: int = 3
    min_active: float = 0.05
    min_spread_ratio: float = 0.1
    check_active: bool = True  # False for losses whose zero terms still give a gradient (e.g. regression)
    first_spread: float | None = None
    low_active_epochs: int = 0
    low_spread_epochs: int = 0
    warnings: list[str] = field(default_factory=list)
    _fired: set[str] = field(default_factory=set)

    def update(self, epoch: int, active_fraction: float, embedding_spread: float) -> list[str]:
        """Count one epoch; return the warnings that fire at it (each rule fires at most once)."""
        raised = []
        if self.check_active:
            self.low_active_epochs = self.low_active_epochs + 1 if active_fraction < self.min_active else 0
            if self.low_active_epochs >= self.patience and "active" not in self._fired:
                raised.append(self._fire("active", (
                    f"collapse alarm at epoch {epoch}: the active fraction stayed under {self.min_active:g} for "
                    f"{self.patience} epochs (now {active_fraction:.3f}): few terms of the loss are non-zero, so "
                    "training barely moves; try harder negatives (loss.negatives: far-hardest) or a larger "
                    "margin")))
        if not math.isnan(embedding_spread):
            if self.first_spread is None:
                self.first_spread = embedding_spread
            floor = self.min_spread_ratio * self.first_spread
            self.low_spread_epochs = self.low_spread_epochs + 1 if embedding_spread < floor else 0
            if self.low_spread_epochs >= self.patience and "spread" not in self._fired:
                raised.append(self._fire("spread", (
                    f"collapse alarm at epoch {epoch}: the embedding spread stayed under {self.min_spread_ratio:g} "
                    f"of its first value for {self.patience} epochs ({self.first_spread:.4f} → "
                    f"{embedding_spread:.4f}): the image embeddings are falling onto one point; check "
                    "train.lr and train.weight_decay, or try another loss")))
        return raised

    def _fire(self, rule: str, message: str) -> str:
        self._fired.add(rule)
        self.warnings.append(message)
        return message
