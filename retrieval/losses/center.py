"""``center`` (Wen et al. 2016): softmax cross-entropy plus a pull toward learnable class centers.

Base term: the ``softmax-ce`` head (as in the paper), so the loss owns a linear classifier *and*
a (num_classes, D) center matrix; **the trainer must add ``loss.parameters()`` to the optimizer**.
The centers start at zero
and are updated by the optimizer through the gradient of the center term (the paper's separate
center learning rate ``alpha`` becomes the optimizer's rate times ``weight``). Written here:
pytorch-metric-learning has no center loss. Caption vectors are not used by the value.

Logged: active fraction = rows the head misclassifies; distances = L2 between ``f(i)`` and every
caption vector of the batch, positive iff the class labels match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput
from retrieval.losses.registry import LOSSES
from retrieval.losses.settings import NonNegativeFloat
from retrieval.losses.softmax_ce import SoftmaxCrossEntropyLoss, check_labels, l2_pair_stats, require_num_classes


@LOSSES.register("center")
class CenterLoss(CrossModalLoss):
    """``CE(W f(i) + b, y) + weight * 1/2 ||f(i) - c_y||^2`` (both terms averaged over the batch)."""

    family = LossFamily.PROXY
    needs_classes = True

    def __init__(self, num_classes: int, embedding_dim: int, weight: NonNegativeFloat = 0.003) -> None:
        super().__init__()
        self.num_classes = require_num_classes("center", num_classes)
        self.weight = weight
        self.softmax = SoftmaxCrossEntropyLoss(self.num_classes, embedding_dim)
        self.centers = nn.Parameter(torch.zeros(self.num_classes, embedding_dim))

    def compute(self, image_emb, text_emb, labels):
        check_labels("center", labels, self.num_classes)
        logits = self.softmax.logits(image_emb)
        # Wen et al. 2016: L = L_S + lambda/2 * sum_i ||x_i - c_{y_i}||^2 (here means over the batch)
        center_term = 0.5 * (image_emb - self.centers[labels]).pow(2).sum(dim=1).mean()
        value = F.cross_entropy(logits, labels) + self.weight * center_term
        positive, negative = l2_pair_stats(image_emb, text_emb, labels)
        return LossOutput.from_terms(value, logits.detach().argmax(dim=1) != labels, positive, negative)
