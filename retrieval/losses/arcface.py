"""``arcface`` (Deng et al. 2019): additive angular margin over learnable class weights.

Wraps pytorch-metric-learning's ``ArcFaceLoss`` (margin in degrees, scale ``s``; beyond
``theta > pi - m`` pml uses ``cos(theta) - m sin(m)`` to stay monotonic). The class weights are
parameters of the loss, sized by the class count and embedding size the builder passes: **the
trainer must add ``loss.parameters()`` to the optimizer**. Caption vectors are not used by the
value; ArcFace has no ``ref_emb`` form, it compares images with class weights. Distance: cosine
(search compares unit vectors).

Logged: active fraction = rows whose margin-penalised target logit is not the largest;
distances = L2 between ``f(i)`` and every caption vector of the batch (labels match = positive).
"""

from __future__ import annotations

import math

import torch
from pytorch_metric_learning.losses import ArcFaceLoss as PmlArcFaceLoss

from retrieval.distances import COSINE
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput
from retrieval.losses.registry import LOSSES
from retrieval.losses.settings import NonNegativeFloat, PositiveFloat
from retrieval.losses.softmax_ce import check_labels, l2_pair_stats, require_num_classes


@LOSSES.register("arcface")
class ArcFaceLoss(CrossModalLoss):
    """Cross-entropy on ``s * cos(theta_y + m)`` for the target class and ``s * cos(theta_j)`` otherwise."""

    family = LossFamily.PROXY
    needs_classes = True
    distance = COSINE

    def __init__(self, num_classes: int, embedding_dim: int, margin: NonNegativeFloat = 28.6,
                 scale: PositiveFloat = 64.0) -> None:
        super().__init__()
        self.num_classes = require_num_classes("arcface", num_classes)
        self.margin, self.scale = margin, scale
        # Deng et al. 2019 (ArcFace): L = -log e^{s cos(t_y + m)} / (e^{s cos(t_y + m)} + sum_{j!=y} e^{s cos t_j})
        self.pml_loss = PmlArcFaceLoss(self.num_classes, embedding_dim, margin=margin, scale=scale)

    def compute(self, image_emb, text_emb, labels):
        check_labels("arcface", labels, self.num_classes)
        value = self.pml_loss(image_emb, labels)
        with torch.no_grad():
            cosine = self.pml_loss.get_cosine(image_emb).clamp(-1.0, 1.0)
            target = cosine.gather(1, labels[:, None]).squeeze(1)
            penalised = torch.cos(torch.acos(target) + math.radians(self.margin))
            others = cosine.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
            active = penalised <= others
        positive, negative = l2_pair_stats(image_emb, text_emb, labels)
        return LossOutput.from_terms(value, active, positive, negative)
