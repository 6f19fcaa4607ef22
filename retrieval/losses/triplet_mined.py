"""``triplet-mined``: image anchors, caption positives/negatives, triplets mined online in the batch.

Mining types (``all`` / ``hard`` / ``semihard`` / ``easy``) follow pytorch-metric-learning's
``TripletMarginMiner`` on image-caption distances; see :mod:`retrieval.losses.miners`. The value
equals pml's ``TripletMarginLoss`` (default ``AvgNonZeroReducer``) on those triplets with
``ref_emb`` = captions (checked in the tests to 1e-5). Written here rather than wrapped so that one
distance matrix serves both mining and loss (pml's miner and loss would each recompute it), and so
the miners can be tested on a hand-made matrix. ``easy`` triplets have zero loss by definition.

Logged: active fraction = share of *all* batch triplets that are mined and have non-zero loss;
distances = L2 (squared L2 with ``squared=True``) of every positive / negative (image, caption)
pair of the batch.
"""

from __future__ import annotations

from typing import Annotated

import torch

from retrieval.distances import L2, SQUARED_L2
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput
from retrieval.losses.miners import split_pairs, triplet_selection, triplet_type
from retrieval.losses.registry import LOSSES
from retrieval.losses.settings import CheckedBy, NonNegativeFloat


@LOSSES.register("triplet-mined")
class MinedTripletLoss(CrossModalLoss):
    """``[d(f_a, t_p) - d(f_a, t_n) + m]_+`` averaged over mined triplets with non-zero loss."""

    family = LossFamily.TRIPLET
    active_means_gradient = True

    def __init__(self, margin: NonNegativeFloat = 1.0, mining: Annotated[str, CheckedBy(triplet_type)] = "all",
                 squared: bool = False) -> None:
        super().__init__()
        self.margin = margin
        self.mining = triplet_type(mining)
        self.squared = squared
        self.distance = SQUARED_L2 if squared else L2

    def compute(self, image_emb, text_emb, labels):
        distances = self.distance.matrix(image_emb, text_emb)
        with torch.no_grad():
            (anchor, positive, negative), keep = triplet_selection(
                distances, labels, labels, self.margin, self.mining
            )
        anchor, positive, negative = anchor[keep], positive[keep], negative[keep]
        # Schroff et al. 2015 (FaceNet triplet loss): L = [d(a,p) - d(a,n) + m]_+
        per_triplet = torch.relu(distances[anchor, positive] - distances[anchor, negative] + self.margin)
        nonzero = per_triplet > 0
        value = per_triplet[nonzero].mean() if bool(nonzero.any()) else (image_emb * 0).sum()
        active = torch.zeros_like(keep)
        active[keep.nonzero().squeeze(1)[nonzero]] = True
        d_pos, d_neg = split_pairs(distances.detach(), labels)
        return LossOutput.from_terms(value, active, d_pos, d_neg)
