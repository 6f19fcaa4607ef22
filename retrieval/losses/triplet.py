"""The text-anchored triplet loss ``max(0, m + d(f(i), t+) - d(f(i), t-))``.

``t+`` is the image's own caption vector, ``t-`` a caption vector that a negative sampler chose far
from ``t+`` in word-vector space. Written here rather than taken from pytorch-metric-learning
because the negative is chosen from the *text* side's geometry, which its miners do not express.
"""

from __future__ import annotations

from typing import Annotated

import torch

from retrieval.distances import L2, SQUARED_L2
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput
from retrieval.losses.registry import LOSSES
from retrieval.losses.settings import CheckedBy, NonNegativeFloat
from retrieval.negatives import NEGATIVE_SAMPLERS, create_negative_sampler


@LOSSES.register("triplet")
class TextAnchoredTripletLoss(CrossModalLoss):
    """Triplet loss with a word-vector-space negative per image (``squared``: squared L2 distances)."""

    family = LossFamily.TRIPLET

    def __init__(self, margin: NonNegativeFloat = 1.0, squared: bool = False,
                 negatives: Annotated[str, CheckedBy(NEGATIVE_SAMPLERS.get)] = "hard", seed: int = 0) -> None:
        super().__init__()
        self.margin = margin
        self.squared = squared
        self.distance = SQUARED_L2 if squared else L2
        self.sampler = create_negative_sampler(negatives)
        self.generator = torch.Generator().manual_seed(seed)

    def compute(self, image_emb, text_emb, labels):
        negative_index = self.sampler(text_emb, labels, self.generator)
        d_pos = self.distance.paired(image_emb, text_emb)
        d_neg = self.distance.paired(image_emb, text_emb[negative_index])
        per_triplet = torch.relu(self.margin + d_pos - d_neg)
        return LossOutput.from_terms(per_triplet.mean(), per_triplet > 0, d_pos, d_neg)
