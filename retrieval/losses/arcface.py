"""``arcface`` (Deng et al. 2019): additive angular margin over learnable class weights.

Wraps pytorch-metric-learning's ``ArcFaceLoss`` (margin in degrees, scale ``s``; beyond
``theta > pi - m`` pml uses ``cos(theta) - m sin(m)`` to stay monotonic). The class weights are
parameters of the loss: **the trainer must add ``loss.parameters()`` to the optimizer**, and build
it after :meth:`prepare` when ``embedding_dim`` was not given. Caption vectors are not used by the
value; ArcFace has no ``ref_emb`` form, it compares images with class weights.

Logged: active fraction = rows whose margin-penalised target logit is not the largest;
distances = L2 between ``f(i)`` and every caption vector of the batch (labels match = positive).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss as PmlArcFaceLoss

from retrieval.errors import ConfigError
from retrieval.losses.base import CrossModalLoss, LossOutput
from retrieval.losses.registry import LOSSES
from retrieval.losses.softmax_ce import check_labels, l2_pair_stats, require_num_classes


@LOSSES.register("arcface")
class ArcFaceLoss(CrossModalLoss):
    """Cross-entropy on ``s * cos(theta_y + m)`` for the target class and ``s * cos(theta_j)`` otherwise."""

    needs_classes = True
    search_metric = "cosine"  # embed() is unit-norm; captions and queries are normalised too

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        margin: float = 28.6,
        scale: float = 64.0,
    ) -> None:
        super().__init__()
        self.num_classes = require_num_classes("arcface", num_classes)
        self.margin, self.scale = margin, scale
        self.pml_loss: PmlArcFaceLoss | None = None
        if embedding_dim is not None:
            self._build(embedding_dim)

    def _build(self, embedding_dim: int, device: torch.device | None = None) -> None:
        # Deng et al. 2019 (ArcFace): L = -log e^{s cos(t_y + m)} / (e^{s cos(t_y + m)} + sum_{j!=y} e^{s cos t_j})
        self.pml_loss = PmlArcFaceLoss(self.num_classes, embedding_dim, margin=self.margin, scale=self.scale)
        if device is not None:
            self.pml_loss.to(device)

    def prepare(self, caption_vectors: torch.Tensor) -> None:
        if self.pml_loss is None:
            self._build(caption_vectors.shape[1], caption_vectors.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint is loaded into a fresh loss (no prepare): W is (embedding_dim, num_classes)
        weights = state_dict.get(prefix + "pml_loss.W")
        if self.pml_loss is None and weights is not None:
            self._build(weights.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def embed(self, outputs: torch.Tensor) -> torch.Tensor:
        return F.normalize(outputs, dim=1)

    def compute(self, image_emb, text_emb, labels):
        check_labels("arcface", labels, self.num_classes)
        if self.pml_loss is None:
            raise ConfigError("loss 'arcface' needs embedding_dim or prepare(caption_vectors) before training")
        value = self.pml_loss(image_emb, labels)
        with torch.no_grad():
            cosine = self.pml_loss.get_cosine(image_emb).clamp(-1.0, 1.0)
            target = cosine.gather(1, labels[:, None]).squeeze(1)
            penalised = torch.cos(torch.acos(target) + math.radians(self.margin))
            others = cosine.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
            active = penalised <= others
        positive, negative = l2_pair_stats(image_emb, text_emb, labels)
        return LossOutput.from_terms(value, active, positive, negative)
