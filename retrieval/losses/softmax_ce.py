"""``softmax-ce``: softmax cross-entropy over classes through a linear head owned by the loss.

The head has learnable parameters: **the trainer must add ``loss.parameters()`` to the optimizer**
(and build the optimizer after :meth:`prepare`, which creates the head when ``embedding_dim`` was
not given). Written here: it is ``nn.Linear`` + ``F.cross_entropy``; nothing to wrap.

Logged: active fraction = rows the head misclassifies; distances = L2 between ``f(i)`` and every
caption vector of the batch, positive iff the class labels match.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.errors import ConfigError
from retrieval.losses.base import CrossModalLoss, LossOutput
from retrieval.losses.miners import split_pairs
from retrieval.losses.registry import LOSSES


def require_num_classes(name: str, num_classes: int | None) -> int:
    """A class loss's ``num_classes``, or a one-line ConfigError when it is missing or invalid."""
    if num_classes is None:
        raise ConfigError(f"loss {name!r} needs num_classes (it trains on class labels)")
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
        return split_pairs(torch.cdist(image_emb, text_emb), labels)


@LOSSES.register("softmax-ce")
class SoftmaxCrossEntropyLoss(CrossModalLoss):
    """Cross-entropy of a linear classifier on ``f(i)``; ignores the caption vectors."""

    needs_classes = True

    def __init__(self, num_classes: int | None = None, embedding_dim: int | None = None) -> None:
        super().__init__()
        self.num_classes = require_num_classes("softmax-ce", num_classes)
        self.head: nn.Linear | None = None
        if embedding_dim is not None:
            self.head = nn.Linear(embedding_dim, self.num_classes)

    def prepare(self, caption_vectors: torch.Tensor) -> None:
        if self.head is None:
            self.head = nn.Linear(caption_vectors.shape[1], self.num_classes).to(caption_vectors.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint is loaded into a fresh loss (no prepare): build the head from its shape
        weight = state_dict.get(prefix + "head.weight")
        if self.head is None and weight is not None:
            self.head = nn.Linear(weight.shape[1], weight.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def logits(self, image_emb: torch.Tensor) -> torch.Tensor:
        """Class scores ``W f(i) + b``."""
        if self.head is None:
            raise ConfigError("loss 'softmax-ce' needs embedding_dim or prepare(caption_vectors) before training")
        return self.head(image_emb)

    def compute(self, image_emb, text_emb, labels):
        check_labels("softmax-ce", labels, self.num_classes)
        logits = self.logits(image_emb)
        value = F.cross_entropy(logits, labels)
        positive, negative = l2_pair_stats(image_emb, text_emb, labels)
        return LossOutput.from_terms(value, logits.detach().argmax(dim=1) != labels, positive, negative)
