"""Loss registry: importing this package registers every loss.

A loss is one module with one ``@LOSSES.register(name)`` class, imported below. Its settings are
the keyword arguments of its ``__init__`` (see :mod:`retrieval.losses.settings`); a run builds it
with :func:`build_loss` from the config's ``loss`` section.
"""

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
    triplet,  # noqa: F401  (registers "triplet")
    triplet_mined,
    triplet_offline,
)
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput
from retrieval.losses.registry import LOSSES, build_loss, check_loss_settings, create_loss, describe_loss, loss_settings

__all__ = ["CrossModalLoss", "LossFamily", "LossOutput", "LOSSES", "build_loss", "check_loss_settings", "create_loss",
           "describe_loss", "loss_settings"]
