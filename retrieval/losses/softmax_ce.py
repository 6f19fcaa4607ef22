"""``softmax-ce``: softmax cross-entropy over classes through a linear head owned by the loss.

The head has learnable parameters, sized by the class count and embedding size the builder
passes: **the trainer must add ``loss.parameters()`` to the optimizer**. Written here: it is
``nn.Linear`` + ``F.cross_entropy``; nothing to wrap.

Logged: active fraction = rows the head misclassifies; distances = L2 between ``f(i)`` and every
caption vector of the batch, positive iff the class labels match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.distances import L2
from retrieval.errors import ConfigError
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput
from retrieval.losses.miners import split_pairs
from retrieval.losses.registry import LOSSES


def require_num_classes(name: str, num_classes: int) -> int:
    """A class loss's ``num_classes``, or a one-line ConfigError when it is invalid."""
    if int(num_classes) < 2:
        raise ConfigError(f"loss {name!r} needs num_classes >= 2, got {num_classes}")
    return int(num_classes)


def check_labels(name: str, labels: torch.Tensor, num_classes: int) -> None:
    """One-line ConfigError when a label is not a class id in ``[0, num_classes)``."""
    low, high = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
    if low < 0 or high >= num_classes:
        raise ConfigError(f"loss {name!r}: labels must be class ids in [0, {num_classes}), got {low}..{high}")


def l2_pair_stats(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor):
    """Positive and negative (image, caption) L2 distances over the whole batch (no grad)."""
    with torch.no_grad():
        return split_pairs(L2.matrix(image_emb, text_emb), labels)


@LOSSES.register("softmax-ce")
class SoftmaxCrossEntropyLoss(CrossModalLoss):
    """Cross-entropy of a linear classifier on ``f(i)``; ignores the caption vectors."""

    family = LossFamily.CROSS_ENTROPY
    needs_classes = True

    def __init__(self, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_classes = require_num_classes("softmax-ce", num_classes)
        self.head = nn.Linear(embedding_dim, self.num_classes)

    def logits(self, image_emb: torch.Tensor) -> torch.Tensor:
        """Class scores ``W f(i) + b``."""
        return self.head(image_emb)

    def compute(self, image_emb, text_emb, labels):
        check_labels("softmax-ce", labels, self.num_classes)
        logits = self.logits(image_emb)
        value = F.cross_entropy(logits, labels)
        positive, negative = l2_pair_stats(image_emb, text_emb, labels)
        return LossOutput.from_terms(value, logits.detach().argmax(dim=1) != labels, positive, negative)
