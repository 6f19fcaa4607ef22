"""``contrastive`` and ``double-margin``: pytorch-metric-learning's ``ContrastiveLoss`` made cross-modal.

Passing the caption vectors as ``ref_emb`` with a *copy* of the labels as ``ref_labels`` gives
exactly the cross-modal setting: pml then forms every (image ``a``, caption ``b``) pair, keeps the
diagonal (an image with its own caption is a positive; pml drops the diagonal only when
``ref_labels is labels``), and never compares two images or two captions.

Reduction is pml's default ``AvgNonZeroReducer``: the mean over positive pairs with non-zero loss
plus the mean over negative pairs with non-zero loss. Distance: plain L2 in caption-vector space
(pml's default would L2-normalise first; ``normalize=True`` restores that).

Logged: active fraction = pairs with non-zero loss; distances = L2 of every positive / negative pair.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss

from retrieval.errors import ConfigError
from retrieval.losses.base import CrossModalLoss, LossOutput
from retrieval.losses.miners import positive_mask
from retrieval.losses.registry import LOSSES


@LOSSES.register("double-margin")
class DoubleMarginContrastiveLoss(CrossModalLoss):
    """``[d(a,p) - m_pos]_+`` over positive pairs and ``[m_neg - d(a,n)]_+`` over negative pairs."""

    def __init__(self, pos_margin: float = 0.5, neg_margin: float = 1.5, normalize: bool = False) -> None:
        super().__init__()
        if pos_margin >= neg_margin:
            raise ConfigError(f"contrastive loss needs pos_margin < neg_margin, got {pos_margin} and {neg_margin}")
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.normalize = normalize
        # Hadsell et al. 2006, pos/neg margins as in pml: L = [d_p - m_p]_+ + [m_n - d_n]_+
        self.pml_loss = ContrastiveLoss(
            pos_margin=pos_margin, neg_margin=neg_margin, distance=LpDistance(normalize_embeddings=normalize)
        )

    def compute(self, image_emb, text_emb, labels):
        value = self.pml_loss(image_emb, labels, ref_emb=text_emb, ref_labels=labels.clone())
        with torch.no_grad():
            if self.normalize:
                image_emb, text_emb = (torch.nn.functional.normalize(x, dim=1) for x in (image_emb, text_emb))
            distances = torch.cdist(image_emb, text_emb)
            positives = positive_mask(labels)
            d_pos, d_neg = distances[positives], distances[~positives]
            active = torch.cat([d_pos > self.pos_margin, d_neg < self.neg_margin])
        return LossOutput.from_terms(value, active, d_pos, d_neg)


@LOSSES.register("contrastive")
class ContrastiveCrossModalLoss(DoubleMarginContrastiveLoss):
    """Positive distances pulled to 0, negatives pushed past ``margin`` (pos margin fixed at 0)."""

    def __init__(self, margin: float = 1.0, normalize: bool = False) -> None:
        super().__init__(pos_margin=0.0, neg_margin=margin, normalize=normalize)
