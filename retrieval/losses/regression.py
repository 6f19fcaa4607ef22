"""Regression of the image output onto its own caption vector: ``sigmoid-ce``, ``mse``, ``cosine``.

Each row ``b`` regresses ``f(i_b)`` onto ``t_b`` only (labels are used for the logged distances
alone). Written here: pytorch-metric-learning has no regression losses; each is one line of torch.

Logged distances: over every (image, caption) pair of the batch, positive iff the labels match;
the loss's distance between ``outputs_to_embedding(f(i))`` and ``t``: L2 for ``mse`` and
``sigmoid-ce``, cosine distance ``1 - cos`` for ``cosine``. Active fraction: rows with a non-zero loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval.distances import COSINE
from retrieval.errors import ConfigError
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput
from retrieval.losses.miners import split_pairs
from retrieval.losses.registry import LOSSES


class _RegressionLoss(CrossModalLoss):
    """Shared body: a per-row loss averaged over the batch, plus all-pair statistics."""

    family = LossFamily.REGRESSION

    def per_row(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, image_emb, text_emb, labels):
        per_row = self.per_row(image_emb, text_emb)
        with torch.no_grad():
            distances = self.distance.matrix(self.outputs_to_embedding(image_emb), text_emb)
            positive, negative = split_pairs(distances, labels)
        return LossOutput.from_terms(per_row.mean(), per_row > 0, positive, negative)


@LOSSES.register("mse")
class MSERegressionLoss(_RegressionLoss):
    """Mean squared error between ``f(i)`` and its caption vector (mean over rows and dimensions)."""

    def per_row(self, image_emb, text_emb):
        return (image_emb - text_emb).pow(2).mean(dim=1)


@LOSSES.register("cosine")
class CosineRegressionLoss(_RegressionLoss):
    """``1 - cos(f(i), t)``: regresses the direction only, so search compares unit vectors."""

    distance = COSINE

    def per_row(self, image_emb, text_emb):
        return self.distance.paired(image_emb, text_emb)


@LOSSES.register("sigmoid-ce")
class SigmoidCrossEntropyLoss(_RegressionLoss):
    """The original recipe's baseline: sigmoid cross-entropy onto the caption vector scaled to [0, 1].

    ``prepare`` records each dimension's min and max over the training captions; the target is
    ``(t - min) / (max - min)`` and :meth:`outputs_to_embedding` maps ``sigmoid(output)`` back to
    vector scale. The min and span are buffers of ``embedding_dim`` values (NaN until ``prepare``),
    so they travel with ``state_dict`` to search time.
    """

    family = LossFamily.CROSS_ENTROPY

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("low", torch.full((embedding_dim,), float("nan")))
        self.register_buffer("span", torch.full((embedding_dim,), float("nan")))

    def prepare(self, caption_vectors: torch.Tensor) -> None:
        vectors = caption_vectors.detach()
        if vectors.shape[1] != self.low.numel():
            raise ConfigError(f"loss 'sigmoid-ce' was built for {self.low.numel()} dims, got {vectors.shape[1]}")
        self.low = vectors.min(dim=0).values.clone()
        self.span = (vectors.max(dim=0).values - self.low).clamp_min(1e-12)

    def _scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bool(self.low.isnan().any()):
            raise ConfigError("loss 'sigmoid-ce' needs prepare(caption_vectors) before training or search")
        if self.low.numel() != like.shape[1]:
            raise ConfigError(f"loss 'sigmoid-ce' was built for {self.low.numel()} dims, got {like.shape[1]}")
        return self.low.to(like), self.span.to(like)

    def target(self, text_emb: torch.Tensor) -> torch.Tensor:
        """The caption vector scaled per dimension to [0, 1]."""
        low, span = self._scale(text_emb)
        return ((text_emb - low) / span).clamp(0.0, 1.0)

    def per_row(self, image_emb, text_emb):
        target = self.target(text_emb)
        return F.binary_cross_entropy_with_logits(image_emb, target, reduction="none").mean(dim=1)

    def outputs_to_embedding(self, outputs: torch.Tensor) -> torch.Tensor:
        """``sigmoid(output)`` mapped back from [0, 1] to each dimension's caption-vector range."""
        low, span = self._scale(outputs)
        return torch.sigmoid(outputs) * span + low
