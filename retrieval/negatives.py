"""Negative samplers: for each caption vector ``t+`` pick another caption vector ``t-`` of the batch.

The choice is made in *word-vector space* (distances between caption vectors), never from the
image side, following the text-anchored recipe: ``t-`` should be far from ``t+``.

- ``hard``: the farthest caption of the batch.
- ``soft``: uniform among captions farther from ``t+`` than the batch's mean caption distance.
- ``random``: uniform among all captions that are not positives.
"""

from __future__ import annotations

import torch

from retrieval.errors import ConfigError
from retrieval.registry import Registry

NEGATIVE_SAMPLERS: Registry[NegativeSampler] = Registry("negative sampler")


class NegativeSampler:
    """Picks one negative index per row; rows sharing a label are never negatives."""

    def __call__(
        self, text_emb: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        distances = torch.cdist(text_emb, text_emb)
        candidates = labels[:, None] != labels[None, :]
        if not bool(candidates.any(dim=1).all()):
            raise ConfigError("negative sampling needs at least two distinct labels in every batch")
        return self.select(distances, candidates, generator)

    def select(
        self, distances: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        raise NotImplementedError


def _uniform_choice(mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One uniformly random True column per row of a boolean matrix (every row has one)."""
    noise = torch.rand(mask.shape, generator=generator, device="cpu").to(mask.device)
    return torch.where(mask, noise, torch.full_like(noise, -1.0)).argmax(dim=1)


@NEGATIVE_SAMPLERS.register("hard")
class HardNegatives(NegativeSampler):
    """The farthest caption vector of the batch."""

    def select(self, distances, candidates, generator):
        return distances.masked_fill(~candidates, float("-inf")).argmax(dim=1)


@NEGATIVE_SAMPLERS.register("soft")
class SoftNegatives(NegativeSampler):
    """Uniform among captions farther than the batch's mean distance (the farthest if none is)."""

    def select(self, distances, candidates, generator):
        threshold = distances[candidates].mean()
        far = candidates & (distances > threshold)
        farthest = HardNegatives().select(distances, candidates, generator)
        has_far = far.any(dim=1)
        far[~has_far, farthest[~has_far]] = True
        return _uniform_choice(far, generator)


@NEGATIVE_SAMPLERS.register("random")
class RandomNegatives(NegativeSampler):
    """Uniform among all non-positive captions of the batch."""

    def select(self, distances, candidates, generator):
        return _uniform_choice(candidates, generator)


def create_negative_sampler(name: str) -> NegativeSampler:
    """Build a registered sampler by name (``hard``, ``soft``, ``random``)."""
    return NEGATIVE_SAMPLERS.create(name)
