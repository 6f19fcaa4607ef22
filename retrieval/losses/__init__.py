"""Loss registry: importing this package registers every loss."""

from retrieval.losses import triplet  # noqa: F401  (registers "triplet")
from retrieval.losses import (  # noqa: F401  (each module registers its losses)
    arcface,
    center,
    circle,
    contrastive,
    histogram,
    multi_similarity,
    quadruplet,
    regression,
    softmax_ce,
    triplet_mined,
    triplet_offline,
)
from retrieval.losses.base import CrossModalLoss, LossOutput
from retrieval.losses.registry import LOSSES, create_loss

__all__ = ["CrossModalLoss", "LossOutput", "LOSSES", "create_loss"]
