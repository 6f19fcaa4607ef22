"""The text-anchored triplet loss ``max(0, m + d(f(i), t+) - d(f(i), t-))``.

``t+`` is the image's own caption vector, ``t-`` a caption vector that a negative sampler chose far
from ``t+`` in word-vector space. Written here rather than taken from pytorch-metric-learning
because the negative is chosen from the *text* side's geometry, which its miners do not express.
"""

from __future__ import annotations

import torch

from retrieval.losses.base import CrossModalLoss, LossOutput
from retrieval.losses.registry import LOSSES
from retrieval.negatives import NegativeSampler, create_negative_sampler


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, squared: bool) -> torch.Tensor:
    """Row-wise L2 (or squared L2) distance between two (B, D) tensors."""
    squared_distance = (a - b).pow(2).sum(dim=1)
    return squared_distance if squared else squared_distance.clamp_min(1e-12).sqrt()


@LOSSES.register("triplet")
class TextAnchoredTripletLoss(CrossModalLoss):
    """Triplet loss with a word-vector-space negative per image."""

    def __init__(
        self,
        margin: float = 1.0,
        squared: bool = False,
        negatives: str | NegativeSampler = "hard",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.margin = margin
        self.squared = squared
        self.sampler = create_negative_sampler(negatives) if isinstance(negatives, str) else negatives
        self.generator = torch.Generator().manual_seed(seed)

    def compute(self, image_emb, text_emb, labels):
        negative_index = self.sampler(text_emb, labels, self.generator)
        d_pos = pairwise_distance(image_emb, text_emb, self.squared)
        d_neg = pairwise_distance(image_emb, text_emb[negative_index], self.squared)
        per_triplet = torch.relu(self.margin + d_pos - d_neg)
        return LossOutput.from_terms(per_triplet.mean(), per_triplet > 0, d_pos, d_neg)
