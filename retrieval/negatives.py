"""Negative samplers: for each caption vector ``t+`` pick another caption vector ``t-`` of the batch.

Every sampler keeps to the text-anchored recipe's filter of *word-vector space*: ``t-`` is a caption
of another label, and all but ``random`` take it far from ``t+`` (distances between caption
vectors), which keeps captions that also describe the image out. Two of them then look at the
model, at the distances from each image embedding to the batch's captions:

- ``farthest``: the caption farthest from ``t+`` (in the model's space almost always an easy negative).
- ``far-random``: uniform among captions farther from ``t+`` than the batch's mean caption distance
  (the farthest if none is).
- ``random``: uniform among all captions that are not positives.
- ``far-hardest``: among the *far* captions, the one closest to the image embedding (VSE++'s
  "max violation", restricted to safe negatives).
- ``far-semihard``: among the far captions, the closest to the image of those still farther from it
  than ``t+``; a row with none falls back to ``far-hardest``.

A caption is *far* when its distance to ``t+`` is strictly greater than the threshold: a quantile
(``far_quantile``) of the batch's caption distances (all pairs of different labels; the "lower"
quantile, so the threshold is one of those distances and a caption exactly at it is not far), or a
fixed distance (``far_distance``). A row with no far caption takes its farthest one. Ties go to the
lowest batch index.

A row whose label fills the whole batch (a short last batch can hold a single image's captions) has
no candidate at all: it gets :data:`NO_NEGATIVE` and the losses leave it out (a batch where no row
has a negative contributes a zero loss).

Both sides of the renaming: the old names ``hard`` and ``soft`` are refused with the new ones
(:data:`RENAMED`); saved configs that used them are upgraded when read (``retrieval.checkpoint``).
"""

from __future__ import annotations

import torch

from retrieval.errors import ConfigError
from retrieval.registry import Registry

NEGATIVE_SAMPLERS: Registry[NegativeSampler] = Registry("negative sampler")

#: old sampler names → the names they are now registered under
RENAMED = {"hard": "farthest", "soft": "far-random"}

#: the index a row without any candidate negative (every caption shares its label) receives
NO_NEGATIVE = -1

#: the quantile of the batch's caption distances that ``far-hardest`` and ``far-semihard`` default to
DEFAULT_FAR_QUANTILE = 0.5


class NegativeSampler:
    """Picks one negative index per row; rows sharing a label are never negatives.

    A row with no candidate (every row of the batch shares its label) gets :data:`NO_NEGATIVE`.

    ``uses_model``: whether :meth:`select` needs ``image_to_text``, the (B, B) distances from each
    row's image embedding to every caption vector of the batch (row ``i``'s positive is column ``i``).
    """

    uses_model = False

    def __call__(self, text_emb: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                 image_to_text: torch.Tensor | None = None) -> torch.Tensor:
        distances = torch.cdist(text_emb, text_emb)
        candidates = labels[:, None] != labels[None, :]
        if self.uses_model and image_to_text is None:
            raise ValueError(f"{type(self).__name__} needs the image-to-caption distances")
        has_negative = candidates.any(dim=1)
        if not bool(has_negative.any()):
            return torch.full_like(labels, NO_NEGATIVE, dtype=torch.long)
        chosen = self.select(distances, candidates, generator, image_to_text)
        return chosen.masked_fill(~has_negative, NO_NEGATIVE)

    def select(self, distances: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator | None,
               image_to_text: torch.Tensor | None = None) -> torch.Tensor:
        """One column per row of ``candidates`` (B, B bool), given caption distances (B, B)."""
        raise NotImplementedError

    def negative_set(self, distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, B) bool: every column this sampler draws row's negative from (the sum-of-hinges form).

        ``distances``: the batch's caption distances. Rows whose label fills the batch have none.
        """
        candidates = labels[:, None] != labels[None, :]
        if not bool(candidates.any()):
            return candidates
        return self.draws_from(distances, candidates) & candidates.any(dim=1, keepdim=True)

    def draws_from(self, distances: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The candidates :meth:`select` chooses among (default: all of them)."""
        return candidates


def _uniform_choice(mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One uniformly random True column per row of a boolean matrix (every row has one)."""
    noise = torch.rand(mask.shape, generator=generator, device="cpu").to(mask.device)
    return torch.where(mask, noise, torch.full_like(noise, -1.0)).argmax(dim=1)


def _farthest(distances: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return distances.masked_fill(~candidates, float("-inf")).argmax(dim=1)


def _or_farthest(far: torch.Tensor, distances: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``far`` with each empty row given its farthest candidate."""
    far = far.clone()
    empty = ~far.any(dim=1)
    far[empty, _farthest(distances, candidates)[empty]] = True
    return far


def _closest(values: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per row, the allowed column with the smallest value (the first on ties)."""
    return values.masked_fill(~allowed, float("inf")).argmin(dim=1)


@NEGATIVE_SAMPLERS.register("farthest")
class FarthestNegatives(NegativeSampler):
    """The farthest caption vector of the batch."""

    def select(self, distances, candidates, generator, image_to_text=None):
        return _farthest(distances, candidates)

    def draws_from(self, distances, candidates):
        chosen = torch.zeros_like(candidates)
        chosen[torch.arange(len(candidates)), _farthest(distances, candidates)] = True
        return chosen


@NEGATIVE_SAMPLERS.register("far-random")
class FarRandomNegatives(NegativeSampler):
    """Uniform among captions farther than the batch's mean distance (the farthest if none is)."""

    def select(self, distances, candidates, generator, image_to_text=None):
        return _uniform_choice(self.draws_from(distances, candidates), generator)

    def draws_from(self, distances, candidates):
        threshold = distances[candidates].mean()
        return _or_farthest(candidates & (distances > threshold), distances, candidates)


@NEGATIVE_SAMPLERS.register("random")
class RandomNegatives(NegativeSampler):
    """Uniform among all non-positive captions of the batch."""

    def select(self, distances, candidates, generator, image_to_text=None):
        return _uniform_choice(candidates, generator)


class FarNegativesByModel(NegativeSampler):
    """Base of the model-aware samplers: which captions are far from ``t+`` in word space.

    ``far_distance`` (a caption distance) wins over ``far_quantile`` (in [0, 1]) when given.
    """

    uses_model = True

    def __init__(self, far_quantile: float = DEFAULT_FAR_QUANTILE, far_distance: float | None = None) -> None:
        self.far_quantile, self.far_distance = far_quantile, far_distance

    def threshold(self, distances: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor | float:
        """The word-space distance a caption must exceed to count as far."""
        if self.far_distance is not None:
            return self.far_distance
        values = distances[candidates].sort().values  # the "lower" quantile: one of the batch's distances
        return values[int(self.far_quantile * (values.numel() - 1))]

    def far(self, distances: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Candidates strictly farther than the threshold; a row with none keeps its farthest caption."""
        return _or_farthest(candidates & (distances > self.threshold(distances, candidates)), distances, candidates)

    def draws_from(self, distances, candidates):
        return self.far(distances, candidates)


@NEGATIVE_SAMPLERS.register("far-hardest")
class FarHardestNegatives(FarNegativesByModel):
    """Among far captions, the one closest to the image embedding."""

    def select(self, distances, candidates, generator, image_to_text=None):
        return _closest(image_to_text, self.far(distances, candidates))


@NEGATIVE_SAMPLERS.register("far-semihard")
class FarSemihardNegatives(FarNegativesByModel):
    """Among far captions farther from the image than ``t+``, the closest; else the far-hardest."""

    def select(self, distances, candidates, generator, image_to_text=None):
        far = self.far(distances, candidates)
        positive = image_to_text.diagonal()[:, None]
        semihard = far & (image_to_text > positive)
        has_semihard = semihard.any(dim=1, keepdim=True)
        return _closest(image_to_text, torch.where(has_semihard, semihard, far))


def negative_sampler_class(name: str) -> type[NegativeSampler]:
    """The sampler registered as ``name``; an old name is a one-line error naming the new one."""
    if name in RENAMED:
        raise ConfigError(f"negative sampler {name!r} was renamed {RENAMED[name]!r} "
                          f"({', '.join(f'{old} → {new}' for old, new in RENAMED.items())}); "
                          f"choose one of: {', '.join(NEGATIVE_SAMPLERS.names())}")
    return NEGATIVE_SAMPLERS.get(name)


def create_negative_sampler(name: str, far_quantile: float | None = None,
                            far_distance: float | None = None) -> NegativeSampler:
    """Build a registered sampler by name (``farthest``, ``far-random``, ``random``, ``far-hardest``,
    ``far-semihard``); the far threshold is only for the model-aware ones, which default to the median."""
    sampler_class = negative_sampler_class(name)
    if issubclass(sampler_class, FarNegativesByModel):
        quantile = DEFAULT_FAR_QUANTILE if far_quantile is None else far_quantile
        return sampler_class(far_quantile=quantile, far_distance=far_distance)
    if far_quantile is not None or far_distance is not None:
        raise ConfigError(f"negative sampler {name!r} has no far threshold (far_quantile, far_distance); "
                          "only far-hardest and far-semihard use one")
    return sampler_class()
