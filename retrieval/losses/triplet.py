"""The text-anchored triplet loss ``max(0, m + d(f(i), t+) - d(f(i), t-))``.

``t+`` is the image's own caption vector, ``t-`` a caption vector that a negative sampler chose far
from ``t+`` in word-vector space (``negatives``; ``far-hardest`` and ``far-semihard`` then pick among
the far captions by their distance to the image embedding, with the far threshold set by
``far_quantile`` or ``far_distance``). A row without any candidate negative (its label fills the
batch) has no term; the loss is the mean over the other rows, zero when none is left. Written here
rather than taken from pytorch-metric-learning because the negative is chosen from the *text* side's
geometry, which its miners do not express.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch

from retrieval.distances import L2, SQUARED_L2
from retrieval.errors import ConfigError
from retrieval.losses.base import CrossModalLoss, LossFamily, LossOutput, mean_or_zero
from retrieval.losses.registry import LOSSES
from retrieval.losses.settings import AtLeast, CheckedBy, NonNegativeFloat
from retrieval.negatives import NO_NEGATIVE, FarNegativesByModel, create_negative_sampler, negative_sampler_class


def _check_quantile(value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ConfigError(f"must be a quantile in [0, 1], got {value!r}")


#: optional settings (a check outside the ``| None`` also sees None; one inside it only a given value)
OptionalQuantile = Annotated[float | None, CheckedBy(_check_quantile)]
OptionalNonNegativeFloat = Annotated[float | None, AtLeast(0.0)]


@LOSSES.register("triplet")
class TextAnchoredTripletLoss(CrossModalLoss):
    """Triplet loss with a word-vector-space negative per image (``squared``: squared L2 distances)."""

    family = LossFamily.TRIPLET
    active_means_gradient = True

    def __init__(self, margin: NonNegativeFloat = 1.0, squared: bool = False,
                 negatives: Annotated[str, CheckedBy(negative_sampler_class)] = "farthest",
                 far_quantile: OptionalQuantile = None, far_distance: OptionalNonNegativeFloat = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.margin = margin
        self.squared = squared
        self.distance = SQUARED_L2 if squared else L2
        self.sampler = create_negative_sampler(negatives, far_quantile, far_distance)
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        """The far threshold is for the model-aware samplers only, and given one way."""
        given = [key for key in ("far_quantile", "far_distance") if settings[key] is not None]
        if given and not issubclass(negative_sampler_class(settings["negatives"]), FarNegativesByModel):
            raise ConfigError(f"{given[0]}: only negatives far-hardest and far-semihard use a far threshold, "
                              f"not {settings['negatives']!r}")
        if len(given) == 2:
            raise ConfigError("far_quantile and far_distance: give one far threshold, not both")

    def compute(self, image_emb, text_emb, labels):
        image_to_text = None
        if self.sampler.uses_model:
            with torch.no_grad():
                image_to_text = self.distance.matrix(image_emb, text_emb)
        negative_index = self.sampler(text_emb, labels, self.generator, image_to_text)
        rows = (negative_index != NO_NEGATIVE).nonzero().squeeze(1)  # rows without a negative have no term
        d_pos = self.distance.paired(image_emb[rows], text_emb[rows])
        d_neg = self.distance.paired(image_emb[rows], text_emb[negative_index[rows]])
        per_triplet = torch.relu(self.margin + d_pos - d_neg)
        return LossOutput.from_terms(mean_or_zero(per_triplet, image_emb), per_triplet > 0, d_pos, d_neg)
