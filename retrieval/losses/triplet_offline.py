"""``triplet-offline``: the text-anchored triplet with negatives from a precomputed far-caption bank.

:meth:`prepare` stores every training caption vector; :meth:`refresh_bank` (at the start of
every epoch after the first, through :meth:`on_epoch_start`) keeps, for each training caption,
the ``bank_size`` farthest caption vectors in word-vector space, searched among all captions or,
with ``pool_size``, among a fresh random pool of that many captions (what makes a per-epoch
refresh change anything: the vectors are frozen).
Each batch row's negative ``t-`` is drawn uniformly from its caption's bank, so it can come from
anywhere in the training set, not only the batch.

Batch rows are matched to training captions by their exact vector bytes (the trainer feeds the
same frozen vectors it passed to ``prepare``); a row not found (e.g. a validation caption) falls
back to the batch's farthest caption, as ``triplet`` with ``negatives: farthest`` does (and, like it,
leaves the row out when every caption of the batch shares its label). Bank entries are not
checked against labels: with class labels a far caption may share the class (rare by construction).
Written here: pytorch-metric-learning has no word-vector-space negative banks.

Logged: active fraction = rows with non-zero loss; distances = L2 to ``t+`` and to the drawn ``t-``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from retrieval.distances import L2, SQUARED_L2
from retrieval.errors import ConfigError
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput, mean_or_zero
from retrieval.losses.miners import farthest_bank, sample_from_bank
from retrieval.losses.registry import LOSSES
from retrieval.losses.settings import NonNegativeFloat, PositiveInt
from retrieval.negatives import NO_NEGATIVE, FarthestNegatives


def _row_keys(vectors: torch.Tensor) -> list[bytes]:
    """Exact byte keys of float32 CPU rows (the lookup that matches batch rows to training rows)."""
    array = vectors.detach().to("cpu", torch.float32).contiguous().numpy()
    return [row.tobytes() for row in array]


@LOSSES.register("triplet-offline")
class OfflineBankTripletLoss(CrossModalLoss):
    """``[m + d(f(i), t+) - d(f(i), t-)]_+`` with ``t-`` drawn from ``t+``'s far-caption bank."""

    family = LossFamily.TRIPLET
    active_means_gradient = True

    def __init__(
        self,
        margin: NonNegativeFloat = 1.0,
        squared: bool = False,
        bank_size: PositiveInt = 16,
        pool_size: PositiveInt | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.margin, self.squared = margin, squared
        self.distance = SQUARED_L2 if squared else L2
        self.bank_size, self.pool_size = bank_size, pool_size
        self.generator = torch.Generator().manual_seed(seed)
        self.vectors: torch.Tensor | None = None
        self.bank: torch.Tensor | None = None
        self._index: dict[bytes, int] = {}

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        bank_size, pool_size = settings["bank_size"], settings["pool_size"]
        if pool_size is not None and pool_size <= bank_size:
            raise ConfigError(f"triplet-offline needs bank_size < pool_size, got {bank_size} and {pool_size}")

    def prepare(self, caption_vectors: torch.Tensor) -> None:
        self.vectors = caption_vectors.detach().to("cpu", torch.float32)
        self._index = {key: row for row, key in enumerate(_row_keys(self.vectors))}
        self.refresh_bank()

    def on_epoch_start(self, epoch: int) -> None:
        if epoch > 1:  # prepare() built the first epoch's bank
            self.refresh_bank()

    def refresh_bank(self) -> None:
        """Recompute every caption's bank of ``bank_size`` farthest captions."""
        if self.vectors is None:
            raise ConfigError("loss 'triplet-offline' needs prepare(caption_vectors) before training")
        count = len(self.vectors)
        pool = None
        if self.pool_size is not None and self.pool_size < count:
            pool = torch.randperm(count, generator=self.generator)[: self.pool_size]
        self.bank = farthest_bank(self.vectors, min(self.bank_size, count - 1), pool)

    def negatives(self, text_emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One negative caption vector per row (from the bank, else the batch's farthest caption) and
        which rows have one (a row outside the bank whose label fills the batch has none)."""
        if self.vectors is None or self.bank is None:
            raise ConfigError("loss 'triplet-offline' needs prepare(caption_vectors) before training")
        rows = torch.tensor([self._index.get(key, -1) for key in _row_keys(text_emb)])
        found = rows >= 0
        negative = torch.empty_like(text_emb)
        has_negative = torch.ones(len(text_emb), dtype=torch.bool, device=text_emb.device)
        if bool(found.any()):
            drawn = sample_from_bank(self.bank, rows[found], self.generator)
            negative[found.to(text_emb.device)] = self.vectors[drawn].to(text_emb)
        if not bool(found.all()):
            fallback = FarthestNegatives()(text_emb, labels)
            missing = (~found).to(text_emb.device)
            has_negative = ~missing | (fallback != NO_NEGATIVE)
            negative[missing] = text_emb[fallback[missing].clamp(min=0)]
        return negative, has_negative

    def compute(self, image_emb, text_emb, labels):
        negative, has_negative = self.negatives(text_emb, labels)
        rows = has_negative.nonzero().squeeze(1)
        d_pos = self.distance.paired(image_emb[rows], text_emb[rows])
        d_neg = self.distance.paired(image_emb[rows], negative[rows])
        # the text-anchored triplet of retrieval.losses.triplet: [m + d(f,t+) - d(f,t-)]_+
        per_row = torch.relu(self.margin + d_pos - d_neg)
        return LossOutput.from_terms(mean_or_zero(per_row, image_emb), per_row > 0, d_pos, d_neg)
