"""The image encoder ``f``: a backbone plus a projection into the word-vector space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.config import ModelConfig
from retrieval.errors import ConfigError
from retrieval.models.backbones import Backbone, create_backbone


def make_projection(kind: str, in_dim: int, out_dim: int, hidden_dim: int, dropout: float) -> nn.Module:
    """``linear``: one affine map; ``mlp``: Linear-ReLU-Dropout-Linear."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                             nn.Linear(hidden_dim, out_dim))
    raise ConfigError(f"model.projection: unknown projection {kind!r}; choose linear or mlp")


class ImageEncoder(nn.Module):
    """Maps images (B, 3, H, W) to (B, D) vectors in the caption-vector space."""

    def __init__(self, backbone: Backbone, out_dim: int, projection: str = "linear",
                 hidden_dim: int = 512, dropout: float = 0.0, freeze_backbone: bool = True,
                 normalize_output: bool = False) -> None:
        super().__init__()
        self.backbone = backbone.module
        self.classifier = backbone.classifier  # the ImageNet head (for ConSE): kept, never trained
        if self.classifier is not None:
            self.classifier.requires_grad_(False)
        self.mean = backbone.mean
        self.std = backbone.std
        self.image_size = backbone.image_size
        self.feature_dim = backbone.feature_dim
        self.freeze_backbone = freeze_backbone
        self.normalize_output = normalize_output
        self.projection = make_projection(projection, backbone.feature_dim, out_dim, hidden_dim, dropout)
        if freeze_backbone:
            for parameter in self.backbone.parameters():
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if self.freeze_backbone:  # a frozen backbone keeps its batch-norm statistics
            self.backbone.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, F)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return self.backbone(images)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Project pooled features (B, F) into the caption space (unit length if configured)."""
        projected = self.projection(features)
        return F.normalize(projected, dim=1) if self.normalize_output else projected

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.features(images))


def create_encoder(config: ModelConfig, out_dim: int) -> ImageEncoder:
    """Build the encoder a :class:`ModelConfig` describes, projecting to ``out_dim``."""
    backbone = create_backbone(config.backbone, config.weights)
    return ImageEncoder(backbone, out_dim, config.projection, config.hidden_dim, config.dropout,
                        config.freeze_backbone, config.normalize_output)
