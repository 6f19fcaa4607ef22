"""``histogram`` (Ustinova & Lempitsky 2016, "Learning Deep Embeddings with Histogram Loss").

Cosine similarities of every cross-modal positive pair and every negative pair of the batch are
soft-binned onto ``n_bins + 1`` nodes ``t_r = -1 + r * delta`` (``delta = 2 / n_bins``) by linear
interpolation; the loss is the probability that a random negative pair is more similar than a
random positive one (zero for a batch without negative pairs). Written here: pytorch-metric-learning's
``HistogramLoss`` refuses ``ref_emb`` (and forms pairs inside one embedding set); the tests check
that this equals pml's value and gradient when pml is given the images and captions concatenated
with only cross-modal triplets.
Similarities are clamped to [-1, 1] (pml indexes past its last bin at exactly 1).

Logged: distances are cosine distances ``1 - cos``; active fraction = negative pairs more similar
than the least similar positive pair (the pairs that overlap the positive histogram).
Distance: cosine (search compares unit vectors).
"""

from __future__ import annotations

from typing import Annotated

import torch

from retrieval.distances import COSINE
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput
from retrieval.losses.miners import split_pairs
from retrieval.losses.registry import LOSSES
from retrieval.losses.settings import AtLeast


def soft_histogram(similarities: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Normalised histogram on ``n_bins + 1`` nodes over [-1, 1] with linear-interpolation weights."""
    # Ustinova & Lempitsky 2016: h_r = 1/|S| sum_ij delta_ijr (triangular kernel around t_r)
    position = (similarities.clamp(-1.0, 1.0) + 1.0) * (n_bins / 2.0)
    lower = position.detach().floor().clamp(max=n_bins - 1).long()
    upper_weight = position - lower
    histogram = torch.zeros(n_bins + 1, dtype=similarities.dtype, device=similarities.device)
    histogram = histogram.scatter_add(0, lower, 1.0 - upper_weight)
    histogram = histogram.scatter_add(0, lower + 1, upper_weight)
    return histogram / max(len(similarities), 1)


@LOSSES.register("histogram")
class HistogramLoss(CrossModalLoss):
    """``sum_r h-_r * Phi+_r`` with ``Phi+`` the cumulative positive histogram."""

    family = LossFamily.PAIR
    distance = COSINE

    def __init__(self, n_bins: Annotated[int, AtLeast(2)] = 100) -> None:
        super().__init__()
        self.n_bins = n_bins

    def compute(self, image_emb, text_emb, labels):
        positive, negative = split_pairs(COSINE.similarity(image_emb, text_emb), labels)
        # Ustinova & Lempitsky 2016: L = sum_r h-_r * sum_{q<=r} h+_q
        cumulative_positive = soft_histogram(positive, self.n_bins).cumsum(dim=0)
        value = (soft_histogram(negative, self.n_bins) * cumulative_positive).sum()
        with torch.no_grad():
            active = negative > positive.min()
        return LossOutput.from_terms(value, active, 1.0 - positive.detach(), 1.0 - negative.detach())
