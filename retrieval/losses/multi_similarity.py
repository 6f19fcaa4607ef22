"""``multi-similarity`` (Wang et al. 2019) with its pair mining: pytorch-metric-learning wrapped.

pml's ``MultiSimilarityMiner`` (epsilon = mining margin) and ``MultiSimilarityLoss`` (alpha,
beta, base = threshold lambda) run with the caption vectors as ``ref_emb`` and a *copy* of the
labels as ``ref_labels``, which is exactly the cross-modal setting: every (image, caption) pair,
the diagonal kept as a positive (pml drops it only when ``ref_labels is labels``). Cosine similarity.

Logged: distances are cosine distances ``1 - cos`` over all pairs; active fraction = share of all
(image, caption) pairs the miner keeps. Distance: cosine (search compares unit vectors).
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss as PmlMultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from retrieval.distances import COSINE
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput
from retrieval.losses.miners import split_pairs
from retrieval.losses.registry import LOSSES
from retrieval.losses.settings import NonNegativeFloat, PositiveFloat


@LOSSES.register("multi-similarity")
class MultiSimilarityLoss(CrossModalLoss):
    """Soft-weighted positive and negative pairs, after the paper's hard-pair mining."""

    family = LossFamily.PAIR
    active_means_gradient = True
    distance = COSINE

    def __init__(self, threshold: float = 0.5, epsilon: NonNegativeFloat = 0.1, alpha: PositiveFloat = 2.0,
                 beta: PositiveFloat = 50.0) -> None:
        super().__init__()
        # Wang et al. 2019: 1/a log(1 + sum_P e^{-a(S_ik - l)}) + 1/b log(1 + sum_N e^{b(S_ik - l)})
        self.pml_loss = PmlMultiSimilarityLoss(alpha=alpha, beta=beta, base=threshold)
        # Wang et al. 2019: keep negatives with S_ik + e > min_P S, positives with S_ij - e < max_N S
        self.miner = MultiSimilarityMiner(epsilon=epsilon)

    def compute(self, image_emb, text_emb, labels):
        ref_labels = labels.clone()
        pairs = self.miner(image_emb, labels, text_emb, ref_labels)
        value = self.pml_loss(image_emb, labels, pairs, ref_emb=text_emb, ref_labels=ref_labels)
        with torch.no_grad():
            positive, negative = split_pairs(COSINE.similarity(image_emb, text_emb), labels)
            active = torch.zeros(labels.numel() ** 2, dtype=torch.bool)
            active[: len(pairs[0]) + len(pairs[2])] = True
        return LossOutput.from_terms(value, active, 1.0 - positive, 1.0 - negative)
