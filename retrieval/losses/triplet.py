"""The text-anchored triplet loss ``max(0, m + d(f(i), t+) - d(f(i), t-))``.

``t+`` is the image's own caption vector, ``t-`` a caption vector that a negative sampler chose far
from ``t+`` in word-vector space (``negatives``; ``far-hardest`` and ``far-semihard`` then pick among
the far captions by their distance to the image embedding, with the far threshold set by
``far_quantile`` or ``far_distance``). A row without any candidate negative (its label fills the
batch) has no term; the loss is the mean over the other rows, zero when none is left. Written here
rather than taken from pytorch-metric-learning because the negative is chosen from the *text* side's
geometry, which its miners do not express.

Two switches give VSE++'s forms (Faghri et al. 2018):

- ``anchors``: ``image`` (above), ``caption`` — ``max(0, m + d(f(i), t_i) - d(f(j), t_i))``: the caption
  ``t_i`` against a wrong image ``f(j)``, where ``j`` is chosen by the same sampler (image ``j`` is wrong
  when its own caption ``t_j`` is far from ``t_i`` in word space; the model-aware samplers look at the
  distances from ``t_i`` to every image) — or ``both``: the terms of the two directions together, averaged
  over all of them (so each direction weighs by its number of terms, equal when no row lacks a negative).
- ``hinge``: ``sampled`` (one negative per anchor, as above) or ``sum``: every negative of the set the
  sampler draws from contributes its hinge (``random``: every caption of another label, VSE++'s SH
  loss; ``far-random``: those farther than the batch's mean caption distance; ``far-hardest`` and
  ``far-semihard``: the far captions). The terms of an anchor are summed and the sums averaged over
  anchors; the active fraction is then the share of (anchor, negative) pairs with a non-zero term.
  ``farthest`` draws from a set of one, so ``sum`` is refused with it.
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
ANCHORS = ("image", "caption", "both")
HINGES = ("sampled", "sum")


def _one_of(choices: tuple[str, ...]):
    def check(value: str) -> None:
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(choices)}; got {value!r}")
    return check


@LOSSES.register("triplet")
class TextAnchoredTripletLoss(CrossModalLoss):
    """Triplet loss with a word-vector-space negative per image (``squared``: squared L2 distances)."""

    family = LossFamily.TRIPLET
    active_means_gradient = True

    def __init__(self, margin: NonNegativeFloat = 1.0, squared: bool = False,
                 negatives: Annotated[str, CheckedBy(negative_sampler_class)] = "farthest",
                 far_quantile: OptionalQuantile = None, far_distance: OptionalNonNegativeFloat = None,
                 anchors: Annotated[str, CheckedBy(_one_of(ANCHORS))] = "image",
                 hinge: Annotated[str, CheckedBy(_one_of(HINGES))] = "sampled",
                 seed: int = 0) -> None:
        super().__init__()
        self.margin = margin
        self.anchors, self.hinge = anchors, hinge
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
        if settings["hinge"] == "sum" and settings["negatives"] == "farthest":
            raise ConfigError("hinge: sum sums over the set the negatives are drawn from, and negatives: farthest "
                              "draws from a set of one; use random, far-random, far-hardest or far-semihard")

    def compute(self, image_emb, text_emb, labels):
        directions = ("image", "caption") if self.anchors == "both" else (self.anchors,)
        if self.hinge == "sum":
            return self._sum_of_hinges(image_emb, text_emb, labels, directions)
        image_to_text = None
        if self.sampler.uses_model:
            with torch.no_grad():
                image_to_text = self.distance.matrix(image_emb, text_emb)
        d_pos, d_neg = [], []
        for direction in directions:
            # an image anchor against caption j, or a caption anchor against image j: the sampler sees the
            # distances from each anchor to the other side's items
            to_others = image_to_text if direction == "image" or image_to_text is None else image_to_text.T
            negative_index = self.sampler(text_emb, labels, self.generator, to_others)
            rows = (negative_index != NO_NEGATIVE).nonzero().squeeze(1)  # rows without a negative have no term
            d_pos.append(self.distance.paired(image_emb[rows], text_emb[rows]))
            if direction == "image":
                d_neg.append(self.distance.paired(image_emb[rows], text_emb[negative_index[rows]]))
            else:
                d_neg.append(self.distance.paired(image_emb[negative_index[rows]], text_emb[rows]))
        d_pos, d_neg = torch.cat(d_pos), torch.cat(d_neg)
        per_triplet = torch.relu(self.margin + d_pos - d_neg)
        return LossOutput.from_terms(mean_or_zero(per_triplet, image_emb), per_triplet > 0, d_pos, d_neg)

    def _sum_of_hinges(self, image_emb, text_emb, labels, directions):
        """Every negative of the sampler's set contributes; summed per anchor, averaged over anchors."""
        image_to_text = self.distance.matrix(image_emb, text_emb)  # [i, j] = d(f(i), t_j)
        with torch.no_grad():
            negatives = self.sampler.negative_set(torch.cdist(text_emb, text_emb), labels)  # [anchor, j]
        positive = image_to_text.diagonal()
        terms, pos, neg, anchor_sums = [], [], [], []
        for direction in directions:
            to_others = image_to_text if direction == "image" else image_to_text.T  # [anchor, other item]
            anchor, other = negatives.nonzero(as_tuple=True)
            hinge = torch.relu(self.margin + positive[anchor] - to_others[anchor, other])
            rows = negatives.any(dim=1)
            anchor_sums.append(torch.zeros_like(positive).index_add(0, anchor, hinge)[rows])
            terms.append(hinge)
            pos.append(positive[anchor].detach())
            neg.append(to_others[anchor, other].detach())
        per_anchor, hinge = torch.cat(anchor_sums), torch.cat(terms)
        return LossOutput.from_terms(mean_or_zero(per_anchor, image_emb), hinge > 0, torch.cat(pos), torch.cat(neg))
