"""``quadruplet`` (Chen et al. 2017, "Beyond triplet loss"), cross-modal and batch-hard.

For anchor image ``i``: positive caption ``j`` (the farthest caption sharing ``i``'s label),
negative caption ``k`` (the closest caption with another label), and a second image ``l`` whose
label differs from both ``i``'s and ``k``'s (the image closest to ``t_k``). The first term is the
triplet; the second pushes the negative pair ``(f_l, t_k)`` past the positive pair by ``m2``,
which widens inter-class gaps relative to intra-class ones. Anchors without a valid ``l`` (fewer
than three labels in the batch) keep only the triplet term; anchors without a negative caption
(their label fills the batch) have no term, and a batch where no anchor has one gives a zero loss.
Batch-hard choice of ``j, k, l`` replaces the paper's margin-based mining to stay O(B^2).
Distances are L2 (``squared=True`` gives the paper's squared distances). Written here:
pytorch-metric-learning has no quadruplet loss.

Logged: active fraction = anchors with a non-zero term; distances = the loss's L2 (or squared L2)
of ``(i, j)`` and ``(i, k)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from retrieval.distances import L2, SQUARED_L2
from retrieval.errors import ConfigError
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput, mean_or_zero
from retrieval.losses.miners import hardest_negatives, positive_mask
from retrieval.losses.registry import LOSSES
from retrieval.losses.settings import NonNegativeFloat


def quadruplet_indices(
    distances: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per anchor ``i``: ``(i, j, k, l)`` batch-hard indices, a valid-anchor mask, a valid-``l`` mask."""
    positives = positive_mask(labels)
    anchor = torch.arange(len(labels), device=labels.device)
    farthest_positive = distances.masked_fill(~positives, float("-inf")).argmax(dim=1)
    negative, has_negative = hardest_negatives(distances, ~positives)
    # l: label differs from the anchor's and from caption k's; rank images by distance to t_k
    to_negative = distances[:, negative].T  # (anchor, image l)
    allowed = ~positives.T[negative] & ~positives  # labels[l] != labels[k] and labels[l] != labels[i]
    other, has_other = hardest_negatives(to_negative, allowed)
    return anchor, farthest_positive, negative, other, has_negative, has_other & has_negative


@LOSSES.register("quadruplet")
class QuadrupletLoss(CrossModalLoss):
    """Triplet term with margin ``m1`` plus the negative-pair term with margin ``m2`` (< ``m1``)."""

    family = LossFamily.TRIPLET
    active_means_gradient = True

    def __init__(self, margin: NonNegativeFloat = 1.0, second_margin: NonNegativeFloat = 0.5,
                 squared: bool = False) -> None:
        super().__init__()
        self.margin, self.second_margin, self.squared = margin, second_margin, squared
        self.distance = SQUARED_L2 if squared else L2

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        if settings["second_margin"] > settings["margin"]:
            raise ConfigError(f"quadruplet needs second_margin <= margin, got {settings['second_margin']} > "
                              f"{settings['margin']}")

    def compute(self, image_emb, text_emb, labels):
        distances = self.distance.matrix(image_emb, text_emb)
        with torch.no_grad():
            i, j, k, l, valid, has_l = quadruplet_indices(distances, labels)
        d_pos, d_neg, d_pair = distances[i, j], distances[i, k], distances[l, k]
        # Chen et al. 2017 (quadruplet loss): [g_ij - g_ik + a1]_+ + [g_ij - g_lk + a2]_+
        first = torch.relu(d_pos - d_neg + self.margin) * valid
        second = torch.relu(d_pos - d_pair + self.second_margin) * has_l
        value = mean_or_zero((first + second)[valid], image_emb)
        active = ((first + second) > 0)[valid]
        return LossOutput.from_terms(value, active, d_pos[valid].detach(), d_neg[valid].detach())
