"""The shared contract of every cross-modal loss: image embeddings against frozen caption vectors.

A loss receives a batch of image embeddings ``f(i)`` (B, D), the batch's caption vectors ``t``
(B, D) where ``t[b]`` is the caption of image ``b``, and integer ``labels`` (B,) saying which rows
belong together (image identity by default, a class id where the data has classes): image ``a``
and caption ``b`` are a positive pair iff ``labels[a] == labels[b]``. The caption vectors are
targets and never receive gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from retrieval.errors import ConfigError


@dataclass(frozen=True)
class LossOutput:
    """A loss value plus the training signals that make a collapse visible."""

    value: torch.Tensor
    active_fraction: float
    mean_pos_distance: float
    mean_neg_distance: float

    @classmethod
    def from_terms(
        cls, value: torch.Tensor, active: torch.Tensor, pos_distance: torch.Tensor, neg_distance: torch.Tensor
    ) -> "LossOutput":
        """Build an output from per-term tensors (detached for the logged statistics)."""
        with torch.no_grad():
            return cls(
                value=value,
                active_fraction=float(active.float().mean()) if active.numel() else 0.0,
                mean_pos_distance=float(pos_distance.mean()) if pos_distance.numel() else float("nan"),
                mean_neg_distance=float(neg_distance.mean()) if neg_distance.numel() else float("nan"),
            )


class CrossModalLoss(nn.Module):
    """Base class: owns input checks; subclasses implement :meth:`compute`."""

    #: losses that need class labels (softmax cross-entropy, center loss, ArcFace) set this.
    needs_classes: bool = False
    #: how search compares embeddings: ``l2`` distance, or ``cosine`` (both sides L2-normalised).
    search_metric: str = "l2"

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> LossOutput:
        if image_emb.ndim != 2 or text_emb.ndim != 2:
            raise ConfigError(
                f"{type(self).__name__}: expected 2-D embeddings, got image {tuple(image_emb.shape)} "
                f"and text {tuple(text_emb.shape)}"
            )
        if image_emb.shape[0] != text_emb.shape[0]:
            raise ConfigError(
                f"{type(self).__name__}: batch sizes differ (image {image_emb.shape[0]}, text {text_emb.shape[0]})"
            )
        if labels is None:
            if self.needs_classes:
                raise ConfigError(f"loss {type(self).__name__} needs class labels; this data has captions only")
            labels = torch.arange(image_emb.shape[0], device=image_emb.device)
        return self.compute(image_emb, text_emb.detach(), labels.to(image_emb.device))

    def compute(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        raise NotImplementedError

    def prepare(self, caption_vectors: torch.Tensor) -> None:
        """Hook called once before training with every training caption vector (default: nothing)."""

    def embed(self, outputs: torch.Tensor) -> torch.Tensor:
        """Map network outputs into the caption-vector space used for search (default: identity)."""
        return outputs
