"""``contrastive`` and ``double-margin``: pytorch-metric-learning's ``ContrastiveLoss`` made cross-modal.

Passing the caption vectors as ``ref_emb`` with a *copy* of the labels as ``ref_labels`` gives
exactly the cross-modal setting: pml then forms every (image ``a``, caption ``b``) pair, keeps the
diagonal (an image with its own caption is a positive; pml drops the diagonal only when
``ref_labels is labels``), and never compares two images or two captions.

Reduction is pml's default ``AvgNonZeroReducer``: the mean over positive pairs with non-zero loss
plus the mean over negative pairs with non-zero loss. Distance: plain L2 in caption-vector space
(pml's default would L2-normalise first; ``normalize=True`` restores that, and then search compares
by cosine, which ranks exactly like L2 between unit vectors).

Logged: active fraction = pairs with non-zero loss; distances = L2 of every positive / negative pair.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss

from retrieval.distances import COSINE, L2
from retrieval.errors import ConfigError
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput
from retrieval.losses.miners import positive_mask
from retrieval.losses.registry import LOSSES
from retrieval.losses.settings import NonNegativeFloat, PositiveFloat


@LOSSES.register("double-margin")
class DoubleMarginContrastiveLoss(CrossModalLoss):
    """``[d(a,p) - m_pos]_+`` over positive pairs and ``[m_neg - d(a,n)]_+`` over negative pairs."""

    family = LossFamily.PAIR
    active_means_gradient = True

    def __init__(self, pos_margin: NonNegativeFloat = 0.5, neg_margin: PositiveFloat = 1.5,
                 normalize: bool = False) -> None:
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.normalize = normalize
        self.distance = COSINE if normalize else L2
        # Hadsell et al. 2006, pos/neg margins as in pml: L = [d_p - m_p]_+ + [m_n - d_n]_+
        self.pml_loss = ContrastiveLoss(
            pos_margin=pos_margin, neg_margin=neg_margin, distance=LpDistance(normalize_embeddings=normalize)
        )

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        if settings["pos_margin"] >= settings["neg_margin"]:
            raise ConfigError(f"double-margin needs pos_margin < neg_margin, got {settings['pos_margin']} and "
                              f"{settings['neg_margin']}")

    def compute(self, image_emb, text_emb, labels):
        value = self.pml_loss(image_emb, labels, ref_emb=text_emb, ref_labels=labels.clone())
        with torch.no_grad():  # pml's distance: L2, between unit vectors with ``normalize``
            distances = torch.cdist(*(self.distance.to_search_space(x) for x in (image_emb, text_emb)))
            positives = positive_mask(labels)
            d_pos, d_neg = distances[positives], distances[~positives]
            active = torch.cat([d_pos > self.pos_margin, d_neg < self.neg_margin])
        return LossOutput.from_terms(value, active, d_pos, d_neg)


@LOSSES.register("contrastive")
class ContrastiveCrossModalLoss(DoubleMarginContrastiveLoss):
    """Positive distances pulled to 0, negatives pushed past ``margin`` (pos margin fixed at 0)."""

    def __init__(self, margin: PositiveFloat = 1.0, normalize: bool = False) -> None:
        super().__init__(pos_margin=0.0, neg_margin=margin, normalize=normalize)

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        """Nothing joins its settings (the positive margin is fixed at 0)."""
