"""``circle`` (Sun et al. 2020, "Circle Loss"): pytorch-metric-learning's ``CircleLoss`` wrapped.

Run with the caption vectors as ``ref_emb`` and a *copy* of the labels as ``ref_labels``: every
(image, caption) pair, diagonal kept as a positive. Cosine similarity; pml's default
``AvgNonZeroReducer`` over image anchors.

Logged: distances are cosine distances ``1 - cos`` over all pairs; active fraction = pairs not yet
past their decision margin (positives with ``s_p < 1 - m``, negatives with ``s_n > m``).
Distance: cosine (search compares unit vectors).
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import CircleLoss as PmlCircleLoss

from retrieval.distances import COSINE
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput
from retrieval.losses.miners import split_pairs
from retrieval.losses.registry import LOSSES
from retrieval.losses.settings import NonNegativeFloat, PositiveFloat


@LOSSES.register("circle")
class CircleLoss(CrossModalLoss):
    """Self-paced weighting of each similarity toward its own optimum (``m``: relaxation, ``gamma``: scale)."""

    family = LossFamily.PAIR
    active_means_gradient = True
    distance = COSINE

    def __init__(self, m: NonNegativeFloat = 0.4, gamma: PositiveFloat = 80.0) -> None:
        super().__init__()
        self.m = m
        # Sun et al. 2020: log(1 + sum_N e^{g a_n (s_n - D_n)} sum_P e^{-g a_p (s_p - D_p)})
        self.pml_loss = PmlCircleLoss(m=m, gamma=gamma)

    def compute(self, image_emb, text_emb, labels):
        value = self.pml_loss(image_emb, labels, ref_emb=text_emb, ref_labels=labels.clone())
        with torch.no_grad():
            positive, negative = split_pairs(COSINE.similarity(image_emb, text_emb), labels)
            active = torch.cat([positive < 1.0 - self.m, negative > self.m])
        return LossOutput.from_terms(value, active, 1.0 - positive, 1.0 - negative)
